"""Balanced jobs: how many actors and what GPU share each stage gets on N GPUs, from per-stage GPU costs.

A chain runs at the speed of its slowest stage, so each stage should get GPU time in proportion to its cost per
image: the target rate is N / (sum of costs), each stage's share is rate x cost. The VLM engines take whole
GPUs (one engine per GPU, or ``tensor_parallel`` GPUs each); the vision stages split what is left into actors
of a fixed fraction of a GPU, which Ray packs several to a GPU. ``sculpt size --gpus N`` prints
the proposal as the ``vlm`` and ``stages`` sections of a job config.

Default costs are the H100 estimate of docs/BENCHMARKS.md (FLOP counts at stated efficiencies, 10 objects per
image, InternVL3-8B with 7 tiles); replace them with the figures ``benchmarks/gpu_stages.py`` measures on your GPUs.
The VLM's cost also counts issue 30's requests by the same model (``vlm_extra_ms``): the refer stage's ``reasoning``
references per image and the chat stage's ``turns``, ``propose(reasoning_count=..., chat_turns=...)`` (default 2
and 2, the stages' defaults; 0: none), on top of the ``vlm`` cost (caption + refer + listen), given or default.
"""

from __future__ import annotations

import math

from sculpt.annotation import chat, reasoning

# GPU milliseconds per image, per stage ("vlm" is caption + refer + listen on the shared engines; ``vlm_extra_ms``
# adds reasoning references and chat turns to it).
DEFAULT_COSTS_MS = {"vlm": 231.8, "ground": 36.4, "mask": 12.4, "instances": 22.5, "verify": 17.1}

# docs/BENCHMARKS.md's VLM model (InternVL3-8B on an H100): prompt tokens past the image's cached prefix (image, then
# the caption, which every request about the image starts with) at ~14.7 GFLOP a token (refer's 1,031 GFLOP for 70)
# and 50 % of 989.4 TFLOPS; output tokens at 10,000 a second.
VLM_PREFILL_MS_PER_TOKEN = 14.7 / (0.5 * 989_400) * 1000
VLM_DECODE_MS_PER_TOKEN = 1000 / 10_000
# A reasoning reference (the refer stage's ``reasoning`` per image): its request (~90 prompt tokens past the prefix,
# ~18 output tokens: about 12 words), then the listener's (~45 prompt, ~20 output tokens), as a plain pair's.
REASONING_TOKENS = {"prompt": 90 + 45, "output": 18 + 20}
# Grounded chat (the chat stage, one request per image): the task and the list of kept objects (~200 prompt tokens
# past the prefix, asked once when ``turns`` > 0), ~80 output tokens a turn (a question, an answer and its marks; the
# stage's ``max_tokens``, 256 per answer, must grow with the turns). Like the listener's, it assumes the image's KV
# blocks are still cached: where they are gone, each image costs its prefix again (~60 ms, docs/BENCHMARKS.md).
CHAT_PROMPT_TOKENS, CHAT_TOKENS_PER_TURN = 200, 80
VISION_STAGES = ("ground", "mask", "instances", "verify")
# Vision stages a job can do without: where the GPUs cannot hold every vision stage beside one engine, the proposal
# leaves these out (the chain without them still runs; "dropped" says which).
OPTIONAL_STAGES = ("instances",)


def vlm_extra_ms(reasoning_count: int = reasoning.DEFAULT_COUNT, chat_turns: int = chat.DEFAULT_TURNS) -> float:
    """GPU ms per image of the VLM requests issue 30 adds to caption + refer + listen: ``reasoning_count`` reasoning
    references (each asked, then listened to) and a chat request of ``chat_turns`` turns (none at 0)."""
    reasoning_ms = max(0, reasoning_count) * (REASONING_TOKENS["prompt"] * VLM_PREFILL_MS_PER_TOKEN
                                              + REASONING_TOKENS["output"] * VLM_DECODE_MS_PER_TOKEN)
    chat_ms = (CHAT_PROMPT_TOKENS * VLM_PREFILL_MS_PER_TOKEN
               + chat_turns * CHAT_TOKENS_PER_TURN * VLM_DECODE_MS_PER_TOKEN if chat_turns > 0 else 0.0)
    return reasoning_ms + chat_ms


def propose(gpus: int, costs_ms: dict | None = None, share_steps=(0.5, 0.25, 0.125, 0.0625), tensor_parallel: int = 1,
            reasoning_count: int = reasoning.DEFAULT_COUNT, chat_turns: int = chat.DEFAULT_TURNS) -> dict:
    """{"vlm_replicas", "stages": {stage: (actors, gpus per actor)}, "images_per_second": {stage: capacity},
    "balance": slowest / fastest capacity}. Vision actors hold one of ``share_steps`` of a GPU: the coarsest that
    balances as well as a finer one (fewer, larger actors batch better). The VLM's cost is ``costs_ms["vlm"]``
    (caption + refer + listen) plus ``vlm_extra_ms(reasoning_count, chat_turns)``."""
    costs = {**DEFAULT_COSTS_MS, **(costs_ms or {})}
    costs["vlm"] += vlm_extra_ms(reasoning_count, chat_turns)
    assumed = {"vlm_ms": costs["vlm"], "reasoning": reasoning_count, "chat_turns": chat_turns}
    try:
        return {**_propose(gpus, costs, share_steps, tensor_parallel, VISION_STAGES), **assumed}
    except ValueError:
        vision = tuple(s for s in VISION_STAGES if s not in OPTIONAL_STAGES)
        return {**_propose(gpus, costs, share_steps, tensor_parallel, vision), "dropped": list(OPTIONAL_STAGES),
                **assumed}


def _propose(gpus: int, costs: dict, share_steps, tensor_parallel: int, vision_stages: tuple) -> dict:
    # Engines in whole GPUs, the rest to the vision stages; pick the split whose slowest stage is fastest.
    candidates = []  # (replicas, vision, capacity) of every feasible split
    for step in share_steps:
        for replicas in range(1, gpus // tensor_parallel + 1):
            left = gpus - replicas * tensor_parallel
            if left < len(vision_stages) * step:
                break
            vision = _split(left, {s: costs[s] for s in vision_stages}, step)
            capacity = {"vlm": replicas * tensor_parallel / costs["vlm"] * 1000}
            capacity |= {s: actors * share / costs[s] * 1000 for s, (actors, share) in vision.items()}
            candidates.append((replicas, vision, capacity))
    if not candidates:
        raise ValueError(f"{gpus} GPU(s) cannot hold a VLM engine of {tensor_parallel} GPU(s) and the vision stages")
    # The fastest job; among those within 1 % of it, the best balanced (least idle GPU time); then coarser actors.
    fastest = max(min(c[2].values()) for c in candidates)
    near = [c for c in candidates if min(c[2].values()) >= 0.99 * fastest]
    best = max(near, key=lambda c: min(c[2].values()) / max(c[2].values()))
    replicas, vision, capacity = best
    return {"vlm_replicas": replicas, "tensor_parallel": tensor_parallel, "stages": vision, "dropped": [],
            "images_per_second": capacity, "balance": min(capacity.values()) / max(capacity.values())}


def _split(gpus: float, costs: dict, step: float) -> dict:
    """Actors of ``step`` GPU per stage, in proportion to cost, at least one each, at most ``gpus`` in all."""
    slots = int(round(gpus / step))
    total = sum(costs.values())
    actors = {s: max(1, math.floor(slots * c / total)) for s, c in costs.items()}
    while sum(actors.values()) < slots:  # hand out what rounding left to the stage that is slowest now
        slowest = min(actors, key=lambda s: actors[s] / costs[s])
        actors[slowest] += 1
    while sum(actors.values()) > slots:  # one each took more than there is: take back from the fastest stage
        fastest = max((s for s in actors if actors[s] > 1), key=lambda s: actors[s] / costs[s])
        actors[fastest] -= 1
    return {s: (n, step) for s, n in actors.items()}


def job_sections(plan: dict) -> str:
    """The proposal as the `vlm` and `stages` YAML of a job config (caption/refer/listen/chat: one client actor per
    engine)."""
    replicas = plan["vlm_replicas"]
    lines = ["vlm:", f"  replicas: {replicas}", "  gpus: 1" if plan["tensor_parallel"] == 1 else "  gpus: 0",
             f"  tensor_parallel: {plan['tensor_parallel']}", "stages:",
             f"  - {{name: caption, actors: {replicas}, cpus: 0.5, batch_size: 8}}"]
    for stage in ("ground", "mask", "instances"):
        if stage in plan["stages"]:
            actors, share = plan["stages"][stage]
            lines.append(f"  - {{name: {stage}, actors: {actors}, gpus: {share:g}, batch_size: 8}}")
    lines.append(f"  - {{name: refer, actors: {replicas}, cpus: 0.5, batch_size: 4}}")
    lines.append(f"  - {{name: listen, actors: {replicas}, cpus: 0.5, batch_size: 4}}")
    actors, share = plan["stages"]["verify"]
    lines.append(f"  - {{name: verify, actors: {actors}, gpus: {share:g}, batch_size: 8}}")
    lines.append(f"  - {{name: chat, actors: {replicas}, cpus: 0.5, batch_size: 4}}")  # a VLM client (issue 30)
    return "\n".join(lines)


def describe(plan: dict) -> str:
    rates = ", ".join(f"{s} {r:.1f}" for s, r in plan["images_per_second"].items())
    left_out = (f"; left out, as the GPUs cannot hold them beside the rest: {', '.join(plan['dropped'])}"
                if plan.get("dropped") else "")
    vlm = (f"; VLM {plan['vlm_ms']:.1f} ms/image with {plan['reasoning']} reasoning reference(s) and "
           f"{plan['chat_turns']} chat turn(s) per image" if "vlm_ms" in plan else "")
    return (f"images/s each stage can sustain: {rates}; slowest/fastest = {plan['balance']:.2f} "
            f"(job rate ~{min(plan['images_per_second'].values()):.1f} images/s){vlm}{left_out}")
