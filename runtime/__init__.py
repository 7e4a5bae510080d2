"""The lean runtime: numpy + onnxruntime (+ TensorRT when asked), never torch.

    from emu_edge.runtime import Pipeline
    pipe = Pipeline.load("bundle/")
"""

from __future__ import annotations

# Public names -> the module that defines them, imported on first use: `import
# emu_edge.runtime.prompt` (training does) must not load the whole runtime.
_EXPORTS = {
    "Pipeline": "emu_edge.runtime.pipeline",
    "Conversation": "emu_edge.runtime.pipeline",
    "ConversationBusyError": "emu_edge.runtime.pipeline",
    "Bundle": "emu_edge.runtime.bundle",
    "BundleError": "emu_edge.runtime.bundle",
    "Manifest": "emu_edge.runtime.manifest",
    "ManifestError": "emu_edge.runtime.manifest",
    "SamplingConfig": "emu_edge.runtime.sampling",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'emu_edge.runtime' has no attribute {name!r}")
