"""Pure helpers of the VLM engine pool: placement, engine arguments, tiling arguments, request routing; and of an
OpenAI-compatible server used instead (vlm.endpoint): its image URLs, its answers, what its messages may show."""

from __future__ import annotations

import zlib

from sculpt.annotation import images, profiles
from sculpt.stage import Resources, actor_options

ENGINE_NAME = "sculpt-vlm-{}"  # named actors in the job's namespace; stages find the pool by these names


def engine_plan(gpus: float, cpus: float, tensor_parallel: int, engine_kwargs: dict) -> dict:
    """How one engine replica is placed and started.

    ``actor``: Ray options of the engine actor. ``bundles``: a placement group to create first (tensor
    parallelism: one bundle for the engine process plus one whole GPU per shard, packed on one node), or None.
    ``engine``: vllm.LLM keyword arguments, with the memory fraction matching the GPU share.
    """
    engine = {"enable_prefix_caching": True, "disable_log_stats": False, **engine_kwargs}
    if tensor_parallel > 1:
        if gpus not in (0, 1):
            raise ValueError(f"vlm.gpus={gpus} with tensor_parallel={tensor_parallel}: each shard takes a whole GPU")
        engine.update(tensor_parallel_size=tensor_parallel, distributed_executor_backend="ray")
        bundles = [{"CPU": cpus}] + [{"GPU": 1.0}] * tensor_parallel
        return {"actor": actor_options(Resources(cpus=cpus)), "bundles": bundles, "engine": engine}
    if 0 < gpus < 1:
        engine.setdefault("gpu_memory_utilization", round(0.9 * gpus, 3))  # leave the rest of the GPU to others
    return {"actor": actor_options(Resources(cpus=cpus, gpus=gpus)), "bundles": None, "engine": engine}


def tiling_kwargs(model_type: str, max_tiles: int, min_tiles: int) -> dict:
    """InternVL dynamic tiling, in the words of the model's own processor; none for a family that does not tile
    (Qwen-VL: its processor's own resize, ``profiles``)."""
    if not profiles.profile_for({"model_type": model_type}).tiled:
        return {}
    if model_type == "internvl":  # transformers-native "-hf" checkpoints (GotOcr2ImageProcessor)
        return {"crop_to_patches": max_tiles > 1, "max_patches": max_tiles, "min_patches": min_tiles}
    # remote-code InternVL2/2.5/3 checkpoints served by vLLM's own InternVL processor
    return {"dynamic_image_size": max_tiles > 1, "max_dynamic_patch": max_tiles, "min_dynamic_patch": min_tiles}


def checkpoint_config(model: str) -> dict | None:
    """A VLM checkpoint's config.json: a local directory's, or the copy in this machine's Hugging Face cache (never
    downloaded here); None when neither is there (an endpoint's served name, a Hub id not fetched yet)."""
    import json
    import os

    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a Hub id
            path = None
    if not isinstance(path, str):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def profile_of(setting: str | None, model: str) -> profiles.Profile:
    """``vlm.profile``'s profile for ``model``: the one named, or (auto) the checkpoint's family (``profiles.get``)."""
    return profiles.get(setting, checkpoint_config(model) if setting in (None, "auto") else None, model)


def replica_for(image_key: str, replicas: int, down: frozenset[int] | set[int] = frozenset()) -> int | None:
    """Every request about one image goes to one replica, whose prefix cache holds that image. An image whose
    replica is ``down`` goes to one of the live ones, spread by the same hash (one neighbour would take all of a
    dead replica's load); None when none is live."""
    code = zlib.crc32(image_key.encode())
    if code % replicas not in down:
        return code % replicas
    live = [replica for replica in range(replicas) if replica not in down]
    return live[code // replicas % len(live)] if live else None


def engine_names(named_actors: list[str]) -> list[str]:
    """The pool's engines among the job's named actors, in replica order. A replica that could not start is not
    among them (Ray frees a dead actor's name): the stages share the pool of those that did."""
    prefix = ENGINE_NAME.format("")
    found = [name for name in named_actors if name.startswith(prefix) and name[len(prefix):].isdigit()]
    return sorted(found, key=lambda name: int(name[len(prefix):]))


# An OpenAI-compatible server the user already runs (vlm.endpoint): what its requests carry and its answers say.

def image_url(data: bytes) -> str:
    """An image as the data URL an OpenAI-compatible server decodes to what sculpt's stages see (their boxes are
    in its upright pixels): a plain JPEG (RGB, no EXIF turn: SA-1B's kind) as it is, any other image (turned,
    CMYK, grayscale, with alpha, PNG, WebP...) as a PNG of its upright RGB pixels (``images.load_rgb``)."""
    import base64
    import io

    if images._plain_jpeg(data, images.DEFAULT_MAX_PIXELS):
        kind = "jpeg"
    else:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(images.load_rgb(data)).save(out, format="PNG", compress_level=1)
        kind, data = "png", out.getvalue()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def endpoint_answer(completion) -> dict:
    """The engine's answer (text, finish_reason, prompt_tokens, cached_tokens) from a chat completion."""
    choice, usage = completion.choices[0], completion.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {"text": choice.message.content or "", "finish_reason": choice.finish_reason,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (getattr(details, "cached_tokens", None) or 0) if details else 0}


def shown_url(url: str) -> str:
    """The endpoint as logs and messages name it: without any user:password@ of the URL or its query."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with each secret (an API key) replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def in_flight_each(max_in_flight: int, actors: int) -> int:
    """The requests each of ``actors`` stage actors may have at the endpoint at once: the job's bound
    (vlm.max_in_flight) shared among them, at least one each."""
    return max(1, max_in_flight // max(1, actors))
