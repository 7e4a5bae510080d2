"""The lean runtime: numpy + onnxruntime (+ TensorRT when asked), never torch."""
