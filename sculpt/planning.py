"""Job planning, without Ray: what a job is (its record and fingerprint), which shards it reads, what is already
committed under its output, and the lease that makes it the output's only writer.

A resume that has nothing left, a refused config or an output held by another job is known here, before any
cluster is touched; ``sculpt.pipeline`` runs the plan.
"""

from __future__ import annotations

import dataclasses

import pyarrow.compute as pc

from sculpt import prompts, schema, shards, storage
from sculpt.config import JobConfig
from sculpt.lease import Lease
from sculpt.output import OutputStore, fingerprint
from sculpt.stage import Stage

SCHEMA_VERSION = 2


def job_record(config: JobConfig, stages: list[Stage]) -> dict:
    """What the output depends on; its hash guards a rerun against mixing configs."""
    settings = {
        "schema_version": SCHEMA_VERSION,
        "stages": [stage.describe() for stage in stages],
        "input": {"max_image_pixels": config.input.max_image_pixels, "keep_source_annotations": config.input.keep_source_annotations},
    }
    if any(stage.model_key == "vlm" for stage in stages):
        vlm = dataclasses.asdict(config.vlm)
        settings["vlm"] = {key: value for key, value in vlm.items() if key not in config.vlm.RESOURCE_FIELDS}
    return {
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "model_ids": {stage.name: stage.model_id for stage in stages if stage.model_id},
        "prompts_version": prompts.PROMPTS_VERSION,
    }


def list_shards(config: JobConfig) -> list[str]:
    uris = sorted({uri for pattern in config.input.shards for uri in storage.list_files(pattern, config.s3)})
    if not uris:
        raise FileNotFoundError(f"no .tar shards found in {config.input.shards}")
    names: dict[str, str] = {}
    for uri in uris:
        other = names.setdefault(shards.shard_name(uri), uri)
        if other != uri:
            raise ValueError(f"two shards would write the same output unit {shards.shard_name(uri)!r}: {other} and {uri}")
    return uris


@dataclasses.dataclass
class Plan:
    store: OutputStore
    job: dict
    all_shards: list[str]
    pending: list[str]  # shards to read: those without a committed unit, then those whose errors are redone
    redo: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # shard -> indices of its error rows
    lease: Lease | None = None  # this job's hold on the output, given back when run() ends


def plan(config: JobConfig, stages: list[Stage]) -> Plan:
    """List the shards, check the output against this config (refusing another one) and find what is left.

    Needs no Ray: a resume that has nothing left, or a refused config, is known before any cluster is touched."""
    store = OutputStore(config.output.path, config.s3)
    all_shards = list_shards(config)
    job = {**job_record(config, stages), "inputs": config.input.shards, "total_shards": len(all_shards)}
    lease = Lease(store.uri, config.s3).acquire()  # before prepare() clears what a killed run left
    try:
        committed = store.prepare(job, overwrite=config.output.overwrite)
        pending = [uri for uri in all_shards if shards.shard_name(uri) not in committed]
        redo = _error_rows(store, [uri for uri in all_shards if uri not in pending]) if config.output.redo_errors else {}
    except BaseException:
        lease.release()
        raise
    print(f"[sculpt] {len(all_shards)} shards: {len(all_shards) - len(pending)} already committed, {len(pending)} to do"
          + (f", {sum(map(len, redo.values()))} error rows of {len(redo)} committed to redo" if config.output.redo_errors else "")
          + f"; output {store.uri} (config {job['fingerprint']})", flush=True)
    return Plan(store, job, all_shards, pending + list(redo), redo, lease)


def _error_rows(store: OutputStore, committed_uris: list[str]) -> dict[str, list[int]]:
    """Committed shard -> indices of its image-level error rows (read from the output, not the input)."""
    errored = {m["unit"] for m in store.markers() if m["errors"]}
    redo = {}
    for uri in committed_uris:
        if shards.shard_name(uri) in errored:
            table = store.read_unit(shards.shard_name(uri), columns=["index", "status"])
            redo[uri] = table.filter(pc.equal(table["status"], schema.ERROR))["index"].to_pylist()
    return {uri: indices for uri, indices in redo.items() if indices}
