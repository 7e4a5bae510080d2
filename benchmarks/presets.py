"""Random-weight checkpoints big enough to be memory-bound, in our checkpoint format.

Each preset is an EmuConfig written by the training code's own save_checkpoint (HF folders
per component), so every peer loads the same weights from the same files: transformers
and diffusers with from_pretrained, onnxruntime-genai's builder from llm/, our runtime
from the exported bundle.

    decoder-30m   Llama, hidden 512, 8 layers (8 heads x 64), MLP 1408, vocab 4096:
                  29.9M parameters, 111 MB of fp32 weights read per decoded token
    unet-10m-32   diffusers U-Net, channels (64, 128, 128, 160): 10.3M parameters, 32x32
    unet-10m-64   the same U-Net at 64x64

The -smoke presets are the same shapes shrunk until a whole pass takes seconds (CI).
Emu3 presets (transformers folders, not our checkpoints) are in emu3_presets.py;
checkpoint_for builds either.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# Parts every preset shares: a small vision encoder (it only feeds the regression prompt
# and the U-Net's conditioning width) on a 16 x 16 patch grid, so that N = 16, 64 and 256
# embeddings per image are all valid (a square whose side divides the grid).
_BASE = dict(image_size=64, patch_size=4, vision_hidden=128, vision_layers=2, vision_heads=4,
             vision_intermediate=256, n_query=64, frame_n_query=4)
# A small decoder (for the U-Net presets and the smoke pass) with room for a few images
# of 64 embeddings each, as calibration prompts have.
_SMALL_LLM = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_length=1024)
_TINY_UNET = dict(unet_channels=(16, 32), unet_attn_levels=1, unet_head_dim=8, unet_norm_groups=8)
_UNET_10M = dict(unet_channels=(64, 128, 128, 160), unet_attn_levels=2, unet_head_dim=8, unet_norm_groups=8)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict = field(default_factory=dict)  # EmuConfig fields over _BASE

    def emu_config(self):
        from emu_edge.training.config import EmuConfig

        return EmuConfig(preset=self.name, **{**_BASE, **self.config}).validate()

    def key(self) -> str:
        """Changes whenever the weights a preset builds would change."""
        text = json.dumps({"name": self.name, "config": self.config, "base": _BASE, "init": INIT_VERSION},
                          sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# Bumped when _randomize changes, so cached checkpoints are rebuilt.
INIT_VERSION = 1

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("decoder-30m", "Llama decoder, hidden 512, 8 layers, vocab 4096 (~30M parameters)",
           dict(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                intermediate_size=1408, max_length=2304, **_TINY_UNET)),
    Preset("unet-10m-32", "diffusers U-Net, ~10M parameters, 32x32",
           dict(_SMALL_LLM, image_size=32, patch_size=2, **_UNET_10M)),
    Preset("unet-10m-64", "diffusers U-Net, ~10M parameters, 64x64",
           dict(_SMALL_LLM, **_UNET_10M)),
    # CI smoke sizes: same code paths, seconds instead of minutes.
    Preset("decoder-smoke", "Llama decoder, hidden 64, 2 layers, vocab 512",
           dict(_SMALL_LLM, image_size=16, patch_size=1, vision_layers=1, **_TINY_UNET)),
    Preset("unet-smoke-16", "diffusers U-Net (16, 32) at 16x16",
           dict(_SMALL_LLM, image_size=16, patch_size=1, vision_layers=1, **_TINY_UNET)),
    Preset("unet-smoke-32", "diffusers U-Net (16, 32) at 32x32",
           dict(_SMALL_LLM, image_size=32, patch_size=2, vision_layers=1, **_TINY_UNET)),
]}


def _randomize(model, seed: int) -> None:
    """Weights of a trained model's scale: variance-preserving linears, and an output layer
    sharp enough that greedy choices are decisive (so int4-vs-fp32 token agreement measures
    quantization error, not ties between near-equal random logits)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.llm.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        model.llm.lm_head.weight.mul_(5.0)
        for p in model.unet.parameters():
            # diffusers zero-initialises some output convolutions; a U-Net of zeros would
            # make INT8 errors meaningless (0 relative to 0).
            if p.dim() > 1 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.02, generator=gen)


def build_checkpoint(preset: Preset, out: Path, seed: int = 0) -> Path:
    """Write the preset's random-weight checkpoint to `out` (through save_checkpoint)."""
    import torch

    from emu_edge import data
    from emu_edge.training.checkpoint import save_checkpoint
    from emu_edge.training.model import EmuModel
    from emu_edge.training.tokenizer import special_token_ids, train_tokenizer

    cfg = preset.emu_config()
    # The corpus yields fewer tokens than a 4096 vocabulary: the decoder keeps its full
    # vocabulary (that is what it costs to run) and the tokenizer covers its first ids.
    tokenizer = train_tokenizer(data.corpus(), min(cfg.vocab_size, 512))
    torch.manual_seed(seed)
    model = EmuModel(cfg, special_token_ids(tokenizer)).eval()
    _randomize(model, seed)
    save_checkpoint(model, tokenizer, cfg, out)
    return out


def checkpoint_for(name: str, cache: Path) -> Path:
    """The preset's checkpoint under `cache` (an Emu3 preset's: its transformers folder),
    built once per preset version."""
    from .emu3_presets import EMU3_PRESETS, build_folder

    if name in PRESETS:
        preset, leaf, marker, build = PRESETS[name], "checkpoint", "emu.json", build_checkpoint
    elif name in EMU3_PRESETS:
        preset, leaf, marker, build = EMU3_PRESETS[name], "folder", "config.json", build_folder
    else:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join([*PRESETS, *EMU3_PRESETS])}")
    return built_once(Path(cache) / f"{name}-{preset.key()}" / leaf, marker, lambda tmp: build(preset, tmp))


def built_once(out: Path, marker: str, build) -> Path:
    """`out` once it holds `marker`; else build(tmp) writes it beside, then it is renamed
    into place, so an interrupted build is never taken for a finished one."""
    if (out / marker).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(out)
    return out


def parameters(checkpoint: Path, component: str) -> int:
    """Parameter count of llm/, vision/ or unet/ from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in sorted((Path(checkpoint) / component).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total



