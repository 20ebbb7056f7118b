"""How a simulated federation grows with the number of sites: time and memory of one round.

For each site count, server.tools.simulation.simulate runs ONE round on tiny phantom sites. Peak
memory is the largest sum of RSS over this process and all its descendants (Ray's GCS, raylet and
the ClientApp actors), sampled every 0.2 s. Growth is linear when time/site and MB/site stay flat.

    python -m bench.site_scale [--counts 2,5,10] [--studies 24] [--resolution 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import machine, print_table, run_timed_simulation, tree_rss_mb, write_phantoms
from emixer_model.config import EmixerConfig, ModelConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.site_scale", description=__doc__)
    parser.add_argument("--counts", default="2,5,10", help="comma-separated site counts")
    parser.add_argument("--studies", type=int, default=24, help="labeled studies per site")
    parser.add_argument("--size", type=int, default=64, help="phantom DICOM side in pixels")
    parser.add_argument("--resolution", type=int, default=32, help="model resolution (tiny)")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        parser.error(f"--counts must be integers separated by commas, not {args.counts!r}")
    if any(c < 1 for c in counts):
        parser.error("every site count must be at least 1")

    cfg = EmixerConfig(model=ModelConfig(resolution=args.resolution, width=16, embed_dim=64))
    cfg = replace(
        cfg,
        privacy=replace(cfg.privacy, noise_multiplier=1.0, epsilon_budget=1e6),
        train=replace(cfg.train, device="cpu"),
    )
    baseline = tree_rss_mb()
    rows: list[list[object]] = []
    previous: tuple[int, float, float] | None = None  # (sites, round s, peak MB)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        all_sites = write_phantoms(
            root / "sites", max(counts), args.studies, args.studies // 4, size=args.size
        )
        for n in counts:
            run_cfg = replace(cfg, federation=replace(cfg.federation, rounds=1, min_sites=n))
            times = run_timed_simulation(run_cfg, all_sites[:n], root / f"run-{n}")
            lo, hi = times.rounds.get(1, (times.start, times.end))
            work = times.sites.get(1, [])
            mean_site = sum(e - s for _, s, e in work) / len(work) if work else float("nan")
            dispatch = min(s for _, s, _ in work) - lo if work else float("nan")
            wall, peak = hi - lo, times.peak_tree_mb
            marginal: list[object] = ["-", "-"]
            if previous is not None and n > previous[0]:
                added = n - previous[0]
                marginal = [(wall - previous[1]) / added, (peak - previous[2]) / added]
            rows.append([n, wall, dispatch, mean_site, times.end - times.start, peak, *marginal])
            previous = (n, wall, peak)
    notes = [
        "linear growth: the per-added-site columns stay roughly constant from row to row",
        "to 1st site = configure_train until the first site starts: each count starts a fresh "
        "Ray, so this is actor start-up (imports of torch, opacus, flwr) in every row",
        f"Ray runs {os.cpu_count()} ClientApp actors (one per core) whatever the site count, so "
        "actor memory does not grow with sites; the server holds one update per site",
        f"tiny sites: {args.studies} studies + {args.studies // 4} unlabeled, {args.size}px DICOM; "
        f"ModelConfig(resolution={args.resolution}, width=16, embed_dim=64); baseline RSS of "
        f"this process {baseline:.0f} MB; {machine()}",
    ]
    print_table(
        "site_scale: one federated round per site count",
        ["sites", "round s", "to 1st site s", "mean site s", "simulate() s"]
        + ["peak tree RSS MB", "s per added site", "MB per added site"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
