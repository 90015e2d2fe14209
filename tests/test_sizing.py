"""Balanced jobs (sculpt size): every stage gets GPU time in proportion to its cost; the example job is the proposal."""

import os

import pytest

from sculpt import cli, config
from sculpt.annotation import chat, reasoning
from sculpt.engine import sizing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("gpus", [8, 16, 24, 32, 64, 128, 512])
def test_proposals_fit_and_balance_within_20_percent(gpus):
    plan = sizing.propose(gpus)
    used = plan["vlm_replicas"] + sum(actors * share for actors, share in plan["stages"].values())
    assert used <= gpus + 1e-9 and plan["vlm_replicas"] >= 1 and all(a >= 1 for a, _ in plan["stages"].values())
    assert plan["balance"] >= 0.8
    rates = plan["images_per_second"]
    assert min(rates.values()) == pytest.approx(plan["balance"] * max(rates.values()))


@pytest.mark.parametrize("gpus", [2, 3, 4])
def test_a_lopsided_cost_on_few_gpus_still_fits_every_stage_in_the_gpus(gpus):
    plan = sizing.propose(gpus, {"ground": 400.0, "mask": 12.0, "verify": 17.0})  # one stage far dearer than the rest
    used = plan["vlm_replicas"] + sum(actors * share for actors, share in plan["stages"].values())
    assert used <= gpus + 1e-9 and all(actors >= 1 for actors, _ in plan["stages"].values())


def test_measured_costs_move_gpus_to_the_slow_stage():
    even = sizing.propose(16)
    slow_verify = sizing.propose(16, {"verify": 144.0})  # fp32 EVF-SAM2 as first measured on an H100
    assert slow_verify["stages"]["verify"][0] * slow_verify["stages"]["verify"][1] > \
        even["stages"]["verify"][0] * even["stages"]["verify"][1]
    assert slow_verify["balance"] >= 0.8


def test_the_example_job_is_the_proposal_for_16_gpus(capsys):
    job = config.load(os.path.join(ROOT, "workflows", "annotate.yaml"))
    params = {stage.name: stage.params for stage in job.stages}
    # the example job asks what sizing assumes by default: 2 reasoning references and 2 chat turns per image
    assert (params["refer"]["reasoning"], params["chat"]["turns"]) == (reasoning.DEFAULT_COUNT, chat.DEFAULT_TURNS) == (2, 2)
    plan = sizing.propose(16)
    assert job.vlm.replicas == plan["vlm_replicas"]
    for stage in job.stages:
        if stage.name in plan["stages"]:
            assert (stage.actors, stage.gpus) == plan["stages"][stage.name]
        elif stage.name in ("caption", "refer", "listen", "chat"):  # VLM clients: one actor per engine
            assert stage.actors == plan["vlm_replicas"]
    assert cli.main(["size", "--gpus", "16"]) == 0
    printed = capsys.readouterr().out
    assert "replicas: 12" in printed and "{name: ground, actors: 26, gpus: 0.0625" in printed
    assert "{name: instances, actors: 16, gpus: 0.0625" in printed
    assert "with 2 reasoning reference(s) and 2 chat turn(s) per image" in printed


def test_reasoning_references_and_chat_turns_count_in_the_vlm_cost():
    """Each reasoning reference is one more refer request and one more listen request, and the chat stage one more
    request per image whose answer grows with its turns: off costs less than the default, more costs more."""
    assert sizing.vlm_extra_ms(0, 0) == 0
    off, default, more = (sizing.vlm_extra_ms(r, t) for r, t in ((0, 0), (2, 2), (4, 4)))
    assert off < default < more
    assert sizing.vlm_extra_ms(0, 2) < default and sizing.vlm_extra_ms(2, 0) < default  # each counts on its own
    assert sizing.vlm_extra_ms(3, 2) > default and sizing.vlm_extra_ms(2, 3) > default
    # a reasoning reference costs about a plain pair's refer + listen requests past the cached prefix: a few ms
    assert 5 < sizing.vlm_extra_ms(1, 0) < 15
    plans = [sizing.propose(16, reasoning_count=r, chat_turns=t) for r, t in ((0, 0), (2, 2), (4, 4))]
    assert plans[1] == sizing.propose(16)  # the defaults are 2 and 2
    vlm_ms = [plan["vlm_ms"] for plan in plans]
    assert vlm_ms[0] == sizing.DEFAULT_COSTS_MS["vlm"] < vlm_ms[1] < vlm_ms[2]
    assert vlm_ms[1] == pytest.approx(sizing.DEFAULT_COSTS_MS["vlm"] + default)
    # the dearer VLM gets more engines, and the job's rate drops
    assert plans[0]["vlm_replicas"] < plans[1]["vlm_replicas"] <= plans[2]["vlm_replicas"]
    rates = [min(plan["images_per_second"].values()) for plan in plans]
    assert rates[0] > rates[1] > rates[2]
    assert all(plan["balance"] >= 0.8 for plan in plans)
    # a measured VLM cost (caption + refer + listen) gets the same requests on top
    measured = sizing.propose(16, {"vlm": 300.0}, reasoning_count=0, chat_turns=0)
    assert measured["vlm_ms"] == 300.0 and sizing.propose(16, {"vlm": 300.0})["vlm_ms"] == pytest.approx(300.0 + default)


def test_size_takes_the_reasoning_and_chat_counts_of_a_job(capsys):
    assert cli.main(["size", "--gpus", "16", "--reasoning", "0", "--chat-turns", "0"]) == 0
    printed = capsys.readouterr().out
    assert "replicas: 11" in printed and "with 0 reasoning reference(s) and 0 chat turn(s)" in printed
    with pytest.raises(SystemExit):
        cli.main(["size", "--gpus", "16", "--chat-turns", "-1"])
    assert "0 or more" in capsys.readouterr().err
