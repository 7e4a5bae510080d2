"""Vision encoder -> vision_encoder.onnx (torch.onnx, TorchScript tracer).

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

OPSET = 17
IR_VERSION = 8


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
    model.ir_version = IR_VERSION  # onnxruntime 1.16+ (JetPack 6) reads it
    return model


def build_vision(encoder, image_size: int, n_query: int, frame_n_query: int, max_batch: int = 16):
    """encoder: emu_edge.training.model.VisionEncoder -> (ModelProto, profiles)."""
    graph = _VisionGraph(encoder.eval(), n_query, frame_n_query)
    sample = torch.randn(2, 3, image_size, image_size)
    model = _to_proto(graph, (sample,), ["pixel_values"], ["image_embeds", "frame_embeds"],
                      {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}, "frame_embeds": {0: "batch"}})
    shape = lambda b: [b, 3, image_size, image_size]
    profiles = {"pixel_values": {"min": shape(1), "opt": shape(1), "max": shape(max_batch)}}
    return model, profiles


def load_folder(cls, folder: str | Path):
    """`cls.from_pretrained(folder)` in fp32 eval mode, with errors that name the folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} does not exist (expected a {cls.__name__} folder)")
    try:
        return cls.from_pretrained(str(folder)).float().eval()
    except Exception as e:  # transformers and diffusers raise several types for a bad folder
        raise ValueError(f"{folder} does not load as a {cls.__name__}: {e}") from e


def export_vision(folder: str | Path, writer, n_query: int, frame_n_query: int) -> dict:
    """A transformers CLIPVisionModel folder -> vision_encoder.onnx in `writer`; returns the
    ModelSpec fields it defines. The pooling (drop the class token, post-LN, mean-pool the
    patch grid to n_query) is Emu2's recipe, the same for our encoder and a user's."""
    from transformers import CLIPVisionModel

    from emu_edge.training.config import EmuConfig
    from emu_edge.training.model import VisionEncoder

    vision = load_folder(CLIPVisionModel, folder)
    c = vision.config
    cfg = EmuConfig(image_size=c.image_size, patch_size=c.patch_size, vision_hidden=c.hidden_size,
                    n_query=n_query, frame_n_query=frame_n_query).validate()
    print(f"  vision encoder: {c.num_hidden_layers} layers x {c.hidden_size}, {c.image_size}px, "
          f"{n_query} embeddings per image, {frame_n_query} per video frame")
    model, profiles = build_vision(VisionEncoder(cfg, vision), c.image_size, n_query, frame_n_query)
    writer.add_graph("vision_encoder", model, profiles=profiles)
    return dict(n_query=n_query, frame_n_query=frame_n_query, visual_dim=c.hidden_size, image_size=c.image_size)
