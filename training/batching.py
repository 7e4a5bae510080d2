"""Samples from emu_edge.data -> padded tensors for one training step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emu_edge.runtime.prompt import PromptBuilder

# Pixels go to the encoder and the U-Net in [-1, 1]: mean 0.5, std 0.5 per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [B, S] right-padded
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S] next-token targets, -100 = no loss
    regress: torch.Tensor  # [B, S] bool: hidden state regresses the next position's embedding
    images: torch.Tensor | None  # [Ni, 3, H, W] single images, in order of appearance
    frames: torch.Tensor | None  # [Nf, 3, H, W] video frames, in order of appearance
    order: list[tuple[str, int, int]]  # per visual in sequence order: (kind, first row, rows)


def collate(samples, builder: PromptBuilder, pad_id: int) -> TextBatch:
    encoded = [builder.encode(s.task, [(seg.kind, seg.value) for seg in s.segments]) for s in samples]
    length = max(len(e.ids) for e in encoded)
    b = len(encoded)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    targets = torch.full((b, length), -100, dtype=torch.long)
    regress = torch.zeros((b, length), dtype=torch.bool)
    images, frames, order = [], [], []
    for row, e in enumerate(encoded):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(e.targets)
        regress[row, :n] = torch.tensor(e.regress)
        for kind, value in e.visuals:
            if kind == "image":
                order.append(("image", len(images), 1))
                images.append(value)
            else:
                order.append(("frames", len(frames), len(value)))
                frames.extend(value)
    return TextBatch(
        ids, mask, targets, regress,
        to_pixels(np.stack(images)) if images else None,
        to_pixels(np.stack(frames)) if frames else None,
        order,
    )


def visual_sequence(batch: TextBatch, image_embeds, frame_embeds) -> torch.Tensor | None:
    """Per-visual embeddings concatenated in sequence order: [M, visual_dim]."""
    parts = []
    for kind, first, rows in batch.order:
        src = image_embeds if kind == "image" else frame_embeds
        parts.append(src[first:first + rows].flatten(0, 1))
    return torch.cat(parts) if parts else None


def image_of(sample) -> np.ndarray:
    """The picture a U-Net learns to draw from a sample: its target, else its first image."""
    for kind in ("target_image", "image"):
        for seg in sample.segments:
            if seg.kind == kind:
                return seg.value
    raise ValueError(f"sample of task {sample.task!r} has no image")
