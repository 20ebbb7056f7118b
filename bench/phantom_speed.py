"""Phantom hospital write rate: 500 DICOMs at 256x256 (2 sites x 230 studies + 2 x 20 unlabeled).

Target: under 60 s in total, so `emixer demo` and the benchmarks spend their time on training,
not on making data. The render-only row separates drawing from report writing and DICOM I/O.

    python -m bench.phantom_speed [--sites 2] [--per-site 230] [--unlabeled 20] [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, print_table, time_calls, verdict
from emixer_model.data.phantoms import render_phantom, write_phantom_sites

TARGET_SECONDS = 60.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.phantom_speed", description=__doc__)
    parser.add_argument("--sites", type=int, default=2, help="phantom sites")
    parser.add_argument("--per-site", type=int, default=230, help="labeled studies per site")
    parser.add_argument("--unlabeled", type=int, default=20, help="unlabeled scans per site")
    parser.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    args = parser.parse_args(argv)
    images = args.sites * (args.per_site + args.unlabeled)

    labels = {"Cardiomegaly": 1, "Pleural Effusion": 1, "Support Devices": 1}
    rng = np.random.default_rng(0)
    render = time_calls(lambda: render_phantom(labels, rng, args.size), repeats=20)

    with tempfile.TemporaryDirectory(prefix="bench-phantoms-") as tmp:
        start = time.perf_counter()
        write_phantom_sites(
            Path(tmp), args.sites, args.per_site, args.unlabeled, seed=0, size=args.size
        )
        total = time.perf_counter() - start

    print_table(
        f"phantom_speed: {images} DICOMs at about {args.size}x{args.size}",
        ["phase", "seconds", "images/s"],
        [
            ["render only (median per image)", render.median, 1 / render.median],
            ["write_phantom_sites (render + report + DICOM)", total, images / total],
        ],
        notes=[
            f"target: whole write under {TARGET_SECONDS:.0f} s -> "
            + verdict(total, TARGET_SECONDS, higher_is_better=False),
            machine(),
        ],
    )


if __name__ == "__main__":
    main()
