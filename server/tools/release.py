"""`emixer release`: synthetic image-report sets from a trained global model, behind a privacy gate.

The gate refuses a checkpoint whose signed ledger is missing, does not verify, leaves out an
enrolled site or an aggregated round, names a model a site that trained did not sign as the
model after its round, or whose recomputed epsilon is over budget (docs/PRIVACY.md invariant 7),
before anything is written. The release is built in a temporary folder beside the
target and renamed into place at the end, so a failure never leaves half a
release behind.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import tempfile
from contextlib import closing
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from emixer_model.config import FINDINGS, EmixerConfig, from_dict
from emixer_model.networks import build_networks, set_weights
from emixer_model.privacy.ledger import (
    LedgerRefused,
    arrays_sha256,
    check_against_own_ledger,
    verify_ledger,
)
from emixer_model.shared import ProgressFn, UserError, app_hash
from emixer_model.synthesis import synthesize_batches
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from server.checkpoint import Checkpoint, file_sha256, load_checkpoint
from server.tools.release_files import ReleaseFiles, file_names, sample_id
from server.tools.release_page import model_html, privacy_section_html, write_index_html

# Findings that often appear together in chest X-ray reports; released besides each single finding.
COMMON_COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("Cardiomegaly", "Pleural Effusion"),
    ("Cardiomegaly", "Edema"),
    ("Pleural Effusion", "Edema"),
    ("Consolidation", "Pleural Effusion"),
    ("Support Devices", "Pleural Effusion"),
    ("Support Devices", "Cardiomegaly"),
)


class ReleaseRefused(UserError):
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


def check_privacy_gate(
    ckpt: Checkpoint,
    budget: float | None,
    enrolled: dict[str, str] | None = None,
    model_sha256: str | None = None,
) -> dict:
    """The manifest's privacy section, or ReleaseRefused saying which site breaks which rule.

    The checks are `emixer_model.privacy.ledger.verify_ledger`'s: signatures against the
    (enrolled) keys, epsilon recomputed from each site's signed history, every aggregated round
    covered, every site that trained signed for this model (`model_sha256`, by default the hash
    of the checkpoint's arrays) as the model after its round, no site over its budget or
    `budget`. Every figure of the section is derived from the
    signed entries (the round records are the coordinator's, checked for coverage), so
    `verify_release` rebuilds it and compares field by field.
    """
    ledger = ckpt.ledger or {}
    try:
        model = model_sha256 if model_sha256 is not None else arrays_sha256(ckpt.arrays)
        sites = verify_ledger(ledger, ckpt.server_round, budget, enrolled, model)
    except LedgerRefused as err:
        raise ReleaseRefused(str(err)) from None
    return {
        "release_epsilon": max(s["epsilon"] for s in sites.values()),
        "delta": max(s["delta"] for s in sites.values() if s["delta"] is not None),
        "rounds": ledger.get("rounds") or {},
        "sites": sites,
    }


# What the coordinator states and no site signs; the manifest and the page say so.
UNSIGNED = {
    "fields": [
        "created",
        "code",
        "model.checkpoint",
        "model.sha256",
        "config",
        "public_pretraining",
        "seed",
        "counts",
        "privacy.rounds",
    ],
    "note": "written by the coordinator, not signed by any site. The privacy section (except "
    "its round records, which are checked for coverage) is rebuilt from the sites' signed "
    "entries by `emixer verify-release`, which refuses any difference; model.arrays_sha256 and "
    "model.round must be the model every site that trained signed for at the end of the run, "
    "and public_pretraining's model_sha256 a model the sites signed for in round 1 (its name "
    "and steps are unsigned). That the images were sampled from model.arrays_sha256 is the "
    "coordinator's statement: anyone holding the checkpoint can hash its arrays. The run "
    "config's privacy values are the run's requests, not what the sites used: those are in "
    "privacy.sites.",
}


def verify_release(folder: Path, enrolled: dict[str, str] | None = None) -> dict:
    """Re-check a release offline: its manifest's signed entries, keys and round coverage; every
    privacy figure of the manifest and of index.html against what the signed entries give."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        privacy = manifest["privacy"]
        sites = {
            name: {"public_key": s["public_key"], "signed": s["signed"]}
            for name, s in privacy["sites"].items()
        }
        ckpt = Checkpoint(
            server_round=int(manifest["model"]["round"]),
            arrays={},
            ledger={"sites": sites, "rounds": privacy["rounds"]},
            config={},
        )
        model = str(manifest["model"]["arrays_sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReleaseRefused(f"{folder} holds no readable release manifest ({err})") from None
    result = check_privacy_gate(ckpt, None, enrolled, model)
    difference = first_difference(result, privacy, "privacy")
    if difference:
        raise ReleaseRefused(f"manifest field {difference}: the manifest was edited; refused")
    check_public_pretraining(manifest.get("public_pretraining"), result)
    page = Path(folder) / "index.html"
    shown = page.read_text() if page.is_file() else ""
    if privacy_section_html(result) not in shown or model_html(manifest["model"]) not in shown:
        raise ReleaseRefused(
            "index.html does not show the privacy and model the signed entries give: it was "
            "edited after release, or written by another version (the manifest names "
            f"{manifest['code']})"
        )
    return result


def first_difference(expected: object, stated: object, path: str) -> str | None:
    """Where `stated` differs from `expected` ("PATH says X, the signed entries give Y"), or
    None; numbers agree to a relative 1e-9 (one recomputation, another machine)."""
    if isinstance(expected, dict) and isinstance(stated, dict):
        for key in sorted(set(expected) | set(stated), key=str):
            if key not in stated or key not in expected:
                where = "is missing" if key not in stated else "is not in the signed entries"
                return f"{path}.{key} {where}"
            found = first_difference(expected[key], stated[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(stated, list) and len(expected) == len(stated):
        for number, (want, have) in enumerate(zip(expected, stated, strict=True)):
            found = first_difference(want, have, f"{path}[{number}]")
            if found:
                return found
        return None
    numbers = (int, float)
    if (
        isinstance(expected, numbers)
        and isinstance(stated, numbers)
        and not isinstance(expected, bool)
        and not isinstance(stated, bool)
        and math.isclose(expected, stated, rel_tol=1e-9)
    ):
        return None
    if expected == stated:
        return None
    return f"{path} says {stated!r}, the signed entries give {expected!r}"


def check_public_pretraining(public: dict | None, privacy: dict) -> None:
    """A claimed public starting model must be one the sites signed for in round 1."""
    if not public:
        return
    signed = {
        json.loads(s["entry"])["model_sha256"]
        for site in privacy["sites"].values()
        for s in site["signed"]
        if json.loads(s["entry"])["round"] == 1
    }
    if public.get("model_sha256") not in signed:
        raise ReleaseRefused(
            f"manifest field public_pretraining names model {public.get('model_sha256')!r}, "
            "but no site signed round 1 for it: the release did not start from that public model"
        )


def check_site_ledger(folder: Path, own: list[dict], verified: dict) -> dict:
    """A site's own check of the release in `folder` against `own`, the ledger it keeps in its
    state dir (`emixer_model.privacy.ledger.check_against_own_ledger`); `verified` is
    `verify_release`'s result. ReleaseRefused when the release counts less than the site had
    spent for a model of its lineage.
    """
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    try:
        return check_against_own_ledger(own, manifest["model"]["arrays_sha256"], verified)
    except LedgerRefused as err:
        raise ReleaseRefused(str(err)) from None


def read_public_keys(paths: list[Path]) -> dict[str, str]:
    """Enrolled keys from OpenSSH .pub files (or folders of them), named by file stem."""
    keys: dict[str, str] = {}
    for path in paths:
        files = sorted(Path(path).glob("*.pub")) if Path(path).is_dir() else [Path(path)]
        for file in files:
            try:
                keys[file.stem] = file.read_text().strip()
            except OSError as err:
                raise ReleaseRefused(f"cannot read public key {file}: {err}") from None
    return keys


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
    progress: ProgressFn | None = None,
    enrolled: dict[str, str] | None = None,
) -> ReleaseSummary:
    """Sample `per_label` image-report pairs per condition into `out` (which must not exist)."""
    unknown_formats = set(formats) - {"dicom", "png"}
    if unknown_formats or "dicom" not in formats:
        raise ReleaseRefused("--format takes dicom or dicom,png (DICOM is always written)")
    if out.exists() and any(out.iterdir()):
        raise ReleaseRefused(f"{out} already holds files; a release is never overwritten")
    ckpt = load_checkpoint(checkpoint)
    privacy = check_privacy_gate(ckpt, budget, enrolled)
    cfg, nets = sampling_networks(ckpt)

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
                "arrays_sha256": arrays_sha256(ckpt.arrays),
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
            "unsigned": UNSIGNED,
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


def sampling_networks(ckpt: Checkpoint) -> tuple[EmixerConfig, torch.nn.Module]:
    """The checkpoint's config and networks, ready to sample."""
    cfg = from_dict(EmixerConfig, ckpt.config)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, ckpt.arrays)
    # oneDNN runs the conv stacks of G and E about twice as fast in channels-last layout on CPU
    return cfg, nets.eval().to(memory_format=torch.channels_last)


def condition_batches(
    conditions: list[tuple[str, ...]], per_label: int, batch_size: int
) -> tuple[list[list[tuple[str, ...]]], list[torch.Tensor]]:
    """A release's rows in batches: each condition `per_label` times, and the label vectors."""
    wanted = [c for c in conditions for _ in range(per_label)]
    batches = [wanted[start : start + batch_size] for start in range(0, len(wanted), batch_size)]
    return batches, [torch.from_numpy(np.stack([label_vector(c) for c in b])) for b in batches]


@torch.no_grad()
def draw_as_released(
    checkpoint: Path,
    conditions: list[tuple[str, ...]],
    per_label: int,
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images in [-1, 1], labels, reports): the pairs `release` draws from `checkpoint` with
    these arguments (the same latents), kept in memory and clipped as the release's files are.
    No privacy gate and nothing written: this is for comparing another model (the public one)
    with a release at the site, never for publishing."""
    cfg, nets = sampling_networks(load_checkpoint(checkpoint))
    _, labels = condition_batches(conditions, per_label, batch_size)
    images, reports = [], []
    with closing(synthesize_batches(nets, cfg.model, labels, seed)) as generated:
        for batch_images, token_ids in generated:
            images.append(batch_images.clamp(-1.0, 1.0))
            reports += [decode_report(ids) for ids in token_ids.numpy()]
    return torch.cat(images), torch.cat(labels), reports


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
    progress: ProgressFn | None,
) -> list[dict]:
    """The release's rows; writer threads write each batch's files while the next is generated."""
    batches, labels = condition_batches(conditions, per_label, batch_size)
    wanted = sum(len(batch) for batch in batches)
    rows: list[dict] = []
    shape = (cfg.model.resolution, cfg.model.resolution)
    generated = synthesize_batches(nets, cfg.model, labels, seed)
    with ReleaseFiles(work, formats, shape) as files, closing(generated):
        for batch, (images, token_ids) in zip(batches, generated, strict=True):
            first = len(rows) + 1
            files.submit(first, ((images[:, 0].numpy() + 1.0) / 2.0).clip(0.0, 1.0), batch)
            for number, condition, ids in zip(
                range(first, first + len(batch)), batch, token_ids.numpy(), strict=True
            ):
                dicom, png = file_names(number, formats)
                rows.append(
                    {
                        "id": sample_id(number),
                        "dicom": dicom,
                        "png": png,
                        "labels": list(condition),
                        "report": decode_report(ids),
                    }
                )
            if progress:
                progress(len(rows), wanted)
    return rows
