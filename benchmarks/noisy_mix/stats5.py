"""Round 5's statistics, numpy-free and scipy-free: paired 95% t-intervals with two-sided p-values,
Holm's step-down adjustment, and Fieller's interval for a ratio of paired means."""
from __future__ import annotations

import math


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _ibeta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided p-value of a t statistic with df degrees of freedom."""
    return _ibeta(df / 2, 0.5, df / (df + t * t))


def t_quantile(df: int, q: float = 0.975) -> float:
    """The q-quantile of Student's t (bisection on the CDF)."""
    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1 - t_sf2(mid, df) / 2 < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences, its 95% t-interval and two-sided p (n - 1 degrees of freedom)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "p": None}
    mean = sum(diffs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "lo": None, "hi": None, "p": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t = t_quantile(n - 1)
    p = 1.0 if se == 0 and mean == 0 else 0.0 if se == 0 else t_sf2(abs(mean) / se, n - 1)
    return {"n": n, "mean": mean, "lo": mean - t * se, "hi": mean + t * se, "p": p, "sd": sd}


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None and is not counted)."""
    idx = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m, out, running = len(idx), [None] * len(ps), 0.0
    for k, (p, i) in enumerate(idx):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def fieller(a: list[float], b: list[float]) -> dict:
    """95% Fieller interval for mean(a) / mean(b), a and b paired (same seeds). Unbounded (None ends,
    "unbounded": True) where mean(b) is not resolved from zero."""
    n = len(a)
    if n < 2 or n != len(b):
        return {"share": None, "lo": None, "hi": None}
    ma, mb = sum(a) / n, sum(b) / n
    saa = sum((x - ma) ** 2 for x in a) / (n - 1) / n
    sbb = sum((y - mb) ** 2 for y in b) / (n - 1) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1) / n
    t2 = t_quantile(n - 1) ** 2
    qa, qb, qc = mb * mb - t2 * sbb, -2 * (ma * mb - t2 * sab), ma * ma - t2 * saa
    share = ma / mb if mb else None
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return {"share": share, "lo": None, "hi": None, "unbounded": True}
    r = math.sqrt(disc)
    return {"share": share, "lo": (-qb - r) / (2 * qa), "hi": (-qb + r) / (2 * qa)}
