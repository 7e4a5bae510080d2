"""Emu3's VQ-VAE -> vq_encoder.onnx and vq_decoder.onnx (torch.onnx, TorchScript tracer),
for images: pixels [batch, 3, H, W] <-> codes [batch, H / f, W / f] (f: the spatial factor).

transformers' Emu3VQVAE treats an image as a clip of `temporal_downsample_factor` copies
of itself and each graph here computes the same numbers with less work:

- encode: the 2-D encoder works frame by frame, so its output is the same for every copy;
  it runs once and its output is repeated along time before the temporal layers (the
  parity test checks the codes are identical to `Emu3VQVAE.encode`).
- decode: the class decodes the temporal upsampling's `temporal_downsample_factor` frames
  and keeps frame 0 of the video for an image; the 2-D decoder works frame by frame, so
  it runs on frame 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from emu_edge.export.base import ExportSpec
from emu_edge.export.target import MAX_BATCH, profile


@dataclass(frozen=True)
class VQSettings:
    """What a bundle's manifest says about the VQ model, read from its config."""

    spatial_factor: int      # pixels per code along each side
    temporal_factor: int     # frames per temporal code (an image is repeated this often)
    codebook_size: int
    embed_dim: int

    @classmethod
    def from_config(cls, config) -> VQSettings:
        """config: an Emu3VQVAEConfig (an Emu3 folder's `config.vq_config`)."""
        return cls(2 ** (len(config.channel_multiplier) - 1), int(config.temporal_downsample_factor),
                   int(config.codebook_size), int(config.embed_dim))


class VQExportError(RuntimeError):
    """An Emu3 folder's VQ-VAE cannot be read; the message says what is missing."""


VQ_PREFIX = "vqmodel."   # where Emu3ForConditionalGeneration.save_pretrained puts the VQ-VAE


def load_vqmodel(folder: str | Path):
    """transformers' Emu3VQVAE of an Emu3ForConditionalGeneration folder, eval mode: built
    from config.json's vq_config and given only the folder's `vqmodel.*` tensors (the text
    model, most of the weights, is never loaded into torch)."""
    from transformers import Emu3Config, Emu3VQVAE

    from emu_edge.export.adapters import SafetensorsFolder

    folder = Path(folder)
    try:
        config = Emu3Config.from_pretrained(folder)
    except Exception as e:  # transformers raises several types for bad values
        raise VQExportError(f"{folder / 'config.json'} is not a valid Emu3 config: {e}") from e
    vq = Emu3VQVAE(config.vq_config)
    files = SafetensorsFolder(folder)
    expected = vq.state_dict()
    missing = [k for k in expected if VQ_PREFIX + k not in files]
    if missing:
        raise VQExportError(
            f"{folder} lacks {len(missing)} of the {len(expected)} VQ-VAE tensors its config needs "
            f"(e.g. {VQ_PREFIX}{missing[0]}); export a folder written by Emu3ForConditionalGeneration.save_pretrained "
            "with its VQ-VAE")
    state = {}
    for name, current in expected.items():
        value = torch.from_numpy(files[VQ_PREFIX + name]).to(current.dtype)
        if value.shape != current.shape:
            raise VQExportError(f"{folder}: {VQ_PREFIX}{name} has shape {list(value.shape)}, its config says "
                                f"{list(current.shape)}")
        state[name] = value
    vq.load_state_dict(state, strict=True)
    return vq.eval()


def _vqmodel(inputs):
    """The export's VQ-VAE, loaded on first use (both VQ specs read it)."""
    if inputs.vqmodel is None:
        inputs.vqmodel = load_vqmodel(inputs.emu3)
    return inputs.vqmodel


class _EncodeGraph(nn.Module):
    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, pixel_values):   # [B, 3, H, W]
        enc = self.vq.encoder
        h = enc.middle_block(enc.down_block(enc.conv_in(pixel_values)))
        h = enc.norm_out(h)
        h = enc.conv_out(h * torch.sigmoid(h))                                # [B, C, h, w]
        h = h.unsqueeze(2).repeat(1, 1, self.vq.config.temporal_downsample_factor, 1, 1)  # [B, C, T, h, w]
        for conv in enc.time_conv:
            h = conv(h)
            h = h * torch.sigmoid(h)
        for layer in enc.time_res_stack:
            h = layer(h)
        h = self.vq.quant_conv(h)                                             # [B, D, 1, h, w]
        codes = self.vq.quantize(h.permute(0, 2, 1, 3, 4))                    # [B, 1, h, w]
        return codes[:, 0]   # not squeeze(1): the tracer writes an If for it


class _DecodeGraph(nn.Module):
    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, codes):   # [B, h, w] int64
        dec = self.vq.decoder
        quant = self.vq.quantize.embedding(codes).permute(0, 3, 1, 2).unsqueeze(2)   # [B, D, 1, h, w]
        batch = quant.shape[0]
        both = torch.cat((self.vq.post_quant_conv(quant), quant), dim=0)   # [2B, D, 1, h, w]
        for layer in dec.time_res_stack:
            both = layer(both)
        for layer in dec.time_conv:
            both = layer(both)
            both = both * torch.sigmoid(both)
        both = both[:, :, 0]                                                  # frame 0: [2B, D, h, w]
        hidden, quant_states = both[:batch], both[batch:]
        hidden = dec.up_block(dec.middle_block(dec.conv_in(hidden), quant_states), quant_states)
        hidden = dec.norm_out(hidden, quant_states)
        return dec.conv_out(hidden * torch.sigmoid(hidden))                  # [B, 3, H, W]


def _to_graph(wrapper: nn.Module, sample: np.ndarray, spec) -> onnx.ModelProto:
    from emu_edge.export.vision import _to_proto

    inp, out = (spec.names[k] for k in spec.io)
    # eval() before and after: torch.onnx.export restores the wrapper's mode, and a fresh
    # wrapper is in train mode, which would put BatchNorm3d on batch statistics afterwards.
    wrapper.eval()
    model = _to_proto(wrapper, (torch.from_numpy(sample),), [inp], [out], spec.dynamic_axes())
    wrapper.eval()
    return model


@dataclass
class VQEncoderSpec(ExportSpec):
    vq: VQSettings
    max_side: int = 1024     # pixels, a multiple of vq.spatial_factor

    role = "vq_encoder"
    names = {"pixel_values": "pixel_values", "codes": "codes"}
    precisions = ("fp32", "fp16")
    io = ("pixel_values", "codes")

    def dynamic_axes(self):
        return {"pixel_values": {0: "batch", 2: "height", 3: "width"},
                "codes": {0: "batch", 1: "code_height", 2: "code_width"}}

    def profiles(self):
        f, s = self.vq.spatial_factor, self.max_side
        return {"pixel_values": profile([1, 3, f, f], [1, 3, s, s], [MAX_BATCH, 3, s, s])}

    def sample_inputs(self, batch=1, seed=0, height=None, width=None):
        """height, width: pixels (multiples of the spatial factor); 8 x 12 codes by default."""
        f = self.vq.spatial_factor
        shape = (batch, 3, height or 8 * f, width or 12 * f)
        return {"pixel_values": np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)}

    def build(self, vqmodel) -> onnx.ModelProto:
        """vqmodel: transformers' Emu3VQVAE."""
        return _to_graph(_EncodeGraph(vqmodel.eval()), self.sample_inputs(batch=2)["pixel_values"], self)

    @classmethod
    def export(cls, writer, inputs) -> dict:
        vq = _vqmodel(inputs)
        settings = VQSettings.from_config(vq.config)
        inputs.log(f"  vq encoder: spatial factor {settings.spatial_factor}, temporal factor "
                   f"{settings.temporal_factor}, codebook {settings.codebook_size} x {settings.embed_dim}")
        spec = cls(settings)
        spec.add_to(writer, spec.build(vq))
        return {"emu3": dict(spatial_factor=settings.spatial_factor, temporal_factor=settings.temporal_factor,
                             codebook_size=settings.codebook_size)}


@dataclass
class VQDecoderSpec(ExportSpec):
    vq: VQSettings
    max_side: int = 1024     # pixels, a multiple of vq.spatial_factor

    role = "vq_decoder"
    names = {"codes": "codes", "pixels": "pixels"}
    # int8: static QDQ on Conv, on request only (calibration/quantize.py: STATIC_INT8_OPS).
    precisions = ("fp32", "fp16", "int8")
    io = ("codes", "pixels")

    def dynamic_axes(self):
        return {"codes": {0: "batch", 1: "code_height", 2: "code_width"},
                "pixels": {0: "batch", 2: "height", 3: "width"}}

    def profiles(self):
        s = self.max_side // self.vq.spatial_factor
        return {"codes": profile([1, 1, 1], [1, s, s], [MAX_BATCH, s, s])}

    def sample_inputs(self, batch=1, seed=0, height=8, width=12):
        """height, width: codes."""
        rng = np.random.default_rng(seed)
        return {"codes": rng.integers(0, self.vq.codebook_size, (batch, height, width), dtype=np.int64)}

    def build(self, vqmodel) -> onnx.ModelProto:
        """vqmodel: transformers' Emu3VQVAE; pixels come out in its own range (no clamping)."""
        return _to_graph(_DecodeGraph(vqmodel.eval()), self.sample_inputs(batch=2)["codes"], self)

    @classmethod
    def export(cls, writer, inputs) -> dict:
        vq = _vqmodel(inputs)
        inputs.log("  vq decoder: codes -> pixels (frame 0 of the temporal upsampling)")
        spec = cls(VQSettings.from_config(vq.config))
        spec.add_to(writer, spec.build(vq))
        return {}
