"""How much a Ray driver's memory grows per task it submits, plain tasks against actor tasks (no Ray Data, no sculpt).

The driver submits waves of 64 calls, to 4 CPU-less actors or as plain tasks, waits for each wave, and samples its
USS every 2,048 calls. Prints one table row: kind | calls | USS MB at a quarter | USS MB at the end | KB per call
(the rise from a quarter of the way to the end). Ray core settings go in through the environment, e.g.

    .venv/bin/python benchmarks/ray_task_events.py --kind actor --calls 24576
    RAY_task_events_report_interval_ms=0 .venv/bin/python benchmarks/ray_task_events.py --kind actor --calls 24576
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil  # noqa: E402
import ray  # noqa: E402

WAVE, EVERY = 64, 2048


@ray.remote(num_cpus=0)
def plain(i: int) -> int:
    return i


@ray.remote(num_cpus=0)
class Echo:
    def call(self, i: int) -> int:
        return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["plain", "actor"], default="actor")
    parser.add_argument("--calls", type=int, default=24576)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    actors = [Echo.remote() for _ in range(4)]
    me, points = psutil.Process(), []
    for start in range(0, args.calls, WAVE):
        if args.kind == "actor":
            refs = [actors[i % 4].call.remote(i) for i in range(start, start + WAVE)]
        else:
            refs = [plain.remote(i) for i in range(start, start + WAVE)]
        ray.get(refs)
        if (start + WAVE) % EVERY == 0:
            points.append((start + WAVE, me.memory_full_info().uss / 2**20))
    ray.shutdown()
    (first, uss_first), (last, uss_last) = points[len(points) // 4], points[-1]
    per_call = (uss_last - uss_first) * 1024 / (last - first)
    print(f"| {args.kind} | {last} | {uss_first:.1f} | {uss_last:.1f} | {per_call:.2f} |")


if __name__ == "__main__":
    main()
