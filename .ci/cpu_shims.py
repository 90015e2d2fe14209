"""Dev/CI only: what the CPU set-up needs of every process in its virtualenv (never part of the package or the GPU
image). The Makefile installs this module with a .pth file, so it runs at each interpreter's start.

1. PyPI's CUDA-built torchvision imports beside the CPU torch wheel. Its compiled ops fail to load against CPU torch,
   and `import torchvision` then dies on "operator torchvision::nms does not exist". Defining the nms/qnms op schemas
   (with a plain-torch CPU kernel) before torchvision registers its fake kernels makes the import work. It acts only
   on the first `import torchvision`, so processes that never import torchvision never import torch for it.
2. The set-up leaves out triton (no CPU backend here: the Makefile). torch then warns, in each process that registers
   vLLM's custom ops (an engine's three), that it found no triton kernels: true, and only noise on the demo's terminal.
"""

import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path


def _cpu_nms(boxes, scores, iou_threshold):
    import torch

    order = scores.argsort(descending=True)
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    keep = []
    while order.numel():
        best, rest = order[0], order[1:]
        keep.append(best)
        w = (torch.minimum(x1[best], x1[rest]) - torch.maximum(x0[best], x0[rest])).clamp(min=0)
        h = (torch.minimum(y1[best], y1[rest]) - torch.maximum(y0[best], y0[rest])).clamp(min=0)
        inter = w * h
        order = rest[inter / (areas[best] + areas[rest] - inter) <= iou_threshold]
    return torch.stack(keep) if keep else torch.empty(0, dtype=torch.long)


def _define_ops() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    if torch.version.cuda is not None:
        return
    try:
        for lib in sorted(Path(spec.origin).parent.glob("_C*.so")):
            torch.ops.load_library(str(lib))
            return  # a CPU torchvision: its own ops load
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.impl(name, _cpu_nms, "CPU")
    torch._sculpt_torchvision_shim = library  # keep the definitions alive


class _OnTorchvisionImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_ops()
        return None


sys.meta_path.insert(0, _OnTorchvisionImport())
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
