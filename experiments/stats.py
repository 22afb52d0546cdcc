"""
experiments/stats.py -- the few statistics the A/B grids need: a mean with its standard error,
Student's t quantiles, a pooled standard deviation, and a paired difference with its 95% interval
and the smallest difference it can detect (SOURCES.md §9.42). Pure functions of lists of numbers.

    d, half = difference([a_s - b_s for each seed s])   # mean and half-width of the 95% interval
    paired_detectable(ds)                                # two-sided 5%, power 80%
    crossed_bootstrap(d)       # d: (S, I) per seed and item: seeds and items both resampled

Shapes: S seeds (one number per seed in every list), I evaluation items.
Test: .venv/bin/python -m pytest -q tests/test_ab.py
"""

import math
import random

def mean_se(xs: list) -> tuple:
    """(mean, standard error of the mean); se is nan for a single value."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)  # Bessel-corrected
    return m, math.sqrt(var / n)


# Student's t quantiles by degrees of freedom (two-sided 95% = 0.975, power 80% = 0.80), from any
# statistics table; a df between entries takes the next smaller df (the wider interval).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}
T_80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889,
        9: 0.883, 10: 0.879, 12: 0.873, 15: 0.866, 20: 0.860, 30: 0.854, 60: 0.848}


def t_quantile(table: dict, dof: int) -> float:
    if dof < 1:
        return float("nan")
    return table[max(k for k in table if k <= dof)]


def pooled_sd(groups: list) -> float:
    """Pooled within-arm standard deviation over arms with >= 2 seeds."""
    num = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(num / dof) if dof else float("nan")


def difference(ds: list) -> tuple:
    """Mean of per-seed differences and the half-width of its paired 95% t interval."""
    d, se = mean_se(ds)
    return d, t_quantile(T_975, len(ds) - 1) * se


def paired_detectable(ds: list) -> float:
    """Smallest difference a paired comparison of these per-seed differences detects (two-sided
    5%, power 80%): (t_0.975 + t_0.80) x their sd / sqrt(seeds), at seeds - 1 dof."""
    _, se = mean_se(ds)
    dof = len(ds) - 1
    return (t_quantile(T_975, dof) + t_quantile(T_80, dof)) * se


def crossed_bootstrap(d: list, reps: int = 2000, seed: int = 0) -> tuple:
    """(mean, low, high): the mean of d, (S, I) differences of two arms per seed and item, and
    the 95% percentile interval of a two-way ("pigeonhole") bootstrap that redraws the seeds and
    the items independently, with replacement (SOURCES.md §9.45). Both are random factors here:
    another seed retrains, another item re-asks, and each item is asked in every seed, so an
    interval over seeds alone ignores the items and one over items alone ignores the training
    noise. With 3 seeds the seed draw has only 10 distinct outcomes: read it beside the t
    interval, never alone."""
    S, I = len(d), len(d[0])  # (S, I)
    rng = random.Random(seed)
    means = []
    for _ in range(reps):
        weight = [0] * I  # how often each item is drawn: (I,)
        for _ in range(I):
            weight[rng.randrange(I)] += 1
        per_seed = [sum(w * x for w, x in zip(weight, row)) / I for row in d]  # (S,)
        means.append(sum(per_seed[rng.randrange(S)] for _ in range(S)) / S)
    means.sort()
    mean = sum(sum(row) for row in d) / (S * I)
    return mean, means[int(0.025 * reps)], means[int(0.975 * reps) - 1]

