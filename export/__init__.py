"""Export: checkpoints and Hugging Face folders to ONNX bundles; TensorRT engines."""
