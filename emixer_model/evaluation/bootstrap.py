"""The one bootstrap: resample whole privacy units, recompute a statistic, read percentiles.

`emixer evaluate`, bench/utility.py and `emixer audit` all draw their intervals here, so a figure
means the same thing wherever it is printed. Resampling patients rather than images keeps one
patient's correlated studies together; rows with a unit of their own are resampled one by one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 300
MIN_DEFINED_DRAWS = 0.5  # below this share of resamples with a defined value, no interval


class Resampler:
    """Bootstrap draws of row indices: whole units with replacement, every row of a drawn unit.

    Each stream ("pairs", "heldout", ...) has its own random numbers, so two samples of equal
    size are not drawn in lockstep, while every figure resampling the same stream with the same
    seed sees the same draws (which is what makes two figures' difference paired).
    """

    def __init__(self, units: np.ndarray, stream: str) -> None:
        self.stream = zlib.crc32(stream.encode())
        _, inverse = np.unique(np.asarray(units), return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0, True])
        self.groups = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.rows = len(inverse)

    @property
    def units(self) -> int:
        return len(self.groups)

    def everything(self) -> np.ndarray:
        return np.arange(self.rows)

    def generator(self, seed: int) -> np.random.Generator:
        return np.random.default_rng([seed, self.stream])

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        picked = rng.integers(0, len(self.groups), len(self.groups))
        return np.concatenate([self.groups[i] for i in picked])


def bootstrap(
    statistic: Callable[..., np.ndarray],
    resamplers: Sequence[Resampler],
    resamples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """statistic(*index_arrays) -> [K] (nan where undefined) on all rows and on each resample.

    Several resamplers are drawn independently per resample (e.g. synthetic pairs and held-out
    patients); a paired comparison passes one resampler and computes both sides from its draw.
    Returns the point values [K] and the draws [resamples, K].
    """
    rngs = [r.generator(seed) for r in resamplers]
    point = np.atleast_1d(np.asarray(statistic(*(r.everything() for r in resamplers)), float))
    draws = np.empty((resamples, len(point)))
    for b in range(resamples):
        draws[b] = statistic(*(r.draw(rng) for r, rng in zip(resamplers, rngs, strict=True)))
    return point, draws


def percentile_interval(draws: np.ndarray) -> tuple[float, float] | None:
    """The central CONFIDENCE interval of the defined draws; None when too few are defined."""
    draws = np.asarray(draws, float)
    defined = draws[~np.isnan(draws)]
    if len(defined) == 0 or len(defined) < MIN_DEFINED_DRAWS * len(draws):
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)
