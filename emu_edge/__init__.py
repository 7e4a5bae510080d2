"""emu-edge: Emu-style generative multimodal models at the edge.

    from emu_edge import Pipeline        # the runtime's Pipeline, imported on first use
"""

__version__ = "0.1.0"

# `import emu_edge` needs only the base install; the runtime loads when a name is asked for.
_RUNTIME = ("Pipeline", "Conversation", "Bundle", "Manifest", "SamplingConfig")
__all__ = list(_RUNTIME)


def __getattr__(name: str):
    if name in _RUNTIME:
        from emu_edge import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'emu_edge' has no attribute {name!r}")
