"""Checks a site's update must pass before it is aggregated (a malformed or hostile update is
dropped with a logged reason, never averaged into the global model)."""

from __future__ import annotations

import numpy as np


def update_problem(
    global_arrays: dict[str, np.ndarray], site_arrays: dict[str, np.ndarray], max_norm: float
) -> str | None:
    """The reason to reject `site_arrays`, or None when it may be aggregated."""
    missing = sorted(set(global_arrays) - set(site_arrays))
    extra = sorted(set(site_arrays) - set(global_arrays))
    if missing or extra:
        return (
            f"array names differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
        )
    squared = 0.0
    for name, reference in global_arrays.items():
        value = site_arrays[name]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            return (
                f"array {name!r} is {value.dtype}{list(value.shape)}, "
                f"expected {reference.dtype}{list(reference.shape)}"
            )
        if not np.all(np.isfinite(value)):
            return f"array {name!r} holds NaN or infinite values"
        squared += float(np.sum((value.astype(np.float64) - reference) ** 2))
    norm = squared**0.5
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None
