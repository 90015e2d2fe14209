"""Job configuration: a YAML file, then ``--set key=value`` overrides, checked against these dataclasses.

Every field is described where it is declared. Unknown keys are errors that name the key and the known ones.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from sculpt.annotation import images
from sculpt.models import DEFAULT_MODELS
from sculpt import errors
from sculpt.stage import Resources, Stage
from sculpt.io.storage import S3Options


def _at_least(obj, minimum, *names, integer=True) -> None:
    """Refuse a field below ``minimum`` (or not a number), naming the field and what it takes."""
    for name in names:
        value = getattr(obj, name)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
            raise ConfigError(f"{name}={value!r}: must be {'an integer' if integer else 'a number'} >= {minimum}")


@dataclass
class InputConfig:
    shards: list[str] = field(default_factory=list)  # SA-1B tars: files, directories, globs, s3://bucket/prefix
    readers: int = 2  # chunks read at the same time (each a streaming task holding one CPU)
    batch_images: int = 16  # images per batch a reader yields (Ray Data gathers them into blocks: ray.block_bytes)
    # images per output unit (a chunk of a shard: its own Parquet file and marker); a kill loses the chunks in
    # flight, and a resume starts each shard at its first unfinished chunk
    chunk_images: int = 1000
    # chunks read and not yet written, job-wide: a kill loses at most these (plus, for a shard read in order from
    # S3 or a compressed tar, the one its reader may read past them while its last rows are gathered into a block,
    # or more when a chunk is smaller than two blocks). At least one more than the sum of every stage's
    # batch_size - 1 (JobConfig.least_chunks_in_flight); None: that plus one per reader, or two per reader if more.
    # The chain needs about its images/s times its seconds per image in flight to keep every stage busy
    chunks_in_flight: int | None = None
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS  # larger images become error rows (decompression bombs)
    keep_source_annotations: bool = False  # carry SA-1B's own masks into the output (large)

    def __post_init__(self):
        _at_least(self, 1, "readers", "batch_images", "chunk_images", "max_image_pixels")
        if self.chunks_in_flight is not None:
            _at_least(self, 1, "chunks_in_flight")


@dataclass
class OutputConfig:
    path: str = "sculpt-out"  # local directory or s3://bucket/prefix; one Parquet file per chunk of a shard
    writers: int = 2  # write tasks at once, in the cluster: the last stage's rows to part files
    committers: int = 8  # unit commits at once, in the cluster: each gathers a unit's part files into its file
    overwrite: bool = False  # replace output written with a different config instead of refusing to run
    # process again only the error rows of committed units (e.g. after fixing a node's model path), keeping every
    # good row; same config as the output's
    redo_errors: bool = False

    def __post_init__(self):
        _at_least(self, 1, "writers", "committers")


@dataclass
class StageConfig:
    name: str  # a built-in stage (see sculpt.config.BUILTIN_STAGES) or any name when `class` is given
    cls: str | None = None  # "module:Class" of a sculpt.stage.Stage subclass; YAML key `class`
    batch_size: int = 8  # images per process() call
    actors: int = 1  # fixed actor pool size
    cpus: float = 1.0  # per actor
    gpus: float = 0.0  # per actor; fractions share a GPU
    memory_gb: float = 0.0  # per actor reservation
    batches_in_flight: int = 2  # batches per actor at once: one on the device while the next is decoded on the host
    params: dict = field(default_factory=dict)  # the stage's own settings (model id, prompts, thresholds)

    def __post_init__(self):
        _at_least(self, 1, "batch_size", "actors", "batches_in_flight")
        _at_least(self, 0, "cpus", "gpus", "memory_gb", integer=False)


@dataclass
class ModelsConfig:
    """A Hugging Face model id or a local directory per model; `sculpt models tiny DIR` writes offline ones."""

    vlm: str = DEFAULT_MODELS["vlm"]  # caption and refer (InternVL through vLLM)
    ground: str = DEFAULT_MODELS["ground"]  # Florence-2
    mask: str = DEFAULT_MODELS["mask"]  # SAM2 (an id known to the sam2 package, or a directory)
    verify: str = DEFAULT_MODELS["verify"]  # EVF-SAM2 (YxZhang/evf-sam2-multitask adds "[semantic] ")


@dataclass
class VLMConfig:
    """The one vLLM engine pool that serves both the caption and the refer stage."""

    replicas: int = 1  # engines in the pool; all requests about one image go to the same engine
    gpus: float = 1.0  # per engine; a fraction shares the GPU and sets vLLM's gpu_memory_utilization to match
    cpus: float = 1.0  # per engine
    tensor_parallel: int = 1  # >1: each engine spans this many whole GPUs of one node (a placement group)
    max_tiles: int = 6  # InternVL dynamic tiling: at most this many 448-px tiles per image (+ a thumbnail)
    min_tiles: int = 1
    # requests one engine holds at once, from all caption and refer actors together: vLLM's continuous batching
    # schedules them as one batch (its own max_num_seqs bounds what runs per step)
    max_in_flight: int = 256
    max_model_len: int = 8192
    dtype: str = "auto"  # vLLM's: "auto" takes the checkpoint's (bfloat16), float16 on GPUs without bfloat16
    trust_remote_code: bool = False  # run the checkpoint's own Python code (remote-code InternVL2/2.5 ids need it)
    enforce_eager: bool = False  # skip CUDA graphs / torch.compile (faster start, slower decode)
    engine_kwargs: dict = field(default_factory=dict)  # any other vllm.LLM argument

    RESOURCE_FIELDS = ("replicas", "gpus", "cpus", "tensor_parallel", "max_in_flight")

    def __post_init__(self):
        _at_least(self, 1, "replicas", "tensor_parallel", "min_tiles", "max_model_len", "max_in_flight")
        _at_least(self, self.min_tiles, "max_tiles")
        _at_least(self, 0, "gpus", "cpus", integer=False)


@dataclass
class FaultsConfig:
    """What is retried and when a job stops. sculpt/errors.py decides what is transient: connection resets, S3
    throttling and 5xx, CUDA out-of-memory and device errors, a dead vLLM engine or actor."""

    attempts: int = 3  # tries of a stage batch (then of each of its images) that hits a transient fault
    backoff_seconds: float = 2.0  # wait before the first retry; doubles with each retry
    read_attempts: int = 5  # opens of a shard's stream after storage faults, each resuming where it broke
    # A unit where one model stage fails more than this share of the images is not committed and the job stops:
    # a misconfigured cluster must not write a dataset of error rows. 1.0 turns the check off.
    max_error_share: float = 0.2
    min_errors: int = 3  # ...and at least this many images, so that one bad image in a small unit stops nothing

    def __post_init__(self):
        _at_least(self, 1, "attempts", "read_attempts")
        _at_least(self, 0, "backoff_seconds", "max_error_share", integer=False)
        _at_least(self, 0, "min_errors")
        if self.max_error_share > 1:
            raise ConfigError(f"max_error_share={self.max_error_share}: a share, between 0 and 1")


@dataclass
class RayConfig:
    address: str | None = None  # None: the cluster of `ray job submit` / RAY_ADDRESS, else a new local Ray
    num_cpus: int | None = None  # logical CPUs of a new local Ray (None: the machine's)
    num_gpus: int | None = None  # logical GPUs of a new local Ray (None: the machine's)
    # Ray Data's target_max_block_size for the job: a task's rows move on as a block once it gathers this many
    # bytes (or at its end). A reader of a shard read in order waits at input.chunks_in_flight once a chunk is
    # followed by two blocks (SA-1B: 1,000 images ~600 MB, ~4.7 blocks). Smaller blocks keep less in a reader but
    # schedule more: 16 MiB cut a 4-node benchmark on 2 cores from 0.81 to 0.33 of its bound (docs/BENCHMARKS.md)
    block_bytes: int = 128 << 20

    def __post_init__(self):
        _at_least(self, 1, "block_bytes")


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    s3: S3Options = field(default_factory=S3Options)  # endpoint/region for s3:// paths; keys from AWS env vars
    ray: RayConfig = field(default_factory=RayConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    stages: list[StageConfig] = field(default_factory=lambda: default_stages())  # run in this order
    progress_seconds: float = 10.0  # how often the driver prints progress

    def __post_init__(self):
        wanted, least = self.input.chunks_in_flight, self.least_chunks_in_flight
        if wanted is not None and wanted < least:
            raise ConfigError(f"input.chunks_in_flight={wanted}: the stages' batches can hold back {least - 1} chunks' "
                              f"last rows; set it to at least {least}, or lower the stages' batch_size")

    @property
    def least_chunks_in_flight(self) -> int:
        """Ray Data holds up to ``batch_size - 1`` rows before each stage until a full batch comes, and those may be
        as many chunks' last rows, which free no place; with one place more than all stages can hold, some chunk
        always moves (chunks of 1 image, a bound of 1 and a batch of 4 stopped the pipeline: measured)."""
        return 1 + sum(stage.batch_size - 1 for stage in self.stages)

    @property
    def chunk_limit(self) -> int:
        """The most chunks read and not yet written at once: ``input.chunks_in_flight``, or else the least that is
        safe plus one per reader (what lets a reader of a shard read in order wait at the bound: ``ChunkGate``) or two
        per reader (one being read, one in the stages), whichever is more."""
        readers = self.input.readers
        return self.input.chunks_in_flight or max(self.least_chunks_in_flight + readers, 2 * readers)


# Stage names the workflow knows without a `class`, in chain order: the default `stages` of a job.
BUILTIN_STAGES: dict[str, str] = {
    "caption": "actors.caption:Captioner",
    "ground": "actors.ground:Grounder",
    "mask": "actors.mask:Masker",
    "refer": "actors.refer:Referrer",
    "verify": "actors.verify:Verifier",
}
# Per-stage defaults of the built-in stages (anything a stage's config leaves out). The VLM stages' actors only
# wait on the engine pool, so each keeps 8 batches in flight: with 2, requests waiting on a busy engine left others
# idle (4 nodes: 0.40 of the engines' bound, 0.88-0.92 with 8; docs/BENCHMARKS.md).
STAGE_DEFAULTS: dict[str, dict] = {
    # CPU clients of the VLM engine pool
    "caption": {"cpus": 0.5, "actors": 2, "batch_size": 8, "batches_in_flight": 8},
    "ground": {"gpus": 0.25, "batch_size": 8},  # Florence-2-large, ~0.8 B
    "mask": {"gpus": 0.25, "batch_size": 8},  # SAM2-L, ~0.2 B
    "refer": {"cpus": 0.5, "actors": 2, "batch_size": 4, "batches_in_flight": 8},
    "verify": {"gpus": 0.5, "batch_size": 8},  # EVF-SAM2, ~0.9 B
}


def default_stages() -> list[StageConfig]:
    return [StageConfig(name=name, **STAGE_DEFAULTS.get(name, {})) for name in BUILTIN_STAGES]


class ConfigError(errors.JobError, ValueError):
    pass


def _build(cls, data: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    data = dict(data)
    if cls is StageConfig and "class" in data:
        data["cls"] = data.pop("class")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f, path = fields[name], f"{where}.{name}" if where else name
        if name == "stages":
            if not isinstance(value, list):
                raise ConfigError("stages: expected a list of stage mappings")
            kwargs[name] = [_build(StageConfig, {**STAGE_DEFAULTS.get(v.get("name"), {}), **v} if isinstance(v, dict) else v,
                                   f"stages[{i}]") for i, v in enumerate(value)]
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = _build(f.default_factory, value or {}, path)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _set(tree: dict, dotted: str, value: Any) -> None:
    """Apply one override; list items are addressed by index or, for stages, by name (stages.caption.gpus=0.5)."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for i, key in enumerate([*parents, leaf]):
        last = i == len(parents)
        if isinstance(node, list):
            matches = [j for j, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key]
            if key.isdigit() and int(key) < len(node):
                index = int(key)
            elif matches:
                index = matches[0]
            else:
                raise ConfigError(f"--set {dotted}: no list item {key!r}")
            if last:
                node[index] = value
            node = node[index]
        elif last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def load(path: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """Config from an optional YAML file plus ``key.path=value`` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    if "stages" not in tree and any(item.startswith("stages.") for item in overrides):
        tree["stages"] = [{"name": name} for name in BUILTIN_STAGES]  # overriding the default chain
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        _set(tree, key.strip(), yaml.safe_load(raw))
    return _build(JobConfig, tree, "")


def build_stages(config: JobConfig) -> list[Stage]:
    return [build_stage(stage, config.models) for stage in config.stages]


def build_stage(cfg: StageConfig, models: ModelsConfig = ModelsConfig()) -> Stage:
    target = cfg.cls or BUILTIN_STAGES.get(cfg.name)
    if not target:
        raise ConfigError(f"stage {cfg.name!r}: not a built-in stage ({sorted(BUILTIN_STAGES) or 'none yet'}); give its `class: module:Class`")
    module, _, qualname = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"stage {cfg.name!r}: cannot import {target!r} ({exc})") from None
    resources = Resources(cpus=cfg.cpus, gpus=cfg.gpus, memory_gb=cfg.memory_gb, actors=cfg.actors,
                          batches_in_flight=cfg.batches_in_flight)
    params = dict(cfg.params)
    if cls.model_key:
        params.setdefault("model", getattr(models, cls.model_key))
    stage = cls(resources, batch_size=cfg.batch_size, **params)
    stage.name = cfg.name
    return stage
