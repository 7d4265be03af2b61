"""Embedding comparison and top-1 task metrics, in numpy only (a Jetson can run them): parity uses them,
and so does evaluation (agreement with a teacher, zero-shot class embeddings).

- ``compare``: max/mean absolute error and min/mean row cosine between two embedding matrices.
- ``retrieval_top1``: image->text top-1 over paired rows (caption i belongs to image i).
- ``zero_shot_top1``: class prediction from averaged, normalised class-prompt embeddings.
- ``agreement``: how often two top-1 predictions are the same; ``disagreement_margin``: whether the
  disagreements are near-ties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows, [N]."""
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


@dataclass
class Diff:
    max_abs: float
    mean_abs: float
    min_cosine: float
    mean_cosine: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def compare(a: np.ndarray, b: np.ndarray) -> Diff:
    """How far embeddings `a` are from the reference `b` (same shape)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    err = np.abs(a - b)
    cos = row_cosine(a, b)
    return Diff(float(err.max()), float(err.mean()), float(cos.min()), float(cos.mean()))


def retrieval_predictions(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """For each image, the index of its most similar caption."""
    return np.argmax(l2_normalize(image_emb) @ l2_normalize(text_emb).T, axis=1)


def disagreement_margin(image_emb: np.ndarray, text_emb: np.ndarray, predictions: np.ndarray) -> float:
    """Median, over queries where `predictions` differ from this model's own top-1, of how much lower this
    model scores the predicted caption than its own top-1 (0 when they never differ)."""
    sim = l2_normalize(image_emb) @ l2_normalize(text_emb).T
    own = sim.argmax(axis=1)
    rows = np.nonzero(own != predictions)[0]
    if not len(rows):
        return 0.0
    return float(np.median(sim[rows, own[rows]] - sim[rows, predictions[rows]]))


def retrieval_top1(predictions: np.ndarray) -> float:
    """Image->text R@1 when caption i is the ground truth of image i."""
    return float(np.mean(predictions == np.arange(len(predictions))))


def class_embeddings(prompt_emb: np.ndarray, n_classes: int) -> np.ndarray:
    """Average the normalised embeddings of each class's prompts (rows grouped class by class)."""
    per_class = l2_normalize(prompt_emb).reshape(n_classes, -1, prompt_emb.shape[-1]).mean(axis=1)
    return l2_normalize(per_class)


def zero_shot_predictions(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    return np.argmax(l2_normalize(image_emb) @ class_emb.T, axis=1)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else float("nan")


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of queries where two models make the same top-1 prediction."""
    return float(np.mean(np.asarray(a) == np.asarray(b))) if len(a) else float("nan")
