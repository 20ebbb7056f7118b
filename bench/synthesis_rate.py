"""Synthetic pairs per second of `emixer release` (server.tools.release), and what limits it.

The checkpoint is a freshly initialised default model (same shapes and cost as a trained one) with
a small but valid privacy ledger, so the release passes the privacy gate exactly as a real one.
Generation threads (emixer_model.synthesis.synthesize_batches) compute whole batches, and writer
threads (server.tools.release_files) write each batch's DICOM and PNG files meanwhile; the main
thread hands batches from one to the other. The time is split by wrapping G, E and R.sample_ids
(CPU seconds of the generation threads), the writers' DICOM and PNG work (CPU seconds of the
writer threads; all these overlap) and, in the main thread, decode_report and the waits for the
writers. Writing limits the rate when the main thread waits for the writers, generation when it
does not.

    python -m bench.synthesis_rate [--pairs 2000] [--resolution 64] [--writers 2] [--threads 2]
Target: >= 500 pairs/s. With fewer than 10,000 pairs the 10,000-pair time is extrapolated.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import server.tools.release as release_module
import server.tools.release_files as files_module
from bench.common import machine, print_table, verdict
from emixer_model.config import FINDINGS, EmixerConfig, ModelConfig
from emixer_model.networks import build_networks, get_weights
from emixer_model.synthesis import GENERATION_THREADS
from emixer_model.text.vocabulary import VOCAB_SIZE
from server.checkpoint import Checkpoint, save_checkpoint

TARGET_RATE = 500.0
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
    """Accumulates the time spent in wrapped functions, by name, from any thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def wrap(
        self, name: str, fn: Callable[..., Any], clock: Callable[[], float] = time.perf_counter
    ) -> Callable[..., Any]:
        """`fn` timed by `clock`: wall time, or time.thread_time for the calling thread's CPU."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + clock() - start

        return timed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.synthesis_rate", description=__doc__)
    parser.add_argument("--pairs", type=int, default=2000, help="pairs to release (about)")
    parser.add_argument("--resolution", type=int, default=64, help="model resolution")
    parser.add_argument("--batch-size", type=int, default=256, help="generation batch size")
    parser.add_argument("--no-png", action="store_true", help="DICOM only")
    parser.add_argument("--writers", type=int, default=files_module.WRITERS, help="writer threads")
    parser.add_argument(
        "--threads", type=int, default=GENERATION_THREADS, help="generation threads"
    )
    args = parser.parse_args(argv)

    conditions = release_module.parse_conditions(None)
    per_label = max(1, args.pairs // len(conditions))
    formats = ("dicom",) if args.no_png else ("dicom", "png")
    watch = Stopwatch()
    build = release_module.build_networks

    def timed_networks(*a: Any, **k: Any) -> torch.nn.Module:
        nets = build(*a, **k)
        cpu = time.thread_time  # the generation threads overlap: count each one's CPU time
        nets.g_ema.forward = watch.wrap("g", nets.g_ema.forward, cpu)  # releases sample G_ema
        nets.e.forward = watch.wrap("e", nets.e.forward, cpu)
        nets.r.sample_ids = watch.wrap("r", nets.r.sample_ids, cpu)
        return nets

    patches = [  # (module or class, attribute, clock)
        (release_module, "decode_report", time.perf_counter),
        (release_module, "_generate", time.perf_counter),
        (files_module.ReleaseFiles, "submit", time.perf_counter),
        (files_module.ReleaseFiles, "__exit__", time.perf_counter),
        (files_module.SecondaryCaptureWriter, "write", time.thread_time),
        (files_module, "png_bytes", time.thread_time),
    ]
    originals = [getattr(owner, name) for owner, name, _ in patches]
    gate, release_files = release_module.check_privacy_gate, release_module.ReleaseFiles
    generate = release_module.synthesize_batches
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        root = Path(tmp)
        checkpoint = fresh_checkpoint(root / "ckpt", ModelConfig(resolution=args.resolution))
        for (owner, name, clock), fn in zip(patches, originals, strict=True):
            setattr(owner, name, watch.wrap(name, fn, clock))
        release_module.build_networks = timed_networks
        release_module.check_privacy_gate = open_gate
        release_module.ReleaseFiles = functools.partial(release_files, writers=args.writers)
        release_module.synthesize_batches = functools.partial(generate, threads=args.threads)
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
            for (owner, name, _), fn in zip(patches, originals, strict=True):
                setattr(owner, name, fn)
            release_module.build_networks = build
            release_module.check_privacy_gate = gate
            release_module.ReleaseFiles = release_files
            release_module.synthesize_batches = generate

    n = summary.count
    seconds = watch.seconds
    loop = seconds["_generate"]
    waiting = seconds.get("submit", 0.0) + seconds.get("__exit__", 0.0)
    rows = [
        [part, spent, spent / total, n / spent if spent > 0 else "-"]
        for part, spent in (
            ("G_ema (generation threads' CPU s)", seconds.get("g", 0.0)),
            ("E (generation threads' CPU s)", seconds.get("e", 0.0)),
            ("R.sample_ids: reports (generation threads' CPU s)", seconds.get("r", 0.0)),
            ("decode_report: ids -> text (main thread)", seconds.get("decode_report", 0.0)),
            ("main thread waiting for the writers", waiting),
            ("DICOM writing (writer threads' CPU s)", seconds.get("write", 0.0)),
            ("PNG encoding (writer threads' CPU s)", seconds.get("png_bytes", 0.0)),
            ("checkpoint, manifest, page, rename (no gate)", total - loop),
            ("total (wall)", total),
        )
    ]
    rate = n / total
    cpu = sum(seconds.get(k, 0.0) for k in ("g", "e", "r", "decode_report", "write", "png_bytes"))
    cores = os.cpu_count() or 1
    scale = "measured" if n >= FULL_RELEASE else f"extrapolated from {n}"
    limit = "writing (generation waited for the writers)" if waiting > 0.1 * loop else "generation"
    print_table(
        f"synthesis_rate: release of {n} pairs ({len(conditions)} conditions x {per_label}), "
        f"{args.resolution}px, formats {'+'.join(formats)}, {args.threads} generation threads, "
        f"{args.writers} writer threads",
        ["part", "seconds", "share of wall", "pairs/s if alone"],
        rows,
        [
            f"rate {rate:.1f} pairs/s; target >= {TARGET_RATE:.0f}/s: "
            f"{verdict(rate, TARGET_RATE, higher_is_better=True)}; limited by {limit}",
            f"10,000 pairs: {FULL_RELEASE / rate:.1f} s ({scale})",
            f"CPU of generation and writing: {1000 * cpu / n:.2f} ms a pair; {cores} cores kept "
            f"busy by it alone would give {cores * n / cpu:.0f} pairs/s (the ceiling on an idle "
            "machine, if the CPU costs stay as measured)",
            f"batch size {args.batch_size}; {machine()}",
        ],
    )


if __name__ == "__main__":
    main()
