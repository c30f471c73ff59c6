"""Study metrics: AUROC (Mann-Whitney, ties averaged), precision/recall, Spearman. numpy only."""
from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average ranks over ties
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def auroc(score, label) -> float | None:
    """P(score of a positive > score of a negative); None without both classes."""
    s, y = np.asarray(score, dtype=float), np.asarray(label, dtype=bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return None
    r = _ranks(s)
    return float((r[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def precision_recall(flag, label) -> tuple[float | None, float | None]:
    f, y = np.asarray(flag, dtype=bool), np.asarray(label, dtype=bool)
    p = float((f & y).sum() / f.sum()) if f.sum() else None
    r = float((f & y).sum() / y.sum()) if y.sum() else None
    return p, r


def spearman(x, y) -> float | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])
