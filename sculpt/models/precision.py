"""The one device and dtype policy of every model stage.

A stage's ``device`` and ``dtype`` params default to None, which means:

- device: ``cuda`` when a GPU is visible, else ``cpu``;
- dtype: on CUDA ``bfloat16`` where the GPU supports it (Ampere and later), else ``float16``; on the CPU
  ``float32`` unless a dtype is asked for (tests run every stage in bfloat16 and float16 on the CPU through
  the same code path CUDA uses).

How a stage applies the dtype depends on its model:

- ground (Florence-2): the weights are loaded in the dtype (transformers' ``from_pretrained(dtype=...)``) and
  the processor's pixel values cast to it, as Florence-2's own examples run it;
- mask (SAM2) and verify (EVF-SAM2): the weights stay float32 and the forward pass runs under
  ``torch.autocast(device, dtype)`` — sam2's own recipe. Casting the whole module instead breaks sam2, whose
  ``PositionEmbeddingRandom`` builds its coordinate grid in float32 while ``.to(dtype)`` casts its Gaussian
  matrix (sam2 issue #650);
- caption/refer (InternVL through vLLM): vLLM's ``dtype`` (``vlm.dtype``; ``auto`` takes the checkpoint's
  bfloat16 and falls back to float16 on GPUs without bfloat16).
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def resolve(device: str | None = None, dtype: str | None = None) -> tuple[str, str]:
    """(device, dtype name) of a model stage under the policy above."""
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)} (or leave it unset for the default)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        if str(device).startswith("cuda"):
            # native support only: a V100 or T4 would otherwise pass, emulating bfloat16 slowly
            dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        else:
            dtype = "float32"
    return str(device), dtype


def autocast(device: str, dtype: str):
    """The reduced-precision context of an autocast stage (a no-op in float32)."""
    import torch

    device_type = str(device).split(":")[0]
    return torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
