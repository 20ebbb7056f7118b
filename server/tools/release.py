"""`emixer release`: synthetic image-report sets from a trained global model, behind a privacy gate.

The gate refuses a checkpoint whose signed ledger is missing, does not verify, leaves an
aggregated round uncovered, or whose recomputed epsilon is over budget (docs/PRIVACY.md
invariant 7), before anything is written. The release is built in a temporary folder beside the
target and renamed into place at the end, so a failure never leaves half a
release behind.
"""

from __future__ import annotations

import datetime
import json
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
from emixer_model.privacy import epsilon_from_history
from emixer_model.shared import ProgressFn, UserError, app_hash
from emixer_model.site_privacy import read_site_ledger, verify_site_history
from emixer_model.synthesis import synthesize_batches
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from server.checkpoint import Checkpoint, file_sha256, load_checkpoint
from server.ledger import HISTORY_KEYS
from server.tools.release_files import ReleaseFiles, file_names, sample_id
from server.tools.release_page import write_index_html

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
    ckpt: Checkpoint, budget: float | None, enrolled: dict[str, str] | None = None
) -> dict:
    """The manifest's privacy section, or ReleaseRefused saying which site breaks which rule.

    Nothing the coordinator stored is trusted: every entry's signature is verified against the
    site's key (the enrolled one when `enrolled` is given), each site's epsilon is recomputed
    with Opacus from its signed accountant history, every round up to the checkpoint's must be
    recorded and each site it aggregated must have signed an entry for that round and that global
    model, and no site's recomputed epsilon may exceed its signed budget or `budget`.
    """
    ledger = ckpt.ledger or {}
    sites = ledger.get("sites")
    if not sites:
        raise ReleaseRefused(
            "the checkpoint has no privacy ledger: a model whose privacy cost is unknown "
            "is never released"
        )
    verified: dict[str, dict] = {}
    for name, site in sorted(sites.items()):
        key = site.get("public_key", "")
        if enrolled is not None:
            if name not in enrolled:
                raise ReleaseRefused(f"site {name} is not among the enrolled sites")
            if key and key.split()[:2] != enrolled[name].split()[:2]:
                raise ReleaseRefused(f"site {name} signed with a key that is not its enrolled key")
        if not site.get("signed"):
            continue
        try:
            entries = verify_site_history(name, site["signed"], key)
        except (ValueError, KeyError, TypeError) as err:
            raise ReleaseRefused(f"site {name}: the signed ledger does not verify: {err}") from None
        last = entries[-1]
        epsilon = epsilon_from_history(last["history"], last["delta"], last["accountant"])
        limit = min(last["budget"], budget) if budget is not None else last["budget"]
        if epsilon > limit:
            raise ReleaseRefused(
                f"site {name}: epsilon {epsilon:.4f} is over the budget {limit:.4f} "
                "(recomputed from its signed history)"
            )
        verified[name] = {
            "epsilon": epsilon,
            "delta": last["delta"],
            "accountant": last["accountant"],
            "opacus": last["opacus"],
            "privacy_unit": last["privacy_unit"],
            "max_grad_norm": last["max_grad_norm"],
            "budget": last["budget"],
            "public_key": key,
            "history": [{k: e[k] for k in HISTORY_KEYS} for e in entries],
            "signed": site["signed"],
            "_entries": entries,
        }
    if not verified:
        raise ReleaseRefused("the privacy ledger shows no trained round at any site")
    _check_coverage(ckpt.server_round, ledger.get("rounds") or {}, verified)
    for site in verified.values():
        del site["_entries"]
    return {
        "release_epsilon": max(s["epsilon"] for s in verified.values()),
        "delta": max(s["delta"] for s in verified.values()),
        "note": "each site's (epsilon, delta) is recomputed with Opacus from the accountant "
        "history it signed (ECDSA P-256, SHA-256, over the canonical JSON of each entry); the "
        "release's epsilon is the maximum over sites. `emixer verify-release DIR` re-checks "
        "all of it offline. Training losses are site-local and never part of a release.",
        "rounds": ledger.get("rounds") or {},
        "sites": verified,
    }


def _check_coverage(last_round: int, rounds: dict, verified: dict[str, dict]) -> None:
    """Every round up to `last_round` is recorded, and each site it aggregated signed for it."""
    for number in range(1, last_round + 1):
        record = rounds.get(str(number))
        if record is None:
            raise ReleaseRefused(f"round {number} of the checkpoint has no record of its sites")
        for name in record["sites"]:
            entries = verified.get(name, {}).get("_entries", [])
            if not any(
                e["round"] == number and e["model_sha256"] == record["model_sha256"]
                for e in entries
            ):
                raise ReleaseRefused(
                    f"round {number} aggregated site {name}, but no entry signed by {name} "
                    "covers that round and model: rounds are missing from its ledger"
                )


def verify_release(folder: Path, enrolled: dict[str, str] | None = None) -> dict:
    """Re-check a release offline: its manifest's signed entries, keys and round coverage."""
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
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReleaseRefused(f"{folder} holds no readable release manifest ({err})") from None
    result = check_privacy_gate(ckpt, None, enrolled)
    for name, site in result["sites"].items():
        stated = privacy["sites"][name].get("epsilon")
        if stated != site["epsilon"]:
            raise ReleaseRefused(
                f"site {name}: manifest says epsilon {stated}, its signed history gives "
                f"{site['epsilon']}"
            )
    if privacy.get("release_epsilon") != result["release_epsilon"]:
        raise ReleaseRefused(
            f"manifest says release epsilon {privacy.get('release_epsilon')}, the signed "
            f"histories give {result['release_epsilon']}"
        )
    return result


def check_site_ledger(folder: Path, site_state: Path, verified: dict) -> dict:
    """A site's own check of a release against the ledger it keeps in its state dir.

    The manifest alone cannot show one thing (docs/PRIVACY.md, threat (e)): a coordinator that
    leaves out a site's trailing rounds and records them as rounds that did not aggregate the
    site. The site's `ledger.jsonl` holds every entry it signed, so this compares the two: the
    epsilon the release counts for the site must be at least what the site's own last entry in
    the release's run, up to the release's round, says. `verified` is `verify_release`'s result.
    Returns what was compared; ReleaseRefused when the release counts less.
    """
    ledger = read_site_ledger(site_state)
    if ledger is None:
        raise ReleaseRefused(
            f"{site_state} holds no ledger.jsonl: give this site's state dir (site.yaml's "
            "state_dir, or the --state-dir of train-local)"
        )
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    release_round = int(manifest["model"]["round"])
    runs = {
        str(json.loads(signed["entry"])["run"])
        for site in verified["sites"].values()
        for signed in site["signed"]
    }
    mine = [
        e
        for e in ledger
        if e.get("status") == "trained"
        and str(e.get("run")) in runs
        and int(e.get("round", 0)) <= release_round
    ]
    if not mine:
        return {"site": None, "rounds": [], "runs": sorted(runs), "release_round": release_round}
    name, last = mine[-1]["site"], mine[-1]
    own = epsilon_from_history(last["history"], last["delta"], last["accountant"])
    counted = verified["sites"].get(name, {"signed": [], "epsilon": 0.0})
    bodies = {signed["entry"] for signed in counted["signed"]}
    uncounted = [e["round"] for e in mine if e["entry"] not in bodies]
    if own > counted["epsilon"] * (1 + 1e-9) + 1e-12:
        raise ReleaseRefused(
            f"site {name}: the release counts epsilon {counted['epsilon']:.4f} for this site, but "
            f"this site's own ledger says {own:.4f} after round {last['round']} of run "
            f"{last['run']}; the rounds it signed and the release leaves out: "
            f"{', '.join(map(str, uncounted))}. Either their replies never reached the "
            "coordinator or were not aggregated, or the coordinator left them out: ask it, and "
            f"until it explains, take {own:.4f} as this release's epsilon for this site"
        )
    return {
        "site": name,
        "rounds": [e["round"] for e in mine],
        "uncounted": uncounted,
        "epsilon_own": own,
        "epsilon_release": counted["epsilon"],
        "runs": sorted(runs),
        "release_round": release_round,
    }


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
    progress: ProgressFn | None,
) -> list[dict]:
    """The release's rows; writer threads write each batch's files while the next is generated."""
    wanted = [c for c in conditions for _ in range(per_label)]
    batches = [wanted[start : start + batch_size] for start in range(0, len(wanted), batch_size)]
    labels = [torch.from_numpy(np.stack([label_vector(c) for c in batch])) for batch in batches]
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
                progress(len(rows), len(wanted))
    return rows
