"""Model and training configuration: one dataclass, named presets (gpt-fast style)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field


# Checkpoints (emu.json "config") and run folders (train_config.json) written before the
# decoder fields took the manifest's names: from_dict reads them under their old names.
RENAMED_FIELDS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
                  "kv_heads": "num_kv_heads", "intermediate": "intermediate_size"}


@dataclass
class EmuConfig:
    preset: str = "custom"
    image_size: int = 32
    # Vision encoder (transformers CLIPVisionModel); the patch grid is mean-pooled to
    # n_query embeddings per image, and coarser (frame_n_query) per video frame.
    patch_size: int = 4
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    n_query: int = 64
    frame_n_query: int = 4
    # Decoder (transformers LlamaForCausalLM); named as in the manifest (runtime.manifest).
    vocab_size: int = 512
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_length: int = 512
    # Visual decoder (diffusers UNet2DConditionModel, pixel space).
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    unet_attn_levels: int = 2  # cross-attention at the lowest-resolution levels only
    unet_layers_per_block: int = 1
    unet_head_dim: int = 8
    unet_norm_groups: int = 8
    train_timesteps: int = 1000
    # v-prediction (Salimans & Ho, 2022): with eps-prediction and a few thousand steps the
    # U-Net left visible noise on the flat black backgrounds; v stays well scaled at every
    # noise level.
    prediction_type: str = "v_prediction"
    cfg_drop: float = 0.1
    # Training (per stage; --steps on the command line overrides `steps`).
    batch_size: int = 32
    # Text stages run each rank's batch as this many length-sorted chunks (same gradient,
    # far less padding: stage 4 mixes 85-token questions with 300-token few-shot episodes).
    text_chunks: int = 4
    steps: dict[str, int] = field(default_factory=lambda: {"0": 2000, "1": 1500, "2": 3000, "3": 800, "4": 1200,
                                                           "5": 800})
    lr: dict[str, float] = field(default_factory=lambda: {"0": 1e-3, "1": 2e-3, "2": 1e-3, "3": 1e-3, "4": 1e-3,
                                                          "5": 3e-4})
    # Per-stage task weights that replace the stage's own mixture (train.STAGES); `--mix`.
    mixes: dict[str, dict[str, float]] = field(default_factory=dict)
    encoder_lr: float = 5e-4  # peak for the vision encoder (it trains in stages 0 and 1 only)
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    regress_weight: float = 1.0
    save_every: int = 100
    seed: int = 0

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> "EmuConfig":
        for name, n in (("n_query", self.n_query), ("frame_n_query", self.frame_n_query)):
            side = round(n ** 0.5)
            if side * side != n or self.patch_grid % side:
                raise ValueError(f"{name}={n} must be a square whose side divides the patch grid {self.patch_grid}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EmuConfig":
        renamed = [(old, new) for old, new in RENAMED_FIELDS.items() if old in d and new in d]
        if renamed:
            raise ValueError("config gives both the old and the new name of " + ", ".join(
                f"{new} ({old})" for old, new in renamed))
        d = {RENAMED_FIELDS.get(k, k): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("prediction_type", "epsilon")  # configs written before the field trained eps
        for key in ("steps", "lr"):  # configs written before a stage existed lack its entry
            if key in d:
                d[key] = {**getattr(cls(), key), **d[key]}
        if "unet_channels" in d:
            d["unet_channels"] = tuple(d["unet_channels"])
        return cls(**d).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PRESETS: dict[str, EmuConfig] = {
    # Trains a few steps in seconds: for tests.
    "tiny": EmuConfig(
        preset="tiny", image_size=16, patch_size=4, vision_hidden=32, vision_layers=1,
        vision_heads=2, vision_intermediate=64, n_query=4, frame_n_query=1,
        vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        max_length=256,
        unet_channels=(16, 32), unet_attn_levels=1, unet_head_dim=8, unet_norm_groups=8, batch_size=8,
        steps={"0": 20, "1": 20, "2": 20, "3": 20, "4": 20, "5": 20}, warmup=5, save_every=10,
    ),
    # The shipped default.
    "small": EmuConfig(preset="small"),
}


def get_preset(name: str) -> EmuConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]).validate()
