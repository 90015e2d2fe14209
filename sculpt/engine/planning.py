"""Job planning: what a job is (its record and fingerprint), which shards it reads and what is already committed
under its output. It reads and never writes: a resume that has nothing left or a refused config is known here,
before any cluster is touched or anything is written; ``sculpt.engine.job`` then takes the output and runs the plan.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow.compute as pc

from sculpt.annotation import profiles, prompts
from sculpt import errors, schema
from sculpt.io import exclude, inputs, shards, storage
from sculpt.config import JobConfig
from sculpt.engine.vlm import profile_of
from sculpt.outputs.store import OutputStore, fingerprint, shard_done
from sculpt.stage import Stage

SCHEMA_VERSION = 5  # 3: units are chunks of shards; 4: objects carry reject_reason; 5: style, target (reasoning), chat


def job_record(config: JobConfig, stages: list[Stage], source: inputs.Source | None = None) -> dict:
    """What the output depends on; its hash guards a rerun against mixing configs. ``source``: the input's kind
    (``find_input``), recorded unless it is SA-1B's (whose outputs keep the fingerprint they had before kinds)."""
    settings = {
        "schema_version": SCHEMA_VERSION,
        "stages": [stage.describe() for stage in stages],
        "input": {"max_image_pixels": config.input.max_image_pixels, "keep_source_annotations": config.input.keep_source_annotations,
                  "chunk_images": config.input.chunk_images},
    }
    if source is not None and source.settings():
        settings["input"]["source"] = source.settings()
    if config.input.exclude:  # the list's content, not its path: another list is another config (none: as before)
        settings["input"]["exclude"] = exclude.load(config.input.exclude, config.s3).digest()
    record = {}
    if any(stage.model_key == "vlm" for stage in stages):
        vlm = dataclasses.asdict(config.vlm)
        settings["vlm"] = {key: value for key, value in vlm.items()
                           if key not in config.vlm.RESOURCE_FIELDS and key != "profile"}
        labels = vlm_profiles(config, stages)
        record["vlm_profile"] = ",".join(labels)
        if labels != [profiles.INTERNVL.label]:  # InternVL's outputs keep the fingerprint they had before profiles
            settings["vlm"]["profile"] = record["vlm_profile"]
    return {
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "model_ids": {stage.name: stage.model_id for stage in stages if stage.model_id},
        "prompts_version": prompts.PROMPTS_VERSION,
        **record,
    }


def vlm_profiles(config: JobConfig, stages: list[Stage]) -> list[str]:
    """Resolve ``vlm.profile`` for each VLM stage's model once, here (auto: its checkpoint's config.json, or its
    name), and hand the stages the result, so that every actor of the job speaks the one recorded; the profiles'
    labels (name-version), sorted."""
    labels = set()
    for stage in stages:
        if stage.model_key == "vlm":
            profile = profile_of(config.vlm.profile, stage.model_id)
            stage.profile = profile.name
            labels.add(profile.label)
    return sorted(labels)


def configured_source(config: JobConfig) -> inputs.Source:
    """The input's kind and options as the config gives them (``kind`` may still be auto)."""
    cfg = config.input
    return inputs.Source(cfg.kind, tuple(e.lower().lstrip(".") for e in cfg.image_extensions), cfg.image_column,
                         cfg.id_column)


def find_input(config: JobConfig, store: OutputStore | None = None) -> tuple[inputs.Source, list[str]]:
    """The input's kind (``input.kind``, or what the files show) and its shards, sorted (``inputs.find``). An input
    that names none, a path that is not there, two shards that would write one output unit (``errors.BadInput``)
    or a store that cannot be listed (``errors.StoreFailure``: S3 unreachable or refusing) end the job with one
    line. ``store``: the output, whose job file says which kind its tars are (auto: not read from the input again).
    """
    recorded = None
    if store is not None and config.input.kind == "auto":
        with errors.at_job_level(store.uri):
            job = store.job()
        recorded = inputs.Source.of_job(job).kind if job is not None else None
    return inputs.find(config.input.shards, config.input.kind, config.s3, configured_source(config), recorded)


def list_shards(config: JobConfig) -> list[str]:
    """Every shard the input names, sorted (``find_input``)."""
    return find_input(config)[1]


@dataclasses.dataclass
class Plan:
    store: OutputStore
    job: dict
    all_shards: list[str]
    segments: list[shards.Segment]  # what to read: each shard's unfinished chunks, then the chunks whose errors are redone
    redo: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # unit -> indices of its error rows
    committed: set[str] = dataclasses.field(default_factory=set)  # units committed before this run
    last_chunks: dict[str, int] = dataclasses.field(default_factory=dict)  # shard -> its last chunk, where committed
    source: inputs.Source = inputs.Source()  # the input's kind
    # a folder of images -> its listing, to be recorded in the output before anything is read (first run)
    listings: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def shard_done(self, shard: str, committed: set[str]) -> bool:
        """Every chunk of the shard, up to its last, is among ``committed`` (``store.shard_done``)."""
        last = self.last_chunks.get(shard, -1)
        return shard_done({chunk for chunk in range(last + 1) if shards.unit_name(shard, chunk) in committed},
                          self.last_chunks.get(shard))


def plan(config: JobConfig, stages: list[Stage]) -> Plan:
    """List the shards, check the output against this config (refusing another one) and find what is left.

    Needs no Ray: a resume that has nothing left, or a refused config, is known before any cluster is touched.
    A shard's chunks are found from their markers: a resume starts each unfinished run of chunks where the chunk
    before it ended, and reads no committed chunk."""
    store = OutputStore(config.output.path, config.s3)
    source, all_shards = find_input(config, store)
    # local inputs as absolute paths: export and preview find the shards from wherever they are run
    patterns = [pattern if storage.is_s3(pattern) else os.path.abspath(pattern) for pattern in config.input.shards]
    job = {**job_record(config, stages, source), "inputs": patterns, "total_shards": len(all_shards),
           **({"exclude": config.input.exclude} if config.input.exclude else {})}
    replaced = store.replaces(job, config.output.overwrite)
    committed = set() if replaced else store.committed()
    listings, unrecorded = _listings(store, source, all_shards, replaced)
    by_shard: dict[str, set[int]] = {}
    for unit in committed:
        shard, chunk = shards.parse_unit(unit)
        by_shard.setdefault(shard, set()).add(chunk)
    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda uri: _unfinished(store, uri, by_shard.get(shards.shard_name(uri), set()),
                                                      config.input.chunk_images), all_shards))
    segments = [segment for shard_segments, _ in found for segment in shard_segments]
    last_chunks = {shards.shard_name(uri): last for uri, (_, last) in zip(all_shards, found) if last is not None}
    uris = {shards.shard_name(uri): uri for uri in all_shards}
    # errors are redone in the shards of this job's input only (an output may hold more than one input's shards)
    redo = {}
    if config.output.redo_errors:
        redo = {unit: rows for unit, rows in _error_rows(store, committed).items()
                if shards.parse_unit(unit)[0] in uris}
    for unit, indices in list(redo.items()):
        shard, chunk = shards.parse_unit(unit)
        end = _marker(store, shard, chunk)["end"]
        if end.get("members") is not None:
            start = shards.Position(chunk, end["offset"], end["members"], end["index"])
        elif chunk == 0 or shards.unit_name(shard, chunk - 1) in committed:
            start = _start(store, shard, chunk)  # a marker from before sculpt recorded a chunk's own start
        else:
            print(f"[sculpt] {unit}: its error rows are redone in a run after chunk {chunk - 1} is committed")
            del redo[unit]
            continue
        segments.append(shards.Segment(uris[shard], config.input.chunk_images, start, chunk + 1,
                                       None if end["last"] else end["next_offset"], {chunk: indices}))
    if listings:  # a folder's segments carry their part of its listing
        segments = [inputs.with_files(seg, listings[shards.shard_name(seg.uri)]) for seg in segments]
    shards_done = sum(shard_done(by_shard.get(shard, set()), last) for shard, last in last_chunks.items())
    print(f"[sculpt] {len(all_shards)} shards: {shards_done} done, {len(committed)} chunks committed, "
          f"{len(segments) - len(redo)} run(s) of chunks to read"
          + (f", {sum(map(len, redo.values()))} error rows of {len(redo)} committed chunks to redo" if config.output.redo_errors else "")
          + f"; output {store.uri} (config {job['fingerprint']})", flush=True)
    return Plan(store, job, all_shards, segments, redo, committed, last_chunks, source,
                {name: listings[name] for name in unrecorded})


def _listings(store: OutputStore, source: inputs.Source, uris: list[str], replaced: bool):
    """A folder input's listings: each as the output recorded it at the job's first run (files added since are not
    read, and no committed chunk shifts), else as listed now; and the folders whose listing is not yet recorded."""
    if source.kind != "images":
        return {}, set()

    def listing(uri: str):
        name = shards.shard_name(uri)
        recorded = None if replaced else inputs.read_listing(store.uri, name, store.s3)
        return name, recorded if recorded is not None else inputs.list_images(uri, source, store.s3), recorded is None

    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(listing, uris))
    return {name: files for name, files, _ in found}, {name for name, _, new in found if new}


def _unfinished(store: OutputStore, uri: str, chunks: set[int], chunk_images: int) -> tuple[list[shards.Segment], int | None]:
    """The runs of a shard's chunks not yet committed, each starting where its committed predecessor ended, and the
    shard's last chunk if it is committed."""
    if not chunks:
        return [shards.Segment(uri, chunk_images)], None
    shard, top = shards.shard_name(uri), max(chunks)
    segments, chunk = [], 0
    while chunk <= top:
        if chunk in chunks:
            chunk += 1
            continue
        stop = min(c for c in chunks if c > chunk)
        segments.append(shards.Segment(uri, chunk_images, _start(store, shard, chunk), stop,
                                       _marker(store, shard, stop)["end"]["offset"]))
        chunk = stop
    end = _marker(store, shard, top)["end"]
    if not end["last"]:
        segments.append(shards.Segment(uri, chunk_images, _start(store, shard, top + 1, end)))
    return segments, top if end["last"] else None


def _marker(store: OutputStore, shard: str, chunk: int) -> dict:
    return json.loads(storage.read_bytes(store.marker_uri(shards.unit_name(shard, chunk)), store.s3))


def _start(store: OutputStore, shard: str, chunk: int, end: dict | None = None) -> shards.Position:
    """Where a chunk begins: the tar's start, or where its predecessor's marker says."""
    if chunk == 0:
        return shards.Position()
    end = end or _marker(store, shard, chunk - 1)["end"]
    return shards.Position(chunk, end["next_offset"], end["next_members"], end["next_index"])


def _error_rows(store: OutputStore, committed: set[str]) -> dict[str, list[int]]:
    """Committed unit -> indices of its image-level error rows (read from the output, not the input)."""
    redo = {}
    for unit in sorted(m["unit"] for m in store.markers() if m["errors"] and m["unit"] in committed):
        table = store.read_unit(unit, columns=["index", "status"])
        redo[unit] = table.filter(pc.equal(table["status"], schema.ERROR))["index"].to_pylist()
    return {unit: indices for unit, indices in redo.items() if indices}
