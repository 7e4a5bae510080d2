"""Samples from emu_edge.data -> padded tensors for one training step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emu_edge import data
from emu_edge.data.scenes import render_objects
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


def encode(samples, builder: PromptBuilder) -> list:
    return [builder.encode(s.task, [(seg.kind, seg.value) for seg in s.segments]) for s in samples]


def length_chunks(encoded: list, chunks: int) -> list[list]:
    """Encoded samples sorted by length and cut into `chunks` runs of near-equal size, so
    each run pads only to its own longest: a 4-shot sequence no longer pads 31 one-image
    questions to its length."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    return [[encoded[i] for i in part] for part in np.array_split(order, min(chunks, len(encoded)))]


def collate(encoded: list, pad_id: int) -> TextBatch:
    """Encoded samples (see `encode`) -> one right-padded batch."""
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


# Stage 0's per-embedding labels. Digits are drawn white and have no size class.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": ("none", *data.COLOURS, "white"),
    "shape": ("none", *data.SHAPES, *data.DIGIT_WORDS),
    "size": ("none", *data.SIZES),
}
# A cell is labelled with the object covering most of it, if that covers at least this much:
# a small object spans only 2-3 cells at 32 px, so its edge cells must count.
MIN_COVERAGE = 0.1
_CLASS_INDEX = {k: {name: i for i, name in enumerate(v)} for k, v in ATTRIBUTE_CLASSES.items()}


def _cell_coverage(mask: np.ndarray, side: int) -> np.ndarray:
    """[S, S] coverage in [0, 1] -> mean per cell of a side x side grid, row-major [side*side]."""
    s = mask.shape[0]
    return mask.reshape(side, s // side, side, s // side).mean(axis=(1, 3)).reshape(-1)


def attribute_targets(sample, n: int) -> torch.Tensor:
    """Class indices [n, 3] (colour, shape, size) for the n pooled embeddings of a captioning
    or digits sample's image; -100 where a class does not apply."""
    side = round(n ** 0.5)
    idx = _CLASS_INDEX
    out = np.zeros((n, 3), dtype=np.int64)  # 0 is "none" in every group
    image = image_of(sample)
    if sample.task == "digits":
        cover = _cell_coverage(image.mean(-1) / 255.0, side)
        ink = cover >= MIN_COVERAGE
        out[ink] = (idx["colour"]["white"], idx["shape"][data.DIGIT_WORDS[sample.meta["digit"]]], -100)
        return torch.from_numpy(out)
    objects = sample.meta["scene"].objects
    size = image.shape[0]
    # Each object rendered alone, at the scene's size scale, gives its exact coverage.
    cover = np.stack([_cell_coverage(render_objects([o], size, n_objects=len(objects)).max(-1) > 0, side)
                      for o in objects])
    best = cover.argmax(0)
    for cell in np.flatnonzero(cover.max(0) >= MIN_COVERAGE):
        o = objects[best[cell]]
        out[cell] = (idx["colour"][o.colour], idx["shape"][o.shape], idx["size"][o.size])
    return torch.from_numpy(out)
