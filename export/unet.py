"""U-Net -> unet.onnx: dynamic batch (cond and uncond in one call), float32 timestep."""

from __future__ import annotations

import torch
from torch import nn

from pathlib import Path

from emu_edge.export.vision import _to_proto, load_folder


class _UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


def build_unet(unet, n_query: int, max_batch: int = 16):
    """diffusers UNet2DConditionModel -> (ModelProto, profiles). Timesteps are float32 per
    batch row: Euler's are fractional, and an int64 input would silently truncate them."""
    c = unet.config
    size, channels, dim = c.sample_size, c.in_channels, c.cross_attention_dim
    args = (torch.randn(2, channels, size, size), torch.tensor([999.0, 10.5]), torch.randn(2, n_query, dim))
    model = _to_proto(_UNetGraph(unet.eval()), args, ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"],
                      {"sample": {0: "batch"}, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                       "noise_pred": {0: "batch"}})

    def prof(*shape_of_batch):
        return {"min": shape_of_batch[0](2), "opt": shape_of_batch[0](2), "max": shape_of_batch[0](2 * max_batch)}

    profiles = {
        "sample": prof(lambda b: [b, channels, size, size]),
        "timestep": prof(lambda b: [b]),
        "encoder_hidden_states": prof(lambda b: [b, n_query, dim]),
    }
    return model, profiles


def export_unet(folder: str | Path, writer, n_query: int) -> dict:
    """A diffusers UNet2DConditionModel folder -> unet.onnx in `writer`."""
    from diffusers import UNet2DConditionModel

    unet = load_folder(UNet2DConditionModel, folder)
    c = unet.config
    print(f"  unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {c.sample_size}px, "
          f"conditioned on {n_query} x {c.cross_attention_dim}")
    model, profiles = build_unet(unet, n_query)
    writer.add_graph("unet", model, profiles=profiles)
    return dict(image_size=c.sample_size)
