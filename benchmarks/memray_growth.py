"""What a process's live memory grew by between two points of a memray capture, by where it was allocated.

Native frames included (Ray core's C++, gRPC, pymalloc's arenas), so it answers what tracemalloc cannot: which
of a driver's growth is Python objects and which is Ray core's own state. Capture the driver benchmark with
memray (``.venv/bin/pip install memray``; not a dependency of sculpt), then read the capture:

    .venv/bin/memray run --native -o /tmp/driver.bin benchmarks/driver_memory.py --shards 1000 --part run
    .venv/bin/python benchmarks/memray_growth.py /tmp/driver.bin [--at 0.3 0.6 0.96] [--frames 4] [--top 25]

Prints the process's RSS and the live bytes memray tracks at each point (fractions of the capture's
snapshots), then the allocation sites whose live bytes changed most from the first point to the last, each with
its live KB at every point: a site that rises at every point grows with the job, one that steps up once and
stays is a table that reached its size. A pymalloc arena (1 MiB) is charged to whichever allocation opened it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import memray

# frames that only say how memory was asked for, not who asked
PLUMBING = ("_Py", "Py", "pymalloc", "gc_alloc", "operator new", "std::", "absl::", "malloc", "new_arena",
            "allocate_from", "void absl", "decltype", "char* std")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("capture", help="a memray capture made with --native (not --aggregate)")
    parser.add_argument("--at", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.96],
                        help="points, as fractions of the capture's snapshots")
    parser.add_argument("--frames", type=int, default=4, help="frames that name a site")
    parser.add_argument("--top", type=int, default=25, help="sites shown")
    args = parser.parse_args()
    reader = memray.FileReader(args.capture)
    snapshots = list(reader.get_memory_snapshots())
    points = [min(int(len(snapshots) * at), len(snapshots) - 1) for at in args.at]

    def live(interval, point: int) -> bool:
        freed = interval.deallocated_before_snapshot
        return interval.allocated_before_snapshot <= point and (freed is None or freed > point)

    by_site: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(points))
    total, arenas = [0] * len(points), [0] * len(points)
    for record in reader.get_temporal_allocation_records(merge_threads=True):
        sizes = [sum(i.n_bytes for i in record.intervals if live(i, p)) for p in points]
        total = [t + s for t, s in zip(total, sizes)]
        if min(sizes) == max(sizes):
            continue
        stack = record.hybrid_stack_trace(max_stacks=60)
        if any(function == "new_arena" for function, _, _ in stack):
            arenas = [a + s for a, s in zip(arenas, sizes)]
        frames = [f"{function[:90]} @ {file.rsplit('/', 1)[-1]}:{line}"
                  for function, file, line in stack if not function.startswith(PLUMBING) and not file.endswith((".c", ".h"))]
        site = by_site[tuple(frames[: args.frames])]
        for k, size in enumerate(sizes):
            site[k] += size
    print("points        ", " ".join(f"{at:>7.2f}" for at in args.at))
    print("RSS MB        ", " ".join(f"{snapshots[p].rss / 2**20:7.0f}" for p in points))
    print("live MB       ", " ".join(f"{t / 2**20:7.1f}" for t in total))
    print(" Python arenas", " ".join(f"{(a - arenas[0]) / 2**20:+7.1f}" for a in arenas), "(MB, from the first point)")
    for site, sizes in sorted(by_site.items(), key=lambda kv: kv[1][0] - kv[1][-1])[: args.top]:
        print(f"\n{(sizes[-1] - sizes[0]) / 1024:+6.0f} KB   live KB at each point: " + " ".join(f"{s / 1024:.0f}" for s in sizes))
        for frame in site or ("(no frame outside the allocator: a pymalloc arena opened deep in the interpreter)",):
            print("   ", frame)


if __name__ == "__main__":
    main()
