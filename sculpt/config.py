"""Job configuration: a YAML file, then ``--set key=value`` overrides, checked against these dataclasses.

Every field is typed and described where it is declared. A value its type does not take is refused at load, naming
the key, the value and what the key takes; unknown keys name the known ones. ``check_models`` (``build_stages`` calls
it) refuses model paths and ids that cannot load, before any cluster starts."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import yaml

from sculpt.annotation import images
from sculpt.models import DEFAULT_MODELS
from sculpt import errors
from sculpt.stage import BUILTIN_STAGES, STAGE_DEFAULTS, Resources, Stage
from sculpt.io.storage import S3Options


class AtLeast(typing.NamedTuple):  # in a number field's Annotated type: its least value
    minimum: float


Count = Annotated[int, AtLeast(1)]  # an integer >= 1
Natural = Annotated[int, AtLeast(0)]  # an integer >= 0
Amount = Annotated[float, AtLeast(0)]  # a number >= 0 (an integer is kept as written: it is in job fingerprints)


class _Checked:  # a config section whose fields are checked against their types whenever one is made
    def __post_init__(self):
        _check(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass
class InputConfig(_Checked):
    shards: list[str] = field(default_factory=list)  # files, directories, globs, s3://bucket/prefix (input.kind)
    # what input.shards holds (sculpt/io/inputs.py): SA-1B tars, folders of images, WebDataset tars or Parquet files;
    # auto: what the files show (tars whose first member is sa_<id>.* are SA-1B, other tars WebDataset)
    kind: Literal["auto", "sa1b", "images", "webdataset", "parquet"] = "auto"
    # images: the files of a folder read; webdataset: the member of a sample that is its image
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    image_column: str = "image"  # parquet: the encoded image: bytes, a path, or Hugging Face's {bytes, path}
    id_column: str | None = None  # parquet: each image's id (its image_key); None: its row's position in its file
    readers: Count = 2  # chunks read at the same time (each a streaming task holding one CPU)
    batch_images: Count = 16  # images per batch a reader yields (Ray Data gathers them into blocks: ray.block_bytes)
    chunk_images: Count = 1000  # images per output unit (a chunk of a shard: its own Parquet file and marker)
    # chunks read and not yet written, job-wide: a kill loses at most these (plus, for a shard read in order from
    # S3 or a compressed tar, the one its reader may read past them while its last rows are gathered into a block,
    # or more when a chunk is smaller than two blocks). At least one more than the sum of every stage's
    # batch_size - 1 (JobConfig.least_chunks_in_flight); None: that plus one per reader, or two per reader if more.
    # The chain needs about its images/s times its seconds per image in flight to keep every stage busy
    chunks_in_flight: Count | None = None
    max_image_pixels: Count = images.DEFAULT_MAX_PIXELS  # larger images become error rows (decompression bombs)
    keep_source_annotations: bool = False  # carry SA-1B's own masks into the output (large)
    exclude: str | None = None  # a file (local or s3://) of image ids or file names to skip unread (io/exclude.py)


@dataclass
class OutputConfig(_Checked):
    path: str = "sculpt-out"  # local directory or s3://bucket/prefix; one Parquet file per chunk of a shard
    writers: Count = 2  # write tasks at once, in the cluster: the last stage's rows to part files
    committers: Count = 8  # unit commits at once, in the cluster: each gathers a unit's part files into its file
    overwrite: bool = False  # replace output written with a different config instead of refusing to run
    # process again only the error rows of committed units (e.g. after fixing a node's model path), keeping every
    # good row; same config as the output's
    redo_errors: bool = False


@dataclass
class StageConfig(_Checked):
    name: str  # a built-in stage (see sculpt.stage.BUILTIN_STAGES) or any name when `class` is given
    cls: str | None = None  # "module:Class" of a sculpt.stage.Stage subclass; YAML key `class`
    batch_size: Count = 8  # images per process() call
    actors: Count = 1  # fixed actor pool size
    cpus: Amount = 1.0  # per actor
    gpus: Amount = 0.0  # per actor; fractions share a GPU
    memory_gb: Amount = 0.0  # per actor reservation
    batches_in_flight: Count = 2  # batches per actor at once: one on the device while the next is decoded on the host
    params: dict[str, Any] = field(default_factory=dict)  # the stage's own settings (model id, prompts, thresholds)


@dataclass
class ModelsConfig(_Checked):
    """A Hugging Face model id or a local directory per model; `sculpt models tiny DIR` writes offline ones."""

    vlm: str = DEFAULT_MODELS["vlm"]  # caption and refer (InternVL through vLLM)
    ground: str = DEFAULT_MODELS["ground"]  # Florence-2
    mask: str = DEFAULT_MODELS["mask"]  # SAM2 (an id known to the sam2 package, or a directory)
    verify: str = DEFAULT_MODELS["verify"]  # EVF-SAM2 (YxZhang/evf-sam2-multitask adds "[semantic] ")
    instances: str = DEFAULT_MODELS["instances"]  # SAM 3 (transformers' Sam3Model): every instance of each kind


@dataclass
class VLMConfig(_Checked):
    """The one vLLM engine pool that serves both the caption and the refer stage."""

    replicas: Count = 1  # engines in the pool; all requests about one image go to the same engine
    gpus: Amount = 1.0  # per engine; a fraction shares the GPU and sets vLLM's gpu_memory_utilization to match
    cpus: Amount = 1.0  # per engine
    tensor_parallel: Count = 1  # >1: each engine spans this many whole GPUs of one node (a placement group)
    max_tiles: Count = 6  # InternVL dynamic tiling: at most this many 448-px tiles per image (+ a thumbnail)
    min_tiles: Count = 1  # ...and at least this many
    # the VLM family's prompts and box convention (sculpt/annotation/profiles.py); auto: the checkpoint's config.json
    profile: Literal["auto", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "auto"
    # requests one engine holds at once, from all caption and refer actors together: vLLM's continuous batching
    # schedules them as one batch (its own max_num_seqs bounds what runs per step). With an endpoint: the job's
    max_in_flight: Count = 256
    # an OpenAI-compatible server to ask instead (http://host:port/v1): no engine starts, models.vlm is the name it
    # serves its model under, the pool's other settings are the server's own (README: "A VLM server you already run")
    endpoint: str | None = None
    api_key_env: str = "SCULPT_VLM_API_KEY"  # the variable holding its API key, if any (on every node; never written)
    timeout_seconds: Amount = 300.0  # one request to it; a request past it is retried as a transient fault
    processor: str | None = None  # endpoint: the served checkpoint (for Qwen2.5-VL's resize rule) if models.vlm is none
    max_model_len: Count = 8192  # tokens of one request, image tokens included
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"  # vLLM's; auto: the checkpoint's
    trust_remote_code: bool = False  # run the checkpoint's own Python code (remote-code InternVL2/2.5 ids need it)
    enforce_eager: bool = False  # skip CUDA graphs / torch.compile (faster start, slower decode)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM argument

    RESOURCE_FIELDS = ("replicas", "gpus", "cpus", "tensor_parallel", "max_in_flight", "endpoint", "api_key_env",
                       "timeout_seconds", "processor")  # not in the fingerprint: where and how fast, not what is made

    def __post_init__(self):
        super().__post_init__()
        if self.max_tiles < self.min_tiles:
            raise ConfigError(f"max_tiles={self.max_tiles!r}: must be an integer >= {self.min_tiles} (min_tiles)")
        if self.tensor_parallel > 1 and self.gpus not in (0, 1):
            raise ConfigError(f"gpus={self.gpus:g} with tensor_parallel: each shard takes a whole GPU; set vlm.gpus=1")
        if self.endpoint is not None and not re.match(r"https?://[^/]", self.endpoint):
            raise ConfigError(f"endpoint={self.endpoint!r}: must be an http:// or https:// URL, e.g. http://host:8000/v1")


@dataclass
class FaultsConfig(_Checked):
    """What is retried and when a job stops. sculpt/errors.py decides what is transient (its table, RULES):
    connection resets, S3 throttling and 5xx, CUDA out-of-memory and device errors, a dead vLLM engine or actor.
    The README's Faults table gives the worst-case tries these make (S3 requests: s3.retry_attempts)."""

    attempts: Count = 3  # tries on a transient fault: of a stage batch (then each image), an actor's setup, an engine's start
    backoff_seconds: Amount = 2.0  # wait before the first retry (or reopen); doubles with each retry
    read_attempts: Count = 5  # opens of a shard's stream after storage faults, each resuming where it broke
    # a VLM engine call in flight when its engine died is sent to the restarted engine this many times more (Ray's
    # max_task_retries); a call the engine dies on every time leaves its images pending instead of more restarts
    engine_call_retries: Natural = 2
    # restarts of a stage actor that one batch may cost by breaking the device (an illegal memory access, a
    # device-side assert: the process's CUDA context is unusable) before it is left pending, untried
    broken_device_limit: Count = 2
    # A unit where one model stage fails more than this share of the images is not committed and the job stops:
    # a misconfigured cluster must not write a dataset of error rows. 1.0 turns the check off.
    max_error_share: Amount = 0.2
    min_errors: Natural = 3  # ...and at least this many images, so that one bad image in a small unit stops nothing

    def __post_init__(self):
        super().__post_init__()
        if self.max_error_share > 1:
            raise ConfigError(f"max_error_share={self.max_error_share}: a share, between 0 and 1")


@dataclass
class RayConfig(_Checked):
    address: str | None = None  # None: the cluster of `ray job submit` / RAY_ADDRESS, else a new local Ray
    num_cpus: Natural | None = None  # logical CPUs of a new local Ray (None: the machine's)
    num_gpus: Natural | None = None  # logical GPUs of a new local Ray (None: the machine's)
    # Ray Data's target_max_block_size for the job: a task's rows move on as a block once it gathers this many
    # bytes (or at its end). A reader of a shard read in order waits at input.chunks_in_flight once a chunk is
    # followed by two blocks (SA-1B: 1,000 images ~600 MB, ~4.7 blocks). Smaller blocks keep less in a reader but
    # schedule more: 16 MiB cut a 4-node benchmark on 2 cores from 0.81 to 0.33 of its bound (docs/BENCHMARKS.md)
    block_bytes: Count = 128 << 20


@dataclass
class JobConfig(_Checked):
    input: InputConfig = field(default_factory=InputConfig)  # what is read
    output: OutputConfig = field(default_factory=OutputConfig)  # where the rows go
    s3: S3Options = field(default_factory=S3Options)  # endpoint/region for s3:// paths; keys from AWS env vars
    ray: RayConfig = field(default_factory=RayConfig)  # the cluster
    models: ModelsConfig = field(default_factory=ModelsConfig)  # checkpoints (check_models)
    vlm: VLMConfig = field(default_factory=VLMConfig)  # the VLM engine pool
    faults: FaultsConfig = field(default_factory=FaultsConfig)  # retries and the error budget
    stages: list[StageConfig] = field(default_factory=lambda: default_stages())  # run in this order
    progress_seconds: Amount = 10.0  # how often the driver prints progress

    def __post_init__(self):
        super().__post_init__()
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


def default_stages() -> list[StageConfig]:
    return [StageConfig(name=name, **STAGE_DEFAULTS.get(name, {})) for name in BUILTIN_STAGES]


class ConfigError(errors.JobError, ValueError):
    pass


def _accepts(hint, value) -> bool:
    """Whether ``value`` is of type ``hint``, strictly: a bool is no integer, a string no number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _accepts(args[0], value) and value >= args[1].minimum
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (list, dict):  # a list's items, a dict's keys
        return isinstance(value, origin) and all(_accepts(args[0], item) for item in value)
    if hint in (int, float):
        return type(value) in ((int,) if hint is int else (int, float)) and math.isfinite(value)
    return hint is Any or isinstance(value, hint)  # bool, str, None, a section's dataclass


def _describe(hint) -> str:
    """What a type takes, in the config's words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return f"{_describe(args[0])} >= {args[1].minimum}"
    if origin in (Union, types.UnionType):
        return " or ".join(map(_describe, args))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"a list ({_describe(args[0])} each)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
            dict: "a mapping"}.get(origin or hint) or f"a {hint.__name__} mapping"


def _check(cls, values: dict) -> None:
    """Refuse a value its field's type does not accept, naming the field, the value and what the field takes."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, value in values.items():
        if not _accepts(hints[name], value):
            raise ConfigError(f"{name}={value!r}: must be {_describe(hints[name])}")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    data = dict(data)
    if cls is StageConfig and "class" in data:
        data["cls"] = data.pop("class")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in data and f.default is f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or 'config'}: {', '.join(missing)} missing")
    kwargs, hints = {}, typing.get_type_hints(cls, include_extras=True)
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        if cls is JobConfig and name == "stages":
            if not isinstance(value, list):
                raise ConfigError("stages: expected a list of stage mappings")
            value = [_build(StageConfig, {**STAGE_DEFAULTS.get(str(v.get("name")), {}), **v} if isinstance(v, dict) else v,
                            f"stages[{i}]") for i, v in enumerate(value)]
        elif isinstance(hints[name], type) and dataclasses.is_dataclass(hints[name]):
            value = _build(hints[name], {} if value is None else value, path)
        kwargs[name] = value
    try:
        _check(cls, kwargs)  # here too for sections that do not check themselves (s3: sculpt.io.storage.S3Options)
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
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parents[:i])} is {node!r}, not a mapping")
        elif last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except OSError as exc:  # not found, a directory, not allowed
        raise ConfigError(f"config file {path!r}: {exc.strerror or exc}; copy workflows/annotate.yaml (every key is "
                          "described in sculpt/config.py) there and edit it, or pass the right --config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"the config file {path}: expected a mapping of sections (input:, output:, stages:, ...), "
                          f"got {tree!r:.80}")
    return tree or {}


def load(path: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """Config from an optional YAML file plus ``key.path=value`` overrides (values parsed as YAML)."""
    tree = _read(path) if path else {}
    if "stages" not in tree and any(item.startswith("stages.") for item in overrides):
        tree["stages"] = [{"name": name} for name in BUILTIN_STAGES]  # overriding the default chain
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {' '.join(str(exc).split())}; quote it, "
                              f"e.g. --set '{key.strip()}=\"...\"'") from None
        _set(tree, key.strip(), value)
    return _build(JobConfig, tree, "")


def build_stages(config: JobConfig) -> list[Stage]:
    """The configured stages, their model paths and ids checked (``check_models``)."""
    stages = [build_stage(stage, config.models) for stage in config.stages]
    check_models(config, stages)
    return stages


def build_stage(cfg: StageConfig, models: ModelsConfig = ModelsConfig()) -> Stage:
    target = cfg.cls or BUILTIN_STAGES.get(cfg.name)
    if not target:
        raise ConfigError(f"stage {cfg.name!r}: not a built-in stage ({sorted(BUILTIN_STAGES) or 'none yet'}); give its `class: module:Class`")
    module, _, qualname = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"stage {cfg.name!r}: cannot import {target!r} ({exc})") from None
    params = dict(cfg.params)
    if cls.model_key:
        params.setdefault("model", getattr(models, cls.model_key))
    try:  # what a stage refuses (an unknown param, a GPU share Ray cannot place) ends the job with one line too
        resources = Resources(cpus=cfg.cpus, gpus=cfg.gpus, memory_gb=cfg.memory_gb, actors=cfg.actors,
                              batches_in_flight=cfg.batches_in_flight)
        stage = cls(resources, batch_size=cfg.batch_size, **params)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("stage ") else f"stage {cfg.name!r}: {message}") from None
    stage.name = cfg.name
    return stage


# What a local checkpoint directory of each `models` key holds at least (a glob): SAM2's a `*.pt` (actors/mask.py),
# the others are Hugging Face layouts (EVF-SAM2's too: sculpt/models/evf_sam2.py)
MODEL_FILES = {"vlm": "config.json", "ground": "config.json", "mask": "*.pt", "verify": "config.json"}
# A Hugging Face id: [owner/]name of letters, digits, '-', '_', '.', a letter or digit at each end (and no '--', '..')
HF_ID = re.compile(r"(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?")


def _looks_local(model: str) -> bool:
    """A path rather than a Hugging Face id (owner/name): /, ./, ../ or ~ first, more than one '/', or a directory here."""
    return (model.startswith(("/", "./", "../", "~")) or model in (".", "..") or model.count(os.sep) > 1
            or os.path.isdir(model))


def check_models(config: JobConfig, stages: list[Stage] | None = None) -> None:
    """Refuse, before any cluster starts, a model the stages could not load: a local path that is no directory holding
    its checkpoint's files (MODEL_FILES), or a value that is no Hugging Face id (whether it exists on the Hub is left
    to the stage). Only the models the stages run are checked; a stage's ``params.model`` overrides ``models.<key>``."""
    stages = [build_stage(stage, config.models) for stage in config.stages] if stages is None else stages
    for stage_config, stage in zip(config.stages, stages):
        if not stage.model_key or (stage.model_key == "vlm" and config.vlm.endpoint):  # then the server's name
            continue
        model = stage.params.get("model")
        key = f"stages.{stage_config.name}.params.model" if "model" in stage_config.params else f"models.{stage.model_key}"
        if not isinstance(model, str):
            raise ConfigError(f"{key}={model!r}: must be a string (a Hugging Face id or a local directory)")
        if _looks_local(model):
            if not os.path.isdir(model):
                raise ConfigError(f"{key}={model!r}: no such directory{' (~ is not expanded)' * model.startswith('~')}; give "
                                  "the model's checkpoint directory or its Hugging Face id (`sculpt models tiny DIR` "
                                  "writes offline ones)")
            wanted = MODEL_FILES.get(stage.model_key, "config.json")
            if not glob.glob(os.path.join(glob.escape(model), wanted)):
                raise ConfigError(f"{key}={model!r}: the directory has no {wanted}, so it is no {stage.model_key} "
                                  "checkpoint; give the directory that holds the model's files, or its Hugging Face id")
        elif not (HF_ID.fullmatch(model) and "--" not in model and ".." not in model and len(model) <= 96):
            raise ConfigError(f"{key}={model!r}: neither a local directory nor a Hugging Face id (owner/name: letters, "
                              "digits, '-', '_', '.')")

