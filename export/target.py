"""What every exported graph targets, in one place.

onnxruntime on JetPack and the oldest one we promise (1.16) read IR 9 / opset 19, so every
builder (the op-by-op decoder and embed graphs and the traced vision encoder and U-Net)
writes exactly these. TensorRT engines are built for batches of 1 .. MAX_BATCH rows; each
spec derives its min/opt/max shape profiles from it (the U-Net's from 2 * MAX_BATCH: its
cond and uncond rows run in one call).
"""

from __future__ import annotations

IR_VERSION = 9
OPSET = 19
MAX_BATCH = 8


def profile(low: list[int], opt: list[int], high: list[int]) -> dict[str, list[int]]:
    """One TensorRT shape range: {"min", "opt", "max"}."""
    return {"min": list(low), "opt": list(opt), "max": list(high)}
