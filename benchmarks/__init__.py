"""Side-by-side benchmarks against PyTorch, onnxruntime-genai and the Emu2 reference loop."""
