"""Emu3's VQ-VAE (transformers' Emu3VQVAE) as a trainable model: the class has no training
code, so the straight-through path, the EMA codebook and the loss are here.

    pixels [B, 3, H, W] -> encoder, quant_conv -> z [B, T, D, h, w]
                        -> nearest code (the class's own quantizer) -> z_q
    z + (z_q - z).detach()  -> post_quant_conv, decoder -> pixels [B, 3, H, W]

`encode` and `decode` compute what Emu3VQVAE.encode and .decode compute (an image is a
clip of `temporal_downsample_factor` copies; frame 0 of the decoded clip is the image), so
a trained model works through the exporter and the runtime unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emu_edge.training.config import VQConfig


def build_vq(cfg: VQConfig):
    """A fresh Emu3VQVAE of the config, from torch's current RNG state."""
    from transformers import Emu3VQVAE

    vq = Emu3VQVAE(cfg.vq_config())
    # The class's init (Kaiming, fan_out, through unnormalised residual stacks) puts the
    # decoder's output at about 7 times the pixels' spread: a first probe spent its first 20
    # steps only shrinking it (MSE 50 -> 1). Starting the last convolution at zero starts
    # every image at the processor's mean instead.
    nn.init.zeros_(vq.decoder.conv_out.weight)
    nn.init.zeros_(vq.decoder.conv_out.bias)
    return vq


def image_processor(cfg: VQConfig):
    """The Emu3ImageProcessor the model is trained for: its defaults (rescale 1/255, CLIP
    mean and std, spatial factor 8), with the pixel range pinned to the training size so
    that the processor leaves our images at it."""
    from transformers import Emu3ImageProcessor

    area = cfg.image_size * cfg.image_size
    return Emu3ImageProcessor(min_pixels=area, max_pixels=area, spatial_factor=cfg.spatial_factor)


def to_pixels(images: np.ndarray, processor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised as the processor normalises
    (rescaled in float64, then mean and std in float32: its own arithmetic)."""
    x = (np.asarray(images).astype(np.float64) * processor.rescale_factor).astype(np.float32)
    x = (x - np.asarray(processor.image_mean, np.float32)) / np.asarray(processor.image_std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_images(pixels: torch.Tensor, processor) -> np.ndarray:
    """float [B, 3, H, W] in the processor's space -> uint8 [B, H, W, 3], as its postprocess
    (and the runtime) turn decoded pixels into an image: unnormalised, clipped, truncated."""
    x = pixels.detach().float().numpy().transpose(0, 2, 3, 1)
    x = x * np.asarray(processor.image_std, np.float32) + np.asarray(processor.image_mean, np.float32)
    x = (x.astype(np.float64) / processor.rescale_factor).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def unit_range(pixels: torch.Tensor, processor) -> torch.Tensor:
    """Processor-space pixels -> [0, 1] (for PSNR)."""
    mean = torch.tensor(processor.image_mean, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=pixels.dtype)[:, None, None]
    return pixels * std + mean


def encode(vq, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> the quantizer's input z: [B, T, D, h, w] (T = 1 for an image)."""
    clip = pixels.unsqueeze(1).repeat(1, vq.config.temporal_downsample_factor, 1, 1, 1)
    hidden = vq.encoder(clip)                                   # [B, T, C, h, w]
    return vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)


def decode(vq, z: torch.Tensor) -> torch.Tensor:
    """z (codes' embeddings, or the straight-through mix) [B, T, D, h, w] -> [B, 3, H, W]."""
    batch = z.shape[0]
    quant = z.permute(0, 2, 1, 3, 4)                            # [B, D, T, h, w]
    post = vq.post_quant_conv(quant)
    clip = vq.decoder(post.permute(0, 2, 1, 3, 4), quant.permute(0, 2, 1, 3, 4))  # [B * T', 3, H, W]
    return clip.reshape(batch, -1, *clip.shape[1:])[:, 0]


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: the number of equally used codes it is worth."""
    p = counts.float() / counts.sum().clamp(min=1)
    return float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum()))


class EMACodebook(nn.Module):
    """The averages that move a codebook (the class's `quantize.embedding.weight`, passed in
    as `weight`): each code is the exponential moving average of the encoder outputs it is
    chosen for (van den Oord et al., 2017, appendix), and a dead code restarts at an encoder
    output of the batch. They are buffers, so they travel in the training state and a
    resumed run continues them exactly."""

    def __init__(self, size: int, dim: int, decay: float, dead_after: int, eps: float = 1e-5):
        super().__init__()
        self.decay, self.dead_after, self.eps = decay, dead_after, eps
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("last_used", torch.zeros(size, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def start(self, weight: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> None:
        """Every code at an encoder output of the first batch, z [N, D]: the class
        initialises codes within +-1/K of zero, far from where encoder outputs lie, and
        nearly every vector would pick the same few."""
        self._restart(weight, torch.ones(len(weight), dtype=torch.bool), z, 0, generator)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, weight: torch.Tensor, z: torch.Tensor, codes: torch.Tensor, step: int,
               generator: torch.Generator) -> dict:
        """z [N, D] and the codes chosen for them [N]; returns this step's usage figures."""
        size = weight.shape[0]
        counts = torch.bincount(codes, minlength=size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a rarely chosen code's mean finite.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + size * self.eps) * total
        weight.copy_(self.embed_sum / smoothed[:, None])
        self.last_used[counts > 0] = step
        dead = step - self.last_used >= self.dead_after
        if dead.any():
            self._restart(weight, dead, z, step, generator)
        return {"perplexity": perplexity(counts), "codes_used": int((counts > 0).sum()),
                "dead_codes": int(dead.sum())}

    def _restart(self, weight: torch.Tensor, which: torch.Tensor, z: torch.Tensor, step: int,
                 generator: torch.Generator) -> None:
        picks = torch.randint(0, z.shape[0], (int(which.sum()),), generator=generator)
        weight[which] = z[picks]
        self.embed_sum[which] = z[picks]
        self.cluster_size[which] = 1.0
        self.last_used[which] = step


@dataclass
class VQStep:
    loss: torch.Tensor
    parts: dict[str, float]
    recon: torch.Tensor   # [B, 3, H, W], detached
    z: torch.Tensor       # [N, D] the encoder outputs that were quantized, detached
    codes: torch.Tensor   # [N] the codes chosen for them


class VQTrainer(nn.Module):
    """Emu3VQVAE and its EMA codebook; forward is the training loss of one batch."""

    def __init__(self, vq, cfg: VQConfig):
        super().__init__()
        self.vq = vq
        self.cfg = cfg
        self.codebook = EMACodebook(cfg.codebook_size, cfg.embed_dim, cfg.ema_decay, cfg.dead_after)
        # The codebook moves by its averages, not by gradients.
        vq.quantize.embedding.weight.requires_grad_(False)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.vq.parameters() if p.requires_grad]

    @torch.no_grad()
    def start_codebook(self, pixels: torch.Tensor, generator: torch.Generator) -> None:
        z = encode(self.vq, pixels)
        self.codebook.start(self.vq.quantize.embedding.weight, _flat(z), generator)

    def update_codebook(self, step: VQStep, index: int, generator: torch.Generator) -> dict:
        return self.codebook.update(self.vq.quantize.embedding.weight, step.z, step.codes, index, generator)

    def forward(self, pixels: torch.Tensor) -> VQStep:
        z = encode(self.vq, pixels)                             # [B, T, D, h, w]
        codes = self.vq.quantize(z)                             # [B, T, h, w]: the class's own argmin
        z_q = self.vq.quantize.embedding(codes).permute(0, 1, 4, 2, 3)
        # Straight-through: the decoder sees the codes, the encoder gets the decoder's gradient.
        recon = decode(self.vq, z + (z_q - z).detach())
        rec = F.mse_loss(recon, pixels)
        commit = F.mse_loss(z, z_q)
        return VQStep(rec + self.cfg.commitment * commit, {"recon": float(rec.detach()), "commit": float(commit.detach())},
                      recon.detach(), _flat(z.detach()), codes.flatten())


def _flat(z: torch.Tensor) -> torch.Tensor:
    """[B, T, D, h, w] -> [B * T * h * w, D], in the order of the quantizer's codes."""
    return z.permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2])
