"""Synthetic pairs per second of `emixer release` (server.tools.release), and where time goes.

The checkpoint is a freshly initialised default model (same shapes and cost as a trained one) with
a small but valid privacy ledger, so the release passes the privacy gate exactly as a real one.
The time inside the release is split by wrapping SecondaryCaptureWriter.write and png_bytes:
generation (G, E, R sampling and report decoding) is what remains of the per-sample loop.

    python -m bench.synthesis_rate [--pairs 2000] [--resolution 64]
Target: >= 200 pairs/s. With fewer than 10,000 pairs the 10,000-pair time is extrapolated.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import server.tools.release as release_module
from bench.common import machine, print_table, verdict
from emixer_model.config import FINDINGS, EmixerConfig, ModelConfig
from emixer_model.networks import build_networks, get_weights
from emixer_model.text.vocabulary import VOCAB_SIZE
from server.checkpoint import Checkpoint, save_checkpoint

TARGET_RATE = 200.0
FULL_RELEASE = 10_000


def fresh_checkpoint(directory: Path, model_cfg: ModelConfig) -> Path:
    """A round-1 checkpoint of an untrained model (same shapes and cost as a trained one). Its
    ledger is empty: the bench replaces the privacy gate (`open_gate`), which it does not time."""
    torch.manual_seed(0)
    cfg = EmixerConfig(model=model_cfg)
    nets = build_networks(model_cfg, VOCAB_SIZE, len(FINDINGS))
    ckpt = Checkpoint(1, get_weights(nets), {"sites": {}}, cfg.to_dict())
    return save_checkpoint(directory, ckpt)


def open_gate(ckpt: Checkpoint, budget: float | None, enrolled: dict | None = None) -> dict:
    """Stands in for check_privacy_gate: an untrained model has spent nothing."""
    note = "benchmark of an untrained model: no site data, the privacy gate is not run"
    return {"release_epsilon": 0.0, "delta": 0.0, "note": note, "rounds": {}, "sites": {}}


class Stopwatch:
    """Accumulates the time spent in wrapped functions, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.synthesis_rate", description=__doc__)
    parser.add_argument("--pairs", type=int, default=2000, help="pairs to release (about)")
    parser.add_argument("--resolution", type=int, default=64, help="model resolution")
    parser.add_argument("--batch-size", type=int, default=256, help="generation batch size")
    parser.add_argument("--no-png", action="store_true", help="DICOM only")
    args = parser.parse_args(argv)

    conditions = release_module.parse_conditions(None)
    per_label = max(1, args.pairs // len(conditions))
    formats = ("dicom",) if args.no_png else ("dicom", "png")
    watch = Stopwatch()
    build = release_module.build_networks

    def timed_networks(*a: Any, **k: Any) -> torch.nn.Module:
        nets = build(*a, **k)
        nets.g_ema.forward = watch.wrap("g", nets.g_ema.forward)  # releases sample G_ema
        nets.e.forward = watch.wrap("e", nets.e.forward)
        nets.r.sample_ids = watch.wrap("r", nets.r.sample_ids)
        return nets

    patches = {
        "png_bytes": release_module.png_bytes,
        "decode_report": release_module.decode_report,
        "_generate": release_module._generate,
    }
    write_dicom = release_module.SecondaryCaptureWriter.write
    gate = release_module.check_privacy_gate
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        root = Path(tmp)
        checkpoint = fresh_checkpoint(root / "ckpt", ModelConfig(resolution=args.resolution))
        for name, fn in patches.items():
            setattr(release_module, name, watch.wrap(name, fn))
        release_module.SecondaryCaptureWriter.write = watch.wrap("dicom", write_dicom)
        release_module.build_networks = timed_networks
        release_module.check_privacy_gate = open_gate
        try:
            start = time.perf_counter()
            summary = release_module.release(
                checkpoint,
                root / "release",
                per_label,
                conditions,
                formats=formats,
                batch_size=args.batch_size,
            )
            total = time.perf_counter() - start
        finally:
            for name, fn in patches.items():
                setattr(release_module, name, fn)
            release_module.SecondaryCaptureWriter.write = write_dicom
            release_module.build_networks = build
            release_module.check_privacy_gate = gate

    n = summary.count
    dicom = watch.seconds.get("dicom", 0.0)
    png = watch.seconds.get("png_bytes", 0.0)
    loop = watch.seconds["_generate"]
    generation = loop - dicom - png
    parts = {name: watch.seconds.get(name, 0.0) for name in ("g", "e", "r", "decode_report")}
    rest = total - loop
    rows = [
        [part, seconds, seconds / total, n / seconds if seconds > 0 else "-"]
        for part, seconds in (
            ("generation (G + E + R sample + decode)", generation),
            ("  of which G_ema (image)", parts["g"]),
            ("  of which E (image -> embedding)", parts["e"]),
            ("  of which R.sample_ids (report)", parts["r"]),
            ("  of which decode_report (ids -> text)", parts["decode_report"]),
            ("DICOM writing", dicom),
            ("PNG encoding + writing", png),
            ("checkpoint, manifest, page, rename (no gate)", rest),
            ("total", total),
        )
    ]
    rate = n / total
    scale = "measured" if n >= FULL_RELEASE else f"extrapolated from {n}"
    print_table(
        f"synthesis_rate: release of {n} pairs ({len(conditions)} conditions x {per_label}), "
        f"{args.resolution}px, formats {'+'.join(formats)}",
        ["part", "seconds", "share", "pairs/s if alone"],
        rows,
        [
            f"rate {rate:.1f} pairs/s; target >= {TARGET_RATE:.0f}/s: "
            f"{verdict(rate, TARGET_RATE, higher_is_better=True)}",
            f"10,000 pairs: {FULL_RELEASE / rate:.1f} s ({scale})",
            f"batch size {args.batch_size}; {machine()}",
        ],
    )


if __name__ == "__main__":
    main()
