"""Conversions between our weight dicts and Flower records, shared by ClientApp and ServerApp.

On the wire a model travels packed (`to_wire_record`): one flat array and its layout. Flower 1.42
sends every Array of a record as objects of their own, one HTTP request each (over TLS), so the
networks' 100-150 arrays cost seconds per message; packed, a message is a handful of objects.
The strategy aggregates the per-name records of `to_array_record`, so Flower's strategies and their
state (FedAdam's moments) see every array by name.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord

# How a site's update travels: float16 halves the upload; bench/wire_bytes.py measured no change in
# the loss. The server widens it back to float32 before validating and aggregating.
WIRE_DTYPES = ("float32", "float16")
PACKED, LAYOUT = "packed", "layout"


def _cast(value: np.ndarray, wire_dtype: str) -> np.ndarray:
    if wire_dtype == "float16" and value.dtype == np.float32:
        return value.astype(np.float16)
    return value


def to_array_record(weights: dict[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """One Array per weight, by name: what Flower's strategies aggregate."""
    return ArrayRecord(
        {name: Array.from_numpy_ndarray(_cast(v, wire_dtype)) for name, v in weights.items()}
    )


def to_wire_record(weights: dict[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """The weights as one flat array and its layout (names and shapes, as JSON bytes): what a
    message carries between server and site. Every array shares the flat one's dtype."""
    values = [np.asarray(_cast(v, wire_dtype)) for v in weights.values()]
    dtypes = {v.dtype.str for v in values}
    if len(dtypes) > 1:
        raise ValueError(f"weights of mixed dtypes {sorted(dtypes)} cannot travel packed")
    flat = np.concatenate([v.ravel() for v in values]) if values else np.zeros(0, np.float32)
    layout = [[name, list(v.shape)] for name, v in zip(weights, values, strict=True)]
    text = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord(
        {PACKED: Array.from_numpy_ndarray(flat), LAYOUT: Array.from_numpy_ndarray(text)}
    )


def _unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The weights of a `to_wire_record` record; ValueError if its layout does not fit its data."""
    if set(record) != {PACKED, LAYOUT}:
        raise ValueError(
            f"a packed model holds '{PACKED}' and '{LAYOUT}' only, not {sorted(record)}"
        )
    flat = record[PACKED].numpy()
    try:
        layout = json.loads(record[LAYOUT].numpy().astype(np.uint8).tobytes())
        names = [str(name) for name, _ in layout]
        shapes = [tuple(int(n) for n in shape) for _, shape in layout]
    except (ValueError, TypeError) as err:
        raise ValueError(f"the packed model's layout is unreadable: {err}") from None
    sizes = [int(np.prod(shape)) for shape in shapes]
    negative = any(n < 0 for shape in shapes for n in shape)
    if negative or flat.ndim != 1 or sum(sizes) != flat.size or len(set(names)) != len(names):
        raise ValueError(
            f"the packed model's layout ({len(names)} arrays, {sum(sizes)} values) does not fit "
            f"its data ({flat.size} values)"
        )
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return {
        name: piece.reshape(shape) for name, piece, shape in zip(names, pieces, shapes, strict=True)
    }


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The weights of a per-name or packed record. Arrays come back as float32 where they
    travelled as float16; any other dtype is left as it came, so update validation still catches
    a site that sends the wrong one."""
    if LAYOUT in record:
        arrays = _unpack(record)
    else:
        arrays = {name: array.numpy() for name, array in record.items()}
    return {
        name: value.astype(np.float32) if value.dtype == np.float16 else value
        for name, value in arrays.items()
    }
