"""The base of every export spec (export/specs.py says what a spec is; the specs live
beside the builder of their network: specs.py, vq.py)."""

from __future__ import annotations

import numpy as np
import onnx


class ExportSpec:
    role: str
    names: dict[str, str]               # what the runtime binds -> tensor name ({layer} per layer)
    precisions: tuple[str, ...]         # what quantize may turn the graph into

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {}

    def profiles(self) -> dict:
        return {}

    def sample_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        return {}

    def optimize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return model

    def add_to(self, writer, model: onnx.ModelProto):
        return writer.add_graph(self.role, model, self)
