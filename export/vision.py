"""Vision encoder -> vision_encoder.onnx (torch.onnx, TorchScript tracer); the spec
(names, axes, profiles, sample input) is specs.VisionEncoderSpec.

pixel_values [batch, 3, S, S] (normalised as the manifest says) -> image_embeds
[batch, n_query, visual_dim] and frame_embeds [batch, frame_n_query, visual_dim]: the same
trunk pooled twice, so images and video frames share one graph.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from emu_edge.export.target import IR_VERSION, OPSET


class _VisionGraph(nn.Module):
    def __init__(self, encoder, n_query: int, frame_n_query: int):
        super().__init__()
        self.encoder, self.n_query, self.frame_n_query = encoder, n_query, frame_n_query

    def forward(self, pixel_values):
        return self.encoder(pixel_values, self.n_query), self.encoder(pixel_values, self.frame_n_query)


def _to_proto(module: nn.Module, args: tuple, input_names, output_names, dynamic_axes) -> onnx.ModelProto:
    buf = io.BytesIO()
    # The tracer warns about shape-dependent Python branches in transformers/diffusers; the
    # parity tests check the traced graphs at other shapes, so the warnings are noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = IR_VERSION  # torch stamps a newer one than the onnxruntime we target reads
    return model


def build_vision(encoder, spec) -> onnx.ModelProto:
    """encoder: emu_edge.training.model.VisionEncoder; spec: specs.VisionEncoderSpec."""
    graph = _VisionGraph(encoder.eval(), spec.n_query, spec.frame_n_query)
    sample = torch.from_numpy(spec.sample_inputs(batch=2)["pixel_values"])
    return _to_proto(graph, (sample,), ["pixel_values"], ["image_embeds", "frame_embeds"], spec.dynamic_axes())


def load_folder(cls, folder: str | Path):
    """`cls.from_pretrained(folder)` in fp32 eval mode, with errors that name the folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} does not exist (expected a {cls.__name__} folder)")
    try:
        return cls.from_pretrained(str(folder)).float().eval()
    except Exception as e:  # transformers and diffusers raise several types for a bad folder
        raise ValueError(f"{folder} does not load as a {cls.__name__}: {e}") from e
