"""Decode rate of a site folder, cold (fresh state dir: every DICOM decoded) vs warm (cache hit).

Target: the warm load is at least 5x faster than the cold one, so every round after the first
spends its time training, not decoding.

    python -m bench.data_loading [--studies 160] [--unlabeled 40] [--size 256] [--resolution 64]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from bench.common import machine, print_table, time_calls, verdict, write_phantoms
from emixer_model.config import ModelConfig
from emixer_model.data.site import load_site

TARGET_SPEEDUP = 5.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_loading", description=__doc__)
    parser.add_argument("--studies", type=int, default=160, help="labeled studies in the site")
    parser.add_argument("--unlabeled", type=int, default=40, help="unlabeled scans in the site")
    parser.add_argument("--size", type=int, default=256, help="phantom DICOM side in pixels")
    parser.add_argument("--resolution", type=int, default=64, help="model resolution")
    parser.add_argument("--repeats", type=int, default=3, help="measured loads per mode")
    args = parser.parse_args(argv)

    model_cfg = ModelConfig(resolution=args.resolution)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = Path(tmp)
        (site,) = write_phantoms(
            root / "sites", sites=1, per_site=args.studies, unlabeled=args.unlabeled, size=args.size
        )
        fresh = (root / f"state-{i}" for i in itertools.count())
        data = load_site(site, next(fresh), model_cfg)
        files = len(data.images) + len(data.unlabeled) + len(data.skipped)

        cold = time_calls(lambda: load_site(site, next(fresh), model_cfg), args.repeats, warmup=0)
        warm_dir = next(fresh)
        warm = time_calls(lambda: load_site(site, warm_dir, model_cfg), args.repeats, warmup=1)

    speedup = cold.median / warm.median
    print_table(
        f"data_loading: {files} DICOM files ({args.size}px -> {args.resolution}px)",
        ["load", "median s", "min s", "files/s", "vs cold"],
        [
            ["cold (fresh state dir)", cold.median, cold.low, files / cold.median, "1.00x"],
            ["warm (cache hit)", warm.median, warm.low, files / warm.median, f"{speedup:.2f}x"],
        ],
        [
            f"target warm >= {TARGET_SPEEDUP:.0f}x faster than cold: "
            f"{verdict(speedup, TARGET_SPEEDUP, higher_is_better=True)}",
            f"{len(data.images)} labeled, {len(data.unlabeled)} unlabeled, "
            f"{len(data.skipped)} skipped; median of {args.repeats}; {machine()}",
        ],
    )


if __name__ == "__main__":
    main()
