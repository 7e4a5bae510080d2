"""Torch-free scoring with the shipped judge (judge.onnx in a checkpoint or bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Judge:
    def __init__(self, path: str | Path):
        import onnxruntime as ort

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"judge model missing: {path}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "emu_edge.judge" not in meta:
            raise ValueError(f"{path} is not an emu-edge judge (no emu_edge.judge metadata)")
        labels = json.loads(meta["emu_edge.judge"])
        self.colours, self.shapes, self.digits = labels["colours"], labels["shapes"], labels["digits"]
        self.image_size = labels["image_size"]

    def __call__(self, images: np.ndarray, batch: int = 256) -> dict:
        """images: uint8 [B, H, W, 3] at the judge's size -> names and features."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"judge expects uint8 [B, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        outs = [[], [], [], []]
        for i in range(0, len(images), batch):
            x = images[i:i + batch].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
            for acc, y in zip(outs, self.session.run(None, {"images": x})):
                acc.append(y)
        c, s, d, f = (np.concatenate(o) for o in outs)
        return {
            "colour": [self.colours[i] for i in c.argmax(1)],
            "shape": [self.shapes[i] for i in s.argmax(1)],
            "digit": [self.digits[i] for i in d.argmax(1)],
            "features": f,
        }

    @staticmethod
    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-8)
        b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-8)
        return (a * b).sum(-1)


def attribute_hits(got: list[tuple[str, str]], want: list[tuple[str, str]]) -> dict[str, float]:
    """(colour, shape) pairs as judged against the truth: each attribute alone, then both."""
    return {"colour": float(np.mean([g[0] == w[0] for g, w in zip(got, want)])),
            "shape": float(np.mean([g[1] == w[1] for g, w in zip(got, want)])),
            "both": float(np.mean([g == w for g, w in zip(got, want)]))}


def prompt_following(verdict: dict, want: list[tuple[str, str]]) -> tuple[dict[str, float], float]:
    """Judged images (the judge's output) against their prompts' (colour, shape): the
    attribute hits, and the same readings against shuffled prompts, the score of a generator
    that ignores its prompt."""
    got = list(zip(verdict["colour"], verdict["shape"]))
    perm = np.random.default_rng(0).permutation(len(want))
    return attribute_hits(got, want), float(np.mean([got[i] == want[j] for i, j in enumerate(perm)]))


def mean_by(keys: list[str], hits: list[bool]) -> dict[str, float]:
    """The hit rate per key (a question type, an object count)."""
    return {k: float(np.mean([h for kk, h in zip(keys, hits) if kk == k])) for k in sorted(set(keys))}
