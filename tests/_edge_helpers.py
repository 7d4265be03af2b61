"""Helpers for the TensorRT / bench tests: tiny ONNX graphs that TensorRT's parser genuinely rejects."""

from __future__ import annotations

from pathlib import Path


def unsupported_onnx(path: Path) -> Path:
    """A valid ONNX model whose only node is an operator no TensorRT parser knows (custom domain, no plugin)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3, 32, 32])
    node = helper.make_node("FancyPool", ["images"], ["embeddings"], domain="com.example")
    graph = helper.make_graph([node], "unsupported", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(path))
    return path
