"""Inference runtimes (PyTorch, ONNX Runtime, TensorRT); never imports the compression core."""
