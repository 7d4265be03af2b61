"""Export to ONNX and TensorRT, and parity checks."""
