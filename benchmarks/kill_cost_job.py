"""The job ``benchmarks/kill_cost.py`` runs: ``workflows/annotate.py`` with the chunk gate traced or passed through
and, optionally, Ray Data's own limits set. Test-only: it patches sculpt in this process, never sculpt's files.

    python benchmarks/kill_cost_job.py ARGS-OF-workflows/annotate.py

Environment (read only here):

``KILL_COST_GATE``   ``sculpt`` (default): sculpt's ``ChunkGate``; ``pass``: a gate whose ``take`` never waits, so
                     the readers are bounded only by what Ray Data bounds (the held count and peak are still kept)
``KILL_COST_TRACE``  a file each gate rewrites with ``{"held": n, "peak": n}`` after every take and release, so
                     that a run killed mid-way still tells its peak of chunks read and not yet committed
``KILL_COST_RAY``    JSON of Ray Data limits set on the driver's ``DataContext`` before the job starts:
                     ``object_store_memory`` (bytes: ``execution_options.resource_limits``), ``cpu`` (the same,
                     logical CPUs), ``max_tasks_in_flight_per_actor``, ``gen_buffer_blocks``
                     (``_max_num_blocks_in_streaming_gen_buffer``: blocks a read task may run ahead of the
                     executor), ``downstream_ratio`` (``downstream_capacity_backpressure_ratio``),
                     ``reservation_ratio`` (``op_resource_reservation_ratio``)
"""

from __future__ import annotations

import json
import os
import sys

from sculpt.engine import dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trace(gate) -> None:
    path = gate.trace_path
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump({"held": len(gate.held), "peak": gate.peak}, f)
        os.replace(path + ".tmp", path)


class TracedGate(dataset.ChunkGate):
    """sculpt's gate, unchanged, writing its held count and peak to ``KILL_COST_TRACE``."""

    trace_path = None  # set in the driver: the class travels to the gate's worker by value (it is __main__'s)

    async def take(self, unit, reader, unsent):
        await super().take(unit, reader, unsent)
        _trace(self)

    async def release(self, unit):
        await super().release(unit)
        _trace(self)


class PassGate(TracedGate):
    """Counts the chunks read and not yet committed, as the gate does, and never makes a reader wait."""

    async def take(self, unit, reader, unsent):
        self.held[unit] = reader
        self.peak = max(self.peak, len(self.held))
        _trace(self)


def start_gate(config):
    import ray

    TracedGate.trace_path = os.environ.get("KILL_COST_TRACE")
    kind = PassGate if os.environ.get("KILL_COST_GATE", "sculpt") == "pass" else TracedGate
    return ray.remote(kind).options(num_cpus=0).remote(config.chunk_limit, config.least_chunks_in_flight)


def set_ray_limits(limits: dict) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if "object_store_memory" in limits or "cpu" in limits:
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(
            cpu=limits.get("cpu"), object_store_memory=limits.get("object_store_memory"))
    if "max_tasks_in_flight_per_actor" in limits:
        ctx.max_tasks_in_flight_per_actor = limits["max_tasks_in_flight_per_actor"]
    if "gen_buffer_blocks" in limits:
        ctx._max_num_blocks_in_streaming_gen_buffer = limits["gen_buffer_blocks"]
    if "downstream_ratio" in limits:
        ctx.downstream_capacity_backpressure_ratio = limits["downstream_ratio"]
    if "reservation_ratio" in limits:
        ctx.op_resource_reservation_ratio = limits["reservation_ratio"]


def main() -> None:
    import runpy

    from sculpt.engine import pipeline

    for module in (dataset, pipeline):  # pipeline holds its own name for start_gate
        if hasattr(module, "start_gate"):
            module.start_gate = start_gate
    set_ray_limits(json.loads(os.environ.get("KILL_COST_RAY") or "{}"))
    sys.argv[0] = os.path.join(ROOT, "workflows", "annotate.py")
    runpy.run_path(sys.argv[0], run_name="__main__")  # the workflow, as `python workflows/annotate.py ARGS`


if __name__ == "__main__":
    main()
