"""`emu-edge export-hf`: Hugging Face folders -> a bundle.

    emu-edge export-hf --llm DIR [--vision DIR] [--unet DIR] --out BUNDLE
                       [--attention auto|gqa|standard] [--max-length N]

`--llm` takes a transformers Llama-family causal LM folder (config.json, *.safetensors,
tokenizer.json) and writes embed.onnx and decoder.onnx. Weights are read with safetensors;
the model class is never instantiated. Each component is one exporter function that
takes the open BundleWriter, so more components (vision encoder, U-Net) are one more
option and one more call in `run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emu_edge.export.bundle_writer import BundleWriter
from emu_edge.export.decoder import build_decoder, decoder_dims, resolve_attention
from emu_edge.export.embed import build_embed
from emu_edge.runtime.manifest import Emu2Spec, KVSpec, ModelSpec
from emu_edge.runtime.prompt import emu2_layout

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
DEFAULT_MAX_LENGTH = 4096


class ExportError(RuntimeError):
    """An input folder or file cannot be exported; the message says which and why."""


def add_arguments(parser) -> None:
    parser.add_argument("--llm", required=True, type=Path,
                        help="a transformers causal LM folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    parser.add_argument("--attention", choices=("auto", "gqa", "standard"), default="auto",
                        help="decoder attention: onnxruntime's GroupQueryAttention (gqa), standard ONNX "
                             "ops (standard, for TensorRT), or gqa where the head size allows (auto)")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"longest context the decoder supports (default: the model's "
                             f"max_position_embeddings, at most {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--vision", type=Path, help="a transformers CLIPVisionModel folder: vision_encoder.onnx")
    parser.add_argument("--unet", type=Path, help="a diffusers UNet2DConditionModel folder: unet.onnx")
    parser.add_argument("--n-query", type=int, default=64,
                        help="visual embeddings per image (a square; its side divides the patch grid)")
    parser.add_argument("--frame-n-query", type=int, default=4, help="visual embeddings per video frame")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    """Errors reach emu_edge.cli, which prints them as one line."""
    from emu_edge.export.unet import export_unet
    from emu_edge.export.vision import export_vision

    sources = [p for p in (args.llm, args.vision, args.unet) if p is not None]
    with BundleWriter(args.out, overwrite=args.overwrite, sources=sources) as writer:
        print(f"exporting to {writer.out}")
        fields = export_llm(args.llm, writer, attention=args.attention, max_length=args.max_length)
        fields["family"] = "llm"
        if args.vision is not None or args.unet is not None:
            if args.vision is None or args.unet is None:
                raise ExportError("an emu2 bundle needs both --vision and --unet (images in and out)")
            visual = export_vision(args.vision, writer, args.n_query, args.frame_n_query)
            visual |= export_unet(args.unet, writer, args.n_query)
            fields.update(family="emu2", emu2=Emu2Spec(**visual, image_mean=[0.5] * 3, image_std=[0.5] * 3),
                          prompt=emu2_layout(_special_tokens(Path(args.llm) / "tokenizer.json")))
        writer.write_tokenizer(Path(args.llm) / "tokenizer.json")
        out = writer.finish(ModelSpec(**fields))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------


def load_llm(llm_dir: str | Path):
    """(LlamaConfig, state dict as float32 numpy, generation defaults) of an HF folder."""
    llm_dir = Path(llm_dir)
    if not llm_dir.is_dir():
        raise ExportError(f"LLM folder {llm_dir} does not exist")
    config_dict = _read_json(llm_dir / "config.json")
    architectures = config_dict.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ExportError(
            f"{llm_dir / 'config.json'} declares architectures {architectures or 'none'}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    from transformers import LlamaConfig

    try:
        config = LlamaConfig.from_dict(config_dict)
    except Exception as e:  # transformers raises several types for bad values
        raise ExportError(f"{llm_dir / 'config.json'} is not a valid Llama config: {e}") from e
    weights = _read_safetensors(llm_dir)
    generation = {}
    if (llm_dir / "generation_config.json").is_file():
        generation = _read_json(llm_dir / "generation_config.json")
    if not (llm_dir / "tokenizer.json").is_file():
        raise ExportError(f"{llm_dir / 'tokenizer.json'} does not exist; the bundle needs a fast-tokenizer "
                          "tokenizer.json (save the tokenizer with save_pretrained)")
    return config, weights, generation


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return data


def _read_safetensors(llm_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # torch reads bfloat16, numpy cannot

    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in llm_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{llm_dir} holds no *.safetensors weights (save the model with save_pretrained)")
    weights = {}
    for name in files:
        path = llm_dir / name
        if not path.is_file():
            raise ExportError(f"{path} is listed in {index.name} but does not exist")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{path} is not a readable safetensors file: {e}") from e
        weights.update({k: v.float().numpy() for k, v in tensors.items()})
    return weights


def _token_id(*sources, key: str):
    for source in sources:
        value = source.get(key)
        if value is not None:
            return value
    return None


def export_llm(llm_dir: str | Path, writer: BundleWriter, attention: str = "auto", max_length: int | None = None,
               project_down: tuple[np.ndarray, np.ndarray] | None = None,
               project_up: tuple[np.ndarray, np.ndarray] | None = None,
               image_token_id: int | None = None) -> dict:
    """Write embed.onnx and decoder.onnx for the LLM in `llm_dir`; returns the ModelSpec
    fields they define (the caller adds image fields and builds the ModelSpec)."""
    config, weights, generation = load_llm(llm_dir)
    dims = decoder_dims(config)
    if max_length is None:
        max_length = min(int(getattr(config, "max_position_embeddings", DEFAULT_MAX_LENGTH)), DEFAULT_MAX_LENGTH)
    if max_length < 1:
        raise ExportError(f"--max-length must be >= 1, got {max_length}")
    variant = resolve_attention(attention, dims.head_dim)
    if attention == "auto" and variant != "gqa":
        print(f"  head_dim {dims.head_dim} is not a multiple of 16 (GroupQueryAttention's CPU kernel): "
              "using standard attention")

    print(f"  embed: vocab {dims.vocab_size} x hidden {dims.hidden_size}")
    writer.add_graph("embed", build_embed(weights, config, image_token_id=image_token_id, project_up=project_up),
                     profiles=_embed_profiles(max_length, project_up))
    print(f"  decoder: {dims.num_layers} layers, {dims.num_heads} heads ({dims.num_kv_heads} kv) x {dims.head_dim}, "
          f"attention {variant}, max_length {max_length}")
    decoder = build_decoder(config, weights, variant, max_length, project_down=project_down)
    del weights
    writer.add_graph("decoder", decoder, profiles=_decoder_profiles(dims, max_length))

    config_dict = config.to_dict()
    return dict(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, max_length=max_length,
        kv=KVSpec(num_layers=dims.num_layers, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
                  dtype="float32", attention=variant),
        bos_token_id=_token_id(generation, config_dict, key="bos_token_id"),
        eos_token_id=_token_id(generation, config_dict, key="eos_token_id"),
        pad_token_id=_token_id(generation, config_dict, key="pad_token_id"),
        generation={k: v for k, v in generation.items()
                    if k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")},
        architecture="LlamaForCausalLM",
        source={"llm": Path(llm_dir).name, "rope_parameters": getattr(config, "rope_parameters", None)},
    )


def _special_tokens(path: Path) -> dict[str, int]:
    added = _read_json(path).get("added_tokens") or []
    return {t["content"]: t["id"] for t in added if t.get("special") and "content" in t and "id" in t}


# TensorRT needs a shape range per dynamic input; batch up to this many rows.
MAX_PROFILE_BATCH = 8


def _embed_profiles(max_length: int, project_up) -> dict:
    profiles = {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [MAX_PROFILE_BATCH, max_length]}}
    if project_up is not None:
        visual_dim = int(project_up[0].shape[1])
        profiles["image_embeds"] = {"min": [0, visual_dim], "opt": [1, visual_dim],
                                    "max": [MAX_PROFILE_BATCH * max_length, visual_dim]}
    return profiles


def _decoder_profiles(dims, max_length: int) -> dict:
    kv = {"min": [1, dims.num_kv_heads, max_length, dims.head_dim],
          "opt": [1, dims.num_kv_heads, max_length, dims.head_dim],
          "max": [MAX_PROFILE_BATCH, dims.num_kv_heads, max_length, dims.head_dim]}
    profiles = {"inputs_embeds": {"min": [1, 1, dims.hidden_size], "opt": [1, 1, dims.hidden_size],
                                  "max": [MAX_PROFILE_BATCH, max_length, dims.hidden_size]},
                "seqlens_k": {"min": [1], "opt": [1], "max": [MAX_PROFILE_BATCH]}}
    for i in range(dims.num_layers):
        for part in ("key", "value"):
            profiles[f"past_key_values.{i}.{part}"] = kv
    return profiles
