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


# --- emu3 ---------------------------------------------------------------------------------

@dataclass
class VQConfig:
    """emu3's stage 0: transformers' Emu3VQVAE, trained here as the stand-in for the vision
    tokenizer Emu3 starts from (as emu2's stage 0 stands in for EVA-CLIP)."""

    preset: str = "custom"
    image_size: int = 64
    # Emu3VQVAEConfig's fields. Four levels make the spatial factor 8 that Emu3ImageProcessor
    # resizes to; channels are multiples of 32 (every norm is a GroupNorm of 32 groups).
    codebook_size: int = 512
    embed_dim: int = 8  # also latent_channels: the decoder runs codes and embeddings through one stack
    base_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    # An image is a clip of this many copies of itself; 1 means no temporal layers at all.
    temporal_downsample_factor: int = 1
    # Images: the weight of each emu_edge.data task whose picture is drawn.
    tasks: dict[str, float] = field(default_factory=lambda: {"captioning": 0.5, "text_to_image": 0.25,
                                                             "digits": 0.25})
    # Training. At equal time on one core, batches of 16 beat batches of 32 clearly (a probe:
    # PSNR 24 against 20 dB after 2.5 minutes): the early steps gain from more updates.
    batch_size: int = 16
    steps: int = 520
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    commitment: float = 0.25  # beta of the commitment term (van den Oord et al., 2017)
    ema_decay: float = 0.95
    # A code no batch has chosen for this many steps is dead: it restarts at an encoder output.
    dead_after: int = 20
    save_every: int = 50
    seed: int = 0
    judge_steps: int | None = None  # the judge's training steps (None: train_judge's default)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    def vq_config(self):
        """The transformers Emu3VQVAEConfig of this model."""
        from transformers import Emu3VQVAEConfig

        return Emu3VQVAEConfig(
            codebook_size=self.codebook_size, embed_dim=self.embed_dim, latent_channels=self.embed_dim,
            temporal_downsample_factor=self.temporal_downsample_factor, base_channels=self.base_channels,
            channel_multiplier=list(self.channel_multiplier), num_res_blocks=self.num_res_blocks,
            attn_resolutions=list(self.attn_resolutions),
            # The middle blocks' attention runs at the deepest level's width.
            hidden_size=self.base_channels * self.channel_multiplier[-1], num_attention_heads=1)

    def validate(self) -> "VQConfig":
        widths = [self.base_channels * m for m in self.channel_multiplier]
        if any(w % 32 for w in widths):
            raise ValueError(f"base_channels x channel_multiplier must be multiples of 32 (GroupNorm(32)); "
                             f"got {widths}")
        if self.image_size % self.spatial_factor:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the spatial factor "
                             f"{self.spatial_factor}")
        factor = self.temporal_downsample_factor
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"temporal_downsample_factor must be a power of 2, got {factor}")
        if self.codebook_size < 2 or self.embed_dim < 1:
            raise ValueError("codebook_size must be >= 2 and embed_dim >= 1")
        if not 0 <= self.ema_decay < 1 or self.dead_after < 1:
            raise ValueError("ema_decay must lie in [0, 1) and dead_after be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("channel_multiplier", "attn_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


VQ_PRESETS: dict[str, VQConfig] = {
    # 32-px images, 4 x 4 codes, a few steps in seconds: for tests.
    "tiny": VQConfig(preset="tiny", image_size=32, codebook_size=32, embed_dim=4, batch_size=4, steps=6,
                     warmup=2, save_every=3, dead_after=2, judge_steps=10),
    # 64-px images, 8 x 8 codes: the VQ-VAE of emu3-edge-small.
    "small": VQConfig(preset="small"),
}


def get_vq_preset(name: str) -> VQConfig:
    if name not in VQ_PRESETS:
        raise ValueError(f"unknown emu3 preset {name!r}; presets: {', '.join(VQ_PRESETS)}")
    return copy.deepcopy(VQ_PRESETS[name]).validate()


@dataclass
class Emu3Config:
    """emu3's stage 1: the decoder, transformers' Emu3ForConditionalGeneration, over one
    vocabulary of our text tokens, Emu3's special tokens and one token per VQ code. The
    VQ-VAE (and the image size) are stage 0's, read from the run's vq/ folder."""

    preset: str = "custom"
    text_vocab_size: int = 512  # the byte-level BPE's share of the vocabulary (specials included)
    # The text model (Emu3TextConfig: Llama's block); head size a multiple of 16 for the
    # exporter's GroupQueryAttention on CPU.
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 512
    # Training samples: the weight of each emu_edge.data task written in Emu3's formats.
    # Few-shot episodes (3-5 images, 250-400 tokens) and video are left out by default:
    # each costs the tokens of four captions, and the runtime reads no clips.
    tasks: dict[str, float] = field(default_factory=lambda: {"captioning": 0.2, "vqa": 0.25, "digits": 0.1,
                                                             "text_to_image": 0.4, "chat": 0.05})
    # Text-to-image prompts replaced by the empty prompt: the unconditional branch of
    # classifier-free guidance, and the negative prompt the folder records.
    cfg_drop: float = 0.1
    # Batches of 16: on one core, more updates beat larger batches early (as for the VQ-VAE).
    batch_size: int = 16
    text_chunks: int = 2  # length-sorted chunks per batch (the gradient of one padded batch)
    steps: int = 2400
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_every: int = 100
    seed: int = 0
    # The finished emu3 folder (--init-from) whose weights the run started from, if any.
    init_from: str | None = None
    # bfloat16 autocast (fp32 weights and optimizer): a step at batch 16 took 0.75 s instead
    # of 1.05 s on one Zen 4 core (AVX-512 BF16); where the CPU lacks bf16 it may be slower.
    bf16: bool = True
    # Generation defaults written into generation_config.json (tuned on val).
    guidance_scale: float = 3.0
    top_k: int = 0
    max_new_tokens: int = 32

    def text_config(self, vocab_size: int, token_ids: dict[str, int]) -> dict:
        """Emu3TextConfig's fields."""
        return dict(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                    num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings,
                    bos_token_id=token_ids["bos"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])

    def validate(self) -> "Emu3Config":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if not 0 <= self.cfg_drop < 1:
            raise ValueError(f"cfg_drop must lie in [0, 1), got {self.cfg_drop}")
        from emu_edge.data import check_tasks

        check_tasks(self.tasks)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Emu3Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


EMU3_PRESETS: dict[str, Emu3Config] = {
    # A few steps in seconds, over the tiny VQ-VAE's 4 x 4 codes: for tests.
    "tiny": Emu3Config(preset="tiny", text_vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_position_embeddings=256, batch_size=8, steps=6, warmup=2,
                       save_every=3, bf16=False),
    # Sized with the small VQ-VAE (1.06M) for a folder under 20 MB in fp16.
    "small": Emu3Config(preset="small"),
}


def get_emu3_preset(name: str) -> Emu3Config:
    if name not in EMU3_PRESETS:
        raise ValueError(f"unknown emu3 preset {name!r}; presets: {', '.join(EMU3_PRESETS)}")
    return copy.deepcopy(EMU3_PRESETS[name]).validate()
