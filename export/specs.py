"""One export spec per network, and the family recipes that list them.

A spec declares what the bundle says about its graph (role, role-to-tensor names, allowed
precisions, dynamic axes, TensorRT profiles from the one batch limit in export/target.py),
makes sample inputs of the right shapes (tracing, parity tests, the U-Net's shape folding)
and builds the graph with the builder in its own module. `export(writer, inputs)` is the
exporter's one call per spec: it opens what the spec needs from `ExportInputs`, adds the
graph and returns the manifest fields it defines ({"model": ..., "emu2": ...}).

    llm:   decoder (token ids in: the embedding table is its first node)
    emu2:  decoder (+ visual embeddings in, regressed embeddings out), vision_encoder, unet,
           judge (copied from the checkpoint if present)
    emu3:  decoder, vq_encoder, vq_decoder (export/vq.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from emu_edge.export.base import ExportSpec
from emu_edge.export.decoder import DecoderDescription, resolve_attention
from emu_edge.export.target import MAX_BATCH, profile
from emu_edge.export.vq import VQDecoderSpec, VQEncoderSpec


@dataclass
class ExportInputs:
    """Everything an export reads; each spec takes its part."""

    llm: object = None                  # hf_cli.LlmFolder: decoder source + generation config
    attention: str = "auto"
    max_length: int = 0
    project_up: tuple | None = None     # (weight, bias): emu2's visual embeddings -> hidden
    project_down: tuple | None = None   # (weight, bias): hidden -> regressed embedding
    image_token_id: int | None = None
    vision: Path | None = None          # a CLIPVisionModel folder
    unet: Path | None = None            # a UNet2DConditionModel folder
    n_query: int = 64
    frame_n_query: int = 4
    judge: Path | None = None
    emu3: Path | None = None            # an Emu3ForConditionalGeneration folder: its VQ-VAE
    vqmodel: object = None              # that VQ-VAE once loaded (the two VQ specs share it)
    log: object = field(default=print)


# -- decoder -------------------------------------------------------------------------------


@dataclass
class DecoderSpec(ExportSpec):
    desc: DecoderDescription
    max_length: int
    attention: str = "auto"
    visual_dim: int | None = None       # emu2: image_embeds in (project_up), regressed out (project_down)
    image_token_id: int | None = None   # where image_embeds are spliced in

    role = "decoder"
    names = {"input_ids": "input_ids", "image_embeds": "image_embeds", "seqlens_k": "seqlens_k",
             "total_sequence_length": "total_sequence_length",
             "past_key": "past_key_values.{layer}.key", "past_value": "past_key_values.{layer}.value",
             "present_key": "present.{layer}.key", "present_value": "present.{layer}.value",
             "logits": "logits", "regressed": "regressed"}
    precisions = ("fp32", "fp16", "int8", "int4")

    def __post_init__(self):
        self.attention = resolve_attention(self.attention, self.desc.head_dim)

    def _kv(self, batch):
        return [batch, self.desc.num_kv_heads, self.max_length, self.desc.head_dim]

    @property
    def takes_images(self) -> bool:
        return bool(self.visual_dim) and self.image_token_id is not None

    def dynamic_axes(self):
        kv = {0: "batch", 2: "max_length"}
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "seqlens_k": {0: "batch"}}
        if self.takes_images:
            axes["image_embeds"] = {0: "image_tokens"}
        for i in range(self.desc.num_layers):
            axes |= {self.names[k].format(layer=i): kv for k in ("past_key", "past_value")}
        axes["logits"] = {0: "batch"}
        for i in range(self.desc.num_layers):
            axes |= {self.names[k].format(layer=i): kv for k in ("present_key", "present_value")}
        return axes | ({"regressed": {0: "batch"}} if self.visual_dim else {})

    def profiles(self):
        kv = profile(self._kv(1), self._kv(1), self._kv(MAX_BATCH))
        profiles = {"input_ids": profile([1, 1], [1, 1], [MAX_BATCH, self.max_length]),
                    "seqlens_k": profile([1], [1], [MAX_BATCH])}
        if self.takes_images:
            d = self.visual_dim
            profiles["image_embeds"] = profile([0, d], [1, d], [MAX_BATCH * self.max_length, d])
        for i in range(self.desc.num_layers):
            profiles |= {self.names[k].format(layer=i): kv for k in ("past_key", "past_value")}
        return profiles

    def sample_inputs(self, batch=1, seed=0, sequence=5):
        """A first prompt of `sequence` tokens in every row, on an empty (zeroed) cache."""
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, self.desc.vocab_size, (batch, sequence))
        feeds = {"input_ids": ids}
        if self.takes_images:   # one visual embedding per image token the ids happen to hold
            n = int((ids == self.image_token_id).sum())
            feeds["image_embeds"] = rng.standard_normal((n, self.visual_dim)).astype(np.float32)
        feeds |= {"seqlens_k": np.full(batch, sequence - 1, np.int32),
                  "total_sequence_length": np.array(sequence, np.int32)}
        for i in range(self.desc.num_layers):
            feeds |= {self.names[k].format(layer=i): np.zeros(self._kv(batch), np.float32)
                      for k in ("past_key", "past_value")}
        return feeds

    def build(self, weights, project_down=None, project_up=None, spill=None) -> onnx.ModelProto:
        """spill: the writer's data file for this graph (BundleWriter.spill), or None."""
        from emu_edge.export.decoder import build_decoder

        return build_decoder(self.desc, weights, self.attention, self.max_length, project_down=project_down,
                             project_up=project_up, image_token_id=self.image_token_id, spill=spill)

    @classmethod
    def export(cls, writer, inputs: ExportInputs) -> dict:
        llm = inputs.llm
        d = llm.source.description
        if (inputs.project_up is None) != (inputs.project_down is None):
            raise ValueError("project_up and project_down go together (emu2's visual embeddings in and out)")
        spec = cls(d, inputs.max_length, inputs.attention,
                   None if inputs.project_down is None else int(inputs.project_down[0].shape[0]),
                   inputs.image_token_id if inputs.project_up is not None else None)
        if inputs.attention == "auto" and spec.attention != "gqa":
            inputs.log(f"  head_dim {d.head_dim} is not a multiple of 16 (GroupQueryAttention's CPU kernel): "
                       "using standard attention")
        inputs.log(f"  decoder: {d.num_layers} layers, {d.num_heads} heads ({d.num_kv_heads} kv) x {d.head_dim}, "
                   f"attention {spec.attention}, max_length {spec.max_length}")
        inputs.log(f"  embedding: vocab {d.vocab_size} x hidden {d.hidden_size}, inside the decoder")
        spec.add_to(writer, spec.build(llm.source.weights, inputs.project_down, inputs.project_up,
                                       spill=writer.spill(spec.role)))
        return {"model": llm.model_fields(spec)}


# -- vision encoder ------------------------------------------------------------------------


@dataclass
class VisionEncoderSpec(ExportSpec):
    image_size: int
    n_query: int
    frame_n_query: int

    role = "vision_encoder"
    names = {"pixel_values": "pixel_values", "image_embeds": "image_embeds", "frame_embeds": "frame_embeds"}
    precisions = ("fp32", "fp16", "int8")

    def dynamic_axes(self):
        return {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}, "frame_embeds": {0: "batch"}}

    def profiles(self):
        shape = lambda b: [b, 3, self.image_size, self.image_size]
        return {"pixel_values": profile(shape(1), shape(1), shape(MAX_BATCH))}

    def sample_inputs(self, batch=2, seed=0):
        rng = np.random.default_rng(seed)
        return {"pixel_values": rng.standard_normal((batch, 3, self.image_size, self.image_size)).astype(np.float32)}

    def build(self, encoder) -> onnx.ModelProto:
        """encoder: emu_edge.training.model.VisionEncoder."""
        from emu_edge.export.vision import build_vision

        return build_vision(encoder, self)

    @classmethod
    def export(cls, writer, inputs: ExportInputs) -> dict:
        """The pooling (drop the class token, post-LN, mean-pool the patch grid to n_query) is
        Emu2's recipe, the same for our encoder and a user's CLIPVisionModel."""
        from transformers import CLIPVisionModel

        from emu_edge.export.vision import load_folder
        from emu_edge.training.config import EmuConfig
        from emu_edge.training.model import VisionEncoder

        vision = load_folder(CLIPVisionModel, inputs.vision)
        c = vision.config
        cfg = EmuConfig(image_size=c.image_size, patch_size=c.patch_size, vision_hidden=c.hidden_size,
                        n_query=inputs.n_query, frame_n_query=inputs.frame_n_query).validate()
        inputs.log(f"  vision encoder: {c.num_hidden_layers} layers x {c.hidden_size}, {c.image_size}px, "
                   f"{inputs.n_query} embeddings per image, {inputs.frame_n_query} per video frame")
        spec = cls(c.image_size, inputs.n_query, inputs.frame_n_query)
        spec.add_to(writer, spec.build(VisionEncoder(cfg, vision)))
        return {"emu2": dict(n_query=inputs.n_query, frame_n_query=inputs.frame_n_query, visual_dim=c.hidden_size,
                             image_size=c.image_size)}


# -- U-Net ---------------------------------------------------------------------------------


@dataclass
class UNetSpec(ExportSpec):
    sample_size: int
    channels: int
    n_query: int
    cross_dim: int

    role = "unet"
    names = {"sample": "sample", "timestep": "timestep", "encoder_hidden_states": "encoder_hidden_states",
             "noise_pred": "noise_pred"}
    precisions = ("fp32", "fp16", "int8")
    inputs = ("sample", "timestep", "encoder_hidden_states")

    def _shapes(self, b):
        return {"sample": [b, self.channels, self.sample_size, self.sample_size], "timestep": [b],
                "encoder_hidden_states": [b, self.n_query, self.cross_dim]}

    def dynamic_axes(self):
        return {name: {0: "batch"} for name in (*self.inputs, "noise_pred")}

    def profiles(self):
        # Cond and uncond rows of each request run in one call: 2 .. 2 * MAX_BATCH rows.
        low, high = self._shapes(2), self._shapes(2 * MAX_BATCH)
        return {name: profile(low[name], low[name], high[name]) for name in self.inputs}

    def sample_inputs(self, batch=2, seed=0):
        """Timesteps are float32 per row: Euler's are fractional (an int64 would truncate)."""
        rng = np.random.default_rng(seed)
        shapes = self._shapes(batch)
        return {"sample": rng.standard_normal(shapes["sample"]).astype(np.float32),
                "timestep": rng.uniform(0, 999, batch).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"]).astype(np.float32)}

    def optimize(self, model):
        from emu_edge.export.unet import optimize_unet_graph

        return optimize_unet_graph(model, lambda b: self.sample_inputs(b))

    def build(self, unet, optimize: bool = True) -> onnx.ModelProto:
        """diffusers UNet2DConditionModel -> the graph; optimize=False leaves it as traced."""
        from emu_edge.export.unet import trace_unet

        model = trace_unet(unet, self)
        return self.optimize(model) if optimize else model

    @classmethod
    def for_unet(cls, unet, n_query: int) -> UNetSpec:
        c = unet.config
        return cls(c.sample_size, c.in_channels, n_query, c.cross_attention_dim)

    @classmethod
    def export(cls, writer, inputs: ExportInputs) -> dict:
        from diffusers import UNet2DConditionModel

        from emu_edge.export.vision import load_folder

        unet = load_folder(UNet2DConditionModel, inputs.unet)
        c = unet.config
        inputs.log(f"  unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {c.sample_size}px, "
                   f"conditioned on {inputs.n_query} x {c.cross_attention_dim}")
        spec = cls.for_unet(unet, inputs.n_query)
        spec.add_to(writer, spec.build(unet))
        return {"emu2": dict(image_size=c.sample_size)}


# -- the judge -----------------------------------------------------------------------------


class JudgeSpec(ExportSpec):
    """The image scorer training wrote as ONNX: copied as is (calibration and quantization
    reports score images with it, torch-free)."""

    role = "judge"
    names = {"images": "images"}
    precisions = ("fp32",)

    def build(self, path: Path) -> onnx.ModelProto:
        return onnx.load(str(path))

    @classmethod
    def export(cls, writer, inputs: ExportInputs) -> dict:
        if inputs.judge is not None and Path(inputs.judge).is_file():
            spec = cls()
            spec.add_to(writer, spec.build(inputs.judge))
        return {}


RECIPES: dict[str, tuple[type[ExportSpec], ...]] = {
    "llm": (DecoderSpec,),
    "emu2": (DecoderSpec, VisionEncoderSpec, UNetSpec, JudgeSpec),
    "emu3": (DecoderSpec, VQEncoderSpec, VQDecoderSpec),
}


def export_recipe(family: str, writer, inputs: ExportInputs) -> dict[str, dict]:
    """Every spec of the family's recipe into `writer`; -> {"model": fields, "emu2": fields}."""
    fields: dict[str, dict] = {}
    for spec_class in RECIPES[family]:
        for part, values in spec_class.export(writer, inputs).items():
            fields.setdefault(part, {}).update(values)
    return fields
