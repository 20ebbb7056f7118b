"""`emixer release`: synthetic image-report sets from a trained global model, behind a privacy gate.

The gate refuses a checkpoint whose ledger is missing, over budget, or inconsistent with its own
history (docs/PRIVACY.md invariant 7), before anything is written. The release is built in a
temporary folder beside the target and renamed into place at the end, so a failure never leaves
half a release behind.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from client.audit import app_hash
from emixer_model.config import FINDINGS, EmixerConfig, from_dict
from emixer_model.data.dicom import ReleaseSeries, write_secondary_capture
from emixer_model.networks import build_networks, set_weights
from emixer_model.privacy import epsilon_from_history
from emixer_model.synthesis import synthesize
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from server.checkpoint import Checkpoint, file_sha256, load_checkpoint
from server.release_sheet import png_bytes, write_index_html

# Findings that often appear together in chest X-ray reports; released besides each single finding.
COMMON_COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("Cardiomegaly", "Pleural Effusion"),
    ("Cardiomegaly", "Edema"),
    ("Pleural Effusion", "Edema"),
    ("Consolidation", "Pleural Effusion"),
    ("Support Devices", "Pleural Effusion"),
    ("Support Devices", "Cardiomegaly"),
)
EPSILON_TOLERANCE = 0.01  # a ledger's epsilon must match its own history within 1%


class ReleaseRefused(Exception):
    """The privacy gate or the arguments refuse this release; nothing was written."""


@dataclass
class ReleaseSummary:
    out: Path
    count: int
    release_epsilon: float
    per_condition: dict[str, int]


def parse_conditions(text: str | None) -> list[tuple[str, ...]]:
    """`--labels "Cardiomegaly,Edema+Pleural Effusion"` -> conditions; None -> singles + combos."""
    if not text:
        return [(f,) for f in FINDINGS] + list(COMMON_COMBINATIONS)
    conditions = []
    for item in text.split(","):
        names = tuple(n.strip() for n in item.split("+") if n.strip())
        unknown = [n for n in names if n not in FINDINGS]
        if unknown or not names:
            raise ReleaseRefused(
                f"unknown finding {unknown[0] if unknown else item!r} in --labels; "
                f"known: {', '.join(FINDINGS)} (join findings with + for a combination)"
            )
        if "No Finding" in names and len(names) > 1:
            raise ReleaseRefused("'No Finding' cannot be combined with other findings")
        conditions.append(names)
    return conditions


def check_privacy_gate(ckpt: Checkpoint, budget: float | None) -> dict:
    """The manifest's privacy section, or ReleaseRefused saying which site breaks which rule."""
    sites = ckpt.ledger.get("sites") if ckpt.ledger else None
    if not sites:
        raise ReleaseRefused(
            "the checkpoint has no privacy ledger: a model whose privacy cost is unknown "
            "is never released"
        )
    trained = {name: s for name, s in sites.items() if s.get("history")}
    if not trained:
        raise ReleaseRefused("the privacy ledger shows no trained round at any site")
    for name, site in sites.items():
        history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in site["history"]]
        recomputed = epsilon_from_history(history, site["delta"], site["accountant"])
        if abs(recomputed - site["epsilon"]) > EPSILON_TOLERANCE * max(recomputed, 1e-3):
            raise ReleaseRefused(
                f"site {name}: the ledger says epsilon {site['epsilon']:.4f} but its own history "
                f"gives {recomputed:.4f}; the ledger is inconsistent"
            )
        limit = min(site["budget"], budget) if budget is not None else site["budget"]
        if site["epsilon"] > limit:
            raise ReleaseRefused(
                f"site {name}: epsilon {site['epsilon']:.4f} is over the budget {limit:.4f}"
            )
    return {
        "release_epsilon": max(s["epsilon"] for s in sites.values()),
        "delta": max(s["delta"] for s in sites.values()),
        "note": "each site's (epsilon, delta) is cumulative over every round it trained; the "
        "release's epsilon is the maximum over sites. Recompute a site's epsilon from its "
        "history with opacus' accountant (noise multiplier, sample rate, steps per round).",
        "sites": sites,
    }


def label_vector(condition: tuple[str, ...]) -> np.ndarray:
    return np.array([1.0 if f in condition else 0.0 for f in FINDINGS], dtype=np.float32)


def release(
    checkpoint: Path,
    out: Path,
    per_label: int,
    conditions: list[tuple[str, ...]],
    seed: int = 0,
    formats: tuple[str, ...] = ("dicom", "png"),
    budget: float | None = None,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> ReleaseSummary:
    """Sample `per_label` image-report pairs per condition into `out` (which must not exist)."""
    unknown_formats = set(formats) - {"dicom", "png"}
    if unknown_formats or "dicom" not in formats:
        raise ReleaseRefused("--format takes dicom or dicom,png (DICOM is always written)")
    if out.exists() and any(out.iterdir()):
        raise ReleaseRefused(f"{out} already holds files; a release is never overwritten")
    ckpt = load_checkpoint(checkpoint)
    privacy = check_privacy_gate(ckpt, budget)
    cfg = from_dict(EmixerConfig, ckpt.config)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, ckpt.arrays)
    # oneDNN runs the conv stacks of G and E about twice as fast in channels-last layout on CPU
    nets.eval().to(memory_format=torch.channels_last)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (work / "images").mkdir()
        if "png" in formats:
            (work / "png").mkdir()
        rows = _generate(
            nets, cfg, conditions, per_label, seed, formats, work, batch_size, progress
        )
        with (work / "reports.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        per_condition = {"+".join(c): per_label for c in conditions}
        per_finding = {f: sum(f in r["labels"] for r in rows) for f in FINDINGS}
        manifest = {
            "format": "emixer-fl-release/1",
            "synthetic": True,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "code": {"emixer-fl": version("emixer-fl"), "app_hash": app_hash()},
            "model": {
                "checkpoint": checkpoint.name,
                "sha256": file_sha256(checkpoint),
                "round": ckpt.server_round,
            },
            "config": ckpt.config,
            # what the model learned WITHOUT privacy before the sites' DP rounds
            "public_pretraining": ckpt.public_source or None,
            "seed": seed,
            "counts": {
                "total": len(rows),
                "per_condition": per_condition,
                "per_finding": per_finding,
            },
            "privacy": privacy,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
        write_index_html(work)
        if out.exists():
            out.rmdir()  # empty, checked above
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ReleaseSummary(out, len(rows), privacy["release_epsilon"], per_condition)


@torch.no_grad()
def _generate(
    nets: torch.nn.Module,
    cfg: EmixerConfig,
    conditions: list[tuple[str, ...]],
    per_label: int,
    seed: int,
    formats: tuple[str, ...],
    work: Path,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    series = ReleaseSeries.new()
    wanted = [c for c in conditions for _ in range(per_label)]
    rows: list[dict] = []
    for start in range(0, len(wanted), batch_size):
        batch = wanted[start : start + batch_size]
        y = torch.from_numpy(np.stack([label_vector(c) for c in batch]))
        images, token_ids = synthesize(nets, cfg.model, y, generator, batch_size)
        token_ids = token_ids.numpy()
        pixels01 = ((images[:, 0].numpy() + 1.0) / 2.0).clip(0.0, 1.0)
        for i, condition in enumerate(batch):
            sample_id = f"{start + i + 1:06d}"
            dicom = f"images/{sample_id}.dcm"
            write_secondary_capture(
                work / dicom,
                pixels01[i],
                series=series,
                instance_number=start + i + 1,
                patient_id=f"SYNTHETIC-{sample_id}",
                patient_name="SYNTHETIC^EMIXER",
                extra={
                    "BurnedInAnnotation": "NO",
                    "ImageComments": "Synthetic image generated by EMIXER-FL; depicts no patient",
                    "DerivationDescription": "synthetic: EMIXER-FL generator, "
                    f"conditioned on {'+'.join(condition)}",
                },
            )
            png = None
            if "png" in formats:
                png = f"png/{sample_id}.png"
                (work / png).write_bytes(png_bytes(pixels01[i]))
            rows.append(
                {
                    "id": sample_id,
                    "dicom": dicom,
                    "png": png,
                    "labels": list(condition),
                    "report": decode_report(token_ids[i]),
                }
            )
        if progress:
            progress(len(rows), len(wanted))
    return rows
