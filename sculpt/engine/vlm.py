"""Pure helpers of the VLM engine pool: placement, engine arguments, tiling arguments, request routing."""

from __future__ import annotations

import zlib

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
    """InternVL dynamic tiling, in the words of the model's own processor."""
    if model_type == "internvl":  # transformers-native "-hf" checkpoints (GotOcr2ImageProcessor)
        return {"crop_to_patches": max_tiles > 1, "max_patches": max_tiles, "min_patches": min_tiles}
    # remote-code InternVL2/2.5/3 checkpoints served by vLLM's own InternVL processor
    return {"dynamic_image_size": max_tiles > 1, "max_dynamic_patch": max_tiles, "min_dynamic_patch": min_tiles}


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
