"""Embedding comparison and top-1 task metrics, in numpy only (a Jetson can run them): parity uses them,
and so does evaluation (agreement with a teacher, zero-shot class embeddings).

- ``compare``: max/mean absolute error and min/mean row cosine between two embedding matrices.
- ``retrieval_top1``: image->text top-1 over paired rows (caption i belongs to image i).
- ``zero_shot_top1``: class prediction from averaged, normalised class-prompt embeddings.
- ``agreement``: how often two top-1 predictions are the same; ``disagreement_margin``: whether the
  disagreements are near-ties; ``top1_margins``: how far each query's best score is above its runner-up.
- ``paired_delta``: the change of a top-1 accuracy between two models on the same queries, with a Wilson
  interval over the queries where they differ.
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


def top1_margins(scores: np.ndarray) -> np.ndarray:
    """Per query (row), how far the best score is above the runner-up: ``s[top1] - s[top2]`` (inf with one column).

    A small margin means the query is a near-tie that any small numeric error can flip."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[1] < 2:
        return np.full(len(s), np.inf)
    top2 = np.partition(s, s.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def retrieval_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of every image (row) with every caption (column)."""
    return l2_normalize(image_emb) @ l2_normalize(text_emb).T


@dataclass
class PairedDelta:
    """Change of a top-1 accuracy between two models scored on the same queries (``other - reference``).

    ``delta`` = (gains - losses) / n, where a gain is a query only `other` gets right and a loss one only the
    reference gets right. The interval conditions on the m = gains + losses discordant queries: a Wilson score
    interval [pl, pu] for the loss fraction p = losses / m, at normal quantile z, gives
    ``delta in [m/n * (1 - 2 pu), m/n * (1 - 2 pl)]`` (McNemar's view of paired proportions). With no discordant
    query the interval is [0, 0]: the two models made exactly the same decisions."""

    delta: float
    low: float
    high: float
    gains: int
    losses: int
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def wilson_interval(k: int, m: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/m:
    ``(p + z²/2m ± z·sqrt(p(1-p)/m + z²/4m²)) / (1 + z²/m)``; (0, 1) when m == 0."""
    if m == 0:
        return 0.0, 1.0
    p = k / m
    denom = 1 + z * z / m
    centre = (p + z * z / (2 * m)) / denom
    half = z * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def paired_delta(reference_correct: np.ndarray, other_correct: np.ndarray, z: float = 1.96) -> PairedDelta:
    """``other``'s accuracy minus the reference's on the same queries, with a paired interval (see PairedDelta)."""
    ref, oth = np.asarray(reference_correct, bool), np.asarray(other_correct, bool)
    if ref.shape != oth.shape:
        raise ValueError(f"paired results of different lengths: {ref.shape} vs {oth.shape}")
    n = int(ref.size)
    gains, losses = int(np.sum(oth & ~ref)), int(np.sum(ref & ~oth))
    m = gains + losses
    if n == 0:
        return PairedDelta(float("nan"), float("nan"), float("nan"), 0, 0, 0)
    if m == 0:
        return PairedDelta(0.0, 0.0, 0.0, 0, 0, n)
    pl, pu = wilson_interval(losses, m, z)
    return PairedDelta((gains - losses) / n, m / n * (1 - 2 * pu), m / n * (1 - 2 * pl), gains, losses, n)
