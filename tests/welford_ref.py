"""Single-process, one-value-at-a-time float64 Welford: the reference the invariants compare against."""
import math


def welford_pass(values, buckets, K):
    n, mean, m2, nonfinite = [0] * K, [0.0] * K, [0.0] * K, [0] * K
    for x, b in zip(values, buckets):
        b = min(b, K - 1)
        if not math.isfinite(x):
            nonfinite[b] += 1
            continue
        n[b] += 1
        d = x - mean[b]
        mean[b] += d / n[b]
        m2[b] += d * (x - mean[b])
    return n, mean, m2, nonfinite


def assert_matches(state, values, buckets, K, rel=1e-9):
    n, mean, m2, nonfinite = welford_pass(values, buckets, K)
    for b in range(K):
        assert state[b, 0].item() == n[b], (b, state[b, 0].item(), n[b])
        assert state[b, 3].item() == nonfinite[b]
        if n[b]:
            assert abs(state[b, 1].item() - mean[b]) <= rel * max(abs(mean[b]), 1e-12), b
            assert abs(state[b, 2].item() - m2[b]) <= rel * max(abs(m2[b]), 1e-12), b


def weighted_pass(values, buckets, weights, K):
    """One value at a time, weights c (West's weighted Welford): n, W, weighted mean, M2 = sum c (x - mean)^2."""
    n, wsum, mean, m2 = [0] * K, [0.0] * K, [0.0] * K, [0.0] * K
    for x, b, c in zip(values, buckets, weights):
        b = min(b, K - 1)
        if not math.isfinite(x):
            continue
        n[b] += 1
        wsum[b] += c
        d = x - mean[b]
        mean[b] += d * c / wsum[b]
        m2[b] += c * d * (x - mean[b])
    return n, wsum, mean, m2


def assert_matches_weighted(state, values, buckets, weights, K, rel=1e-9):
    n, wsum, mean, m2 = weighted_pass(values, buckets, weights, K)
    for b in range(K):
        assert state[b, 0].item() == n[b] and abs(state[b, 4].item() - wsum[b]) <= rel * max(wsum[b], 1), b
        if n[b]:
            assert abs(state[b, 1].item() - mean[b]) <= rel * max(abs(mean[b]), 1e-12), b
            assert abs(state[b, 2].item() - m2[b]) <= rel * max(abs(m2[b]), 1e-12), b
