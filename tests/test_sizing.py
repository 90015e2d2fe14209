"""Balanced jobs (sculpt size): every stage gets GPU time in proportion to its cost; the example job is the proposal."""

import os

import pytest

from sculpt import cli, config
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
    plan = sizing.propose(16)
    assert job.vlm.replicas == plan["vlm_replicas"]
    for stage in job.stages:
        if stage.name in plan["stages"]:
            assert (stage.actors, stage.gpus) == plan["stages"][stage.name]
    assert cli.main(["size", "--gpus", "16"]) == 0
    printed = capsys.readouterr().out
    assert "replicas: 11" in printed and "{name: ground, actors: 33, gpus: 0.0625" in printed
    assert "{name: instances, actors: 20, gpus: 0.0625" in printed
