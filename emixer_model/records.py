"""Conversions between our weight dicts and Flower records, shared by ClientApp and ServerApp."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

# How a site's update travels: float16 halves the upload; bench/wire_bytes.py measured no change in
# the loss. The server widens it back to float32 before validating and aggregating.
WIRE_DTYPES = ("float32", "float16")


def to_array_record(weights: dict[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    def cast(value: np.ndarray) -> np.ndarray:
        if wire_dtype == "float16" and value.dtype == np.float32:
            return value.astype(np.float16)
        return value

    return ArrayRecord({name: Array.from_numpy_ndarray(cast(v)) for name, v in weights.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Arrays as float32 where they travelled as float16; any other dtype is left as it came, so
    update validation still catches a site that sends the wrong one."""
    arrays = {name: array.numpy() for name, array in record.items()}
    return {
        name: value.astype(np.float32) if value.dtype == np.float16 else value
        for name, value in arrays.items()
    }
