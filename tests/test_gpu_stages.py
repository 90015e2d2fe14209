"""benchmarks/gpu_stages.py refuses clearly without a GPU (its --tiny dry run is the same code on the CPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_stages_refuses_on_a_machine_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_stages.py")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--tiny" in done.stderr
