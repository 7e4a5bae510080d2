"""The Emu model at small scale, built from the real transformers/diffusers classes.

Pure model code: no training loop, no generation, no export (STYLE.md 1).

    image -> CLIPVisionModel -> drop class token -> post-LN -> mean-pool grid to n_query
          -> visual embeddings [B, N, visual_dim]
    project_up:   visual_dim -> hidden   (embeddings spliced into the decoder input)
    project_down: hidden -> visual_dim   (the regression head)
    LlamaForCausalLM over interleaved token and visual embeddings
    UNet2DConditionModel (pixel space) conditioned on the N visual embeddings
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emu_edge.training.batching import ATTRIBUTE_CLASSES
from emu_edge.training.config import EmuConfig


def vision_config(cfg: EmuConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_intermediate, num_channels=3,
    )


def llm_config(cfg: EmuConfig, token_ids: dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_length, tie_word_embeddings=False,
        bos_token_id=token_ids["<s>"], eos_token_id=token_ids["</s>"], pad_token_id=token_ids["<pad>"],
    )


def unet_kwargs(cfg: EmuConfig) -> dict:
    n, a = len(cfg.unet_channels), cfg.unet_attn_levels
    # Cross-attention only at the coarse levels: at 32x32 it costs most at full resolution
    # and the condition (what, which colour, where) is global anyway.
    down = ("DownBlock2D",) * (n - a) + ("CrossAttnDownBlock2D",) * a
    up = ("CrossAttnUpBlock2D",) * a + ("UpBlock2D",) * (n - a)
    return dict(
        sample_size=cfg.image_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=cfg.vision_hidden,
        attention_head_dim=cfg.unet_head_dim, norm_num_groups=cfg.unet_norm_groups,
    )


def noise_scheduler(cfg: EmuConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2",
        prediction_type=cfg.prediction_type, clip_sample=False, timestep_spacing="leading",
    )


class VisionEncoder(nn.Module):
    """CLIPVisionModel + the pooling to N embeddings. pixel_values [B, 3, S, S] in the
    normalised range -> [B, n, visual_dim]."""

    def __init__(self, cfg: EmuConfig, vision=None):
        super().__init__()
        from transformers import CLIPVisionModel

        self.model = vision if vision is not None else CLIPVisionModel(vision_config(cfg))
        self.grid = cfg.patch_grid

    def forward(self, pixel_values: torch.Tensor, n: int) -> torch.Tensor:
        h = self.model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop class token
        h = self.model.vision_model.post_layernorm(h) if hasattr(self.model, "vision_model") else self.model.post_layernorm(h)
        b, _, d = h.shape
        grid = h.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        side = round(n ** 0.5)
        pooled = F.adaptive_avg_pool2d(grid, side)  # [B, d, side, side]
        return pooled.flatten(2).transpose(1, 2)  # [B, n, d], row-major over the grid


class EmuModel(nn.Module):
    def __init__(self, cfg: EmuConfig, token_ids: dict[str, int], vision=None, llm=None, unet=None):
        super().__init__()
        from diffusers import UNet2DConditionModel
        from transformers import LlamaForCausalLM

        self.cfg = cfg
        self.token_ids = dict(token_ids)
        self.encoder = VisionEncoder(cfg, vision)
        self.llm = llm if llm is not None else LlamaForCausalLM(llm_config(cfg, token_ids))
        self.project_up = nn.Linear(cfg.vision_hidden, cfg.hidden_size)
        self.project_down = nn.Linear(cfg.hidden_size, cfg.vision_hidden)
        self.unet = unet if unet is not None else UNet2DConditionModel(**unet_kwargs(cfg))
        self.scheduler = noise_scheduler(cfg)
        # Stage 0 only (never exported): per-embedding attribute logits, the stand-in for the
        # pretraining Emu2's EVA-CLIP encoder arrives with.
        self.attribute_head = nn.Linear(cfg.vision_hidden, sum(len(v) for v in ATTRIBUTE_CLASSES.values()))

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every <image> position replaced, in row-major order, by
        project_up of the next visual embedding. input_ids [B, S]; visual [M, visual_dim]."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.token_ids["<image>"]
        if visual is not None and visual.shape[0]:
            if int(mask.sum()) != visual.shape[0]:
                raise ValueError(f"{int(mask.sum())} <image> tokens but {visual.shape[0]} visual embeddings")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), self.project_up(visual).to(embeds.dtype))
        return embeds

    def decode(self, inputs_embeds, attention_mask=None, **kwargs):
        """Decoder forward; returns (logits [B,S,V], regressed [B,S,visual_dim], outputs)."""
        out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        return self.llm.lm_head(hidden), self.project_down(hidden), out

    def diffusion_loss(self, images: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                       timesteps: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Diffusion loss, the target per cfg.prediction_type. images [B,3,S,S] in [-1,1];
        cond [B,N,D]; drop [B] bool:
        condition replaced by zeros (the unconditional embedding) for classifier-free guidance."""
        cond = torch.where(drop[:, None, None], torch.zeros_like(cond), cond)
        noisy = self.scheduler.add_noise(images, noise, timesteps)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        kind = self.cfg.prediction_type
        target = {"epsilon": noise, "sample": images}.get(kind)
        if target is None:
            target = self.scheduler.get_velocity(images, noise, timesteps)
        return F.mse_loss(pred, target)
