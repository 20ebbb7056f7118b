"""What federation costs on top of local training: a simulated round's wall time vs its sites' work.

Runs server.tools.simulation.simulate (Flower + Ray) on small phantom sites. Each site's
train_site_round is timed inside the Ray worker (the ClientApp is wrapped, the code it runs is the
real one); the round is timed at the server from configure_train to the end of aggregate_train
(which includes the checkpoint).

    python -m bench.round_overhead [--sites 3] [--rounds 2] [--studies 48]
Target: round wall time <= 1.10x the slowest site's local compute. With more sites than cores the
sites queue, so the table also gives wall / busy time (time during which any site computed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import (
    busy_span,
    machine,
    print_table,
    run_timed_simulation,
    verdict,
    write_phantoms,
)
from emixer_model.config import EmixerConfig

TARGET_RATIO = 1.10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.round_overhead", description=__doc__)
    parser.add_argument("--sites", type=int, default=3, help="simulated sites")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds")
    parser.add_argument("--studies", type=int, default=48, help="labeled studies per site")
    parser.add_argument("--size", type=int, default=128, help="phantom DICOM side in pixels")
    args = parser.parse_args(argv)

    cfg = EmixerConfig()
    cfg = replace(
        cfg,
        privacy=replace(cfg.privacy, noise_multiplier=1.0, epsilon_budget=1e6),
        train=replace(cfg.train, device="cpu"),
        federation=replace(cfg.federation, rounds=args.rounds, min_sites=args.sites),
    )
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        root = Path(tmp)
        sites = write_phantoms(
            root / "sites", args.sites, args.studies, args.studies // 4, size=args.size
        )
        times = run_timed_simulation(cfg, sites, root)

    rows, ratios = [], []
    for rnd in sorted(times.rounds):
        lo, hi = times.rounds[rnd]
        work = times.sites.get(rnd, [])
        if not work:
            rows.append([f"round {rnd}", hi - lo, "-", "-", "-", "-", "-", "no site timings"])
            continue
        slowest = max(end - start for _, start, end in work)
        busy = busy_span([(start, end) for _, start, end in work])
        wall = hi - lo
        ratios.append(wall / slowest)
        before = min(start for _, start, _ in work) - lo
        after = hi - max(end for _, _, end in work)
        rows.append(
            [f"round {rnd}", wall, slowest, busy, before, after]
            + [f"{wall / slowest:.2f}x", f"{wall / busy:.2f}x"]
        )
    first = min(times.rounds.values())[0] if times.rounds else times.end
    last = max(v[1] for v in times.rounds.values()) if times.rounds else times.end
    blank = [""] * 6
    rows.append(["start-up (Ray, server init)", first - times.start, *blank])
    rows.append(["shut-down", times.end - last, *blank])
    rows.append(["whole simulate()", times.end - times.start, *blank])
    notes = [
        f"{args.sites} phantom sites ({args.studies} studies + {args.studies // 4} unlabeled each, "
        f"{args.size}px DICOM), default ModelConfig, {os.cpu_count()} cores: Ray runs at most "
        f"{min(args.sites, os.cpu_count() or 1)} sites at once",
        "to 1st site = dispatch (round 1: Ray actors start and import torch); after last = "
        "reply transfer, update validation, aggregation, checkpoint",
        "site compute = train_site_round (data load incl. decoding in round 1, training, "
        "accountant and ledger writes)",
    ]
    if ratios:
        worst = max(ratios)
        notes.insert(
            0,
            f"worst round wall / slowest site: {worst:.2f}x; target <= {TARGET_RATIO}x: "
            f"{verdict(worst, TARGET_RATIO, higher_is_better=False)}",
        )
    notes.append(machine())
    print_table(
        "round_overhead: federated round vs local compute (seconds)",
        ["phase", "wall s", "slowest site s", "busy s", "to 1st site s", "after last s"]
        + ["wall / slowest", "wall / busy"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
