"""emu-edge: Emu-style generative multimodal models at the edge."""

__version__ = "0.1.0"
