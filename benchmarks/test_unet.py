"""A denoising step with classifier-free guidance, side by side.

One unit of work: the whole DDIM loop for `steps` steps on one image (cond and uncond in
one batch-2 U-Net call per step, guidance, scheduler step); reported per step. PyTorch
eager runs training/generate.py's diffusers loop, our runtime Pipeline.denoise, each on
the same checkpoint's U-Net and the same conditioning.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import peers
from .harness import interleave

TARGET_FP32_VS_TORCH = 1.8
TARGET_INT8_VS_FP32 = 1.4
TORCH = "PyTorch eager (diffusers U-Net) fp32"


def _int8_error(fp32_pipe, int8_pipe, cond: np.ndarray, samples: int = 4) -> float:
    """Relative error of the INT8 U-Net's noise prediction against fp32, on fresh noisy
    inputs at timesteps across the schedule: ||e8 - e32|| / ||e32||."""
    rng = np.random.default_rng(1)
    a, b = fp32_pipe.graph("unet"), int8_pipe.graph("unet")
    size = fp32_pipe.manifest.model.emu2.image_size
    errors = []
    for _ in range(samples):
        feeds = {"sample": rng.standard_normal((2, 3, size, size)).astype(np.float32),
                 "timestep": np.full(2, rng.uniform(0, 999), np.float32),
                 "encoder_hidden_states": np.concatenate([cond, np.zeros_like(cond)])}
        want = a.run(feeds, ["noise_pred"])["noise_pred"]
        got = b.run(feeds, ["noise_pred"])["noise_pred"]
        errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return float(np.mean(errors))


@pytest.mark.smoke
@pytest.mark.parametrize("which", ["unet0", "unet1", "checkpoint"])
def test_unet_step_side_by_side(benchmark, workspace, settings, results, which):
    name = {"unet0": settings.unets[0], "unet1": settings.unets[-1]}.get(which, which)
    model = workspace.torch_model(name)
    cfg = model.cfg
    cond = np.random.default_rng(0).standard_normal((1, cfg.n_query, cfg.vision_hidden)).astype(np.float32)
    steps = settings.unet_steps
    fp32, int8 = workspace.pipeline(name, "fp32"), workspace.pipeline(name, "int8")
    found = {TORCH: peers.torch_denoise(model, cond, steps),
             "emu-edge fp32": peers.ours_denoise(fp32, cond, steps),
             "emu-edge int8": peers.ours_denoise(int8, cond, steps)}
    benchmark.group = f"unet {name}"
    timings = interleave(benchmark, found, settings.rounds, work=steps)
    params = sum(p.numel() for p in model.unet.parameters())
    error = _int8_error(fp32, int8, cond)
    entry = results.compare(
        f"U-Net step: {name} ({params / 1e6:.1f}M parameters, {cfg.image_size}x{cfg.image_size}, batch 2 with "
        f"guidance, {steps}-step DDIM loop)", timings, "step", subject="emu-edge fp32",
        extra={"resolution": cfg.image_size, "parameters": params, "model": name,
               "agreement": f"INT8 noise prediction relative error vs fp32: {error:.2%}"}, benchmark=benchmark)
    int8_speedup = timings["emu-edge fp32"].median / timings["emu-edge int8"].median
    entry["int8_vs_fp32"] = int8_speedup
    entry["int8_relative_error"] = error
    if which != "checkpoint":
        results.target(f"U-Net step fp32 vs PyTorch eager ({name})",
                       entry["ratios"][TORCH], TARGET_FP32_VS_TORCH)
        results.target(f"U-Net step INT8 vs our fp32 ({name})", int8_speedup,
                       TARGET_INT8_VS_FP32, note=f"INT8 relative error {error:.2%}")
