"""Inference runtimes (PyTorch, ONNX Runtime, TensorRT) behind one interface; see base.py.

This package never imports the training core, so a Jetson needs only it, `export` and their libraries.
"""

from .base import InputSpec, Runtime, RuntimeInputError, detect_backend, open_runtime, register_backend

__all__ = ["InputSpec", "Runtime", "RuntimeInputError", "detect_backend", "open_runtime", "register_backend"]
