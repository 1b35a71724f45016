"""The 95% bootstrap interval of `lococo eval` against one known exactly: the 2.5th and 97.5th percentiles.

Sixteen documents of one token each, eight with loss 1 and eight with loss 0: a resample of sixteen
documents pools K ones, K ~ Binomial(16, 1/2), and its perplexity is exp(K / 16). The exact quantiles of
K are 4 at 2.5% and 12 at 97.5% (11 at 95%), each more than 0.011 of probability away from the next
value, about 7 standard errors of the empirical quantile over 10,000 resamples: any seed gives them.
"""

from __future__ import annotations

import math

import pytest

from lococo.recipes.evaluate import bootstrap_intervals

N, ONES, RESAMPLES = 16, 8, 10_000


def binomial_quantile(n: int, p: float, level: float) -> int:
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= level:
            return k
    return n


def test_the_exact_quantiles_of_the_case():
    assert [binomial_quantile(N, ONES / N, level) for level in (0.025, 0.95, 0.975)] == [4, 11, 12]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_interval_is_the_2_5th_to_97_5th_percentile_of_a_known_distribution(seed):
    # bucket 0: the document's loss, one token; bucket 1: two tokens of loss 1 - x each; "all": both
    per_document = [([float(x), 2.0 * (1 - x)], [1, 2]) for x in [1] * ONES + [0] * (N - ONES)]
    intervals = bootstrap_intervals(per_document, RESAMPLES, seed=seed)
    low, high = binomial_quantile(N, 0.5, 0.025), binomial_quantile(N, 0.5, 0.975)
    assert intervals[0] == (round(math.exp(low / N), 4), round(math.exp(high / N), 4))
    # bucket 1 has N - K ones of N, which is distributed as K (p = 1/2)
    assert intervals[1] == (round(math.exp(low / N), 4), round(math.exp(high / N), 4))
    # all tokens: (K + 2 (N - K)) / 3N = (2N - K) / 3N, decreasing in K
    assert intervals[2] == (round(math.exp((2 * N - high) / (3 * N)), 4), round(math.exp((2 * N - low) / (3 * N)), 4))


def test_no_interval_without_resamples_or_with_one_document():
    per_document = [([1.0], [1]), ([0.0], [1])]
    assert bootstrap_intervals(per_document, 0, seed=0) == [(None, None)] * 2
    assert bootstrap_intervals(per_document[:1], 100, seed=0) == [(None, None)] * 2
    # a bucket that no document reaches has no interval; the others do
    assert bootstrap_intervals([([1.0, 0.0], [1, 0]), ([0.0, 0.0], [1, 0])], 50, seed=0)[1] == (None, None)
