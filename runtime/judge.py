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
