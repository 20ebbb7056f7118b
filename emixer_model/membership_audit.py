"""`emixer audit`: membership-inference and memorisation audit of a trained model, at one site.

A differential-privacy guarantee is a bound; this audit is the empirical check a site's privacy
officer can run on their own data. The model must have been trained with
`train.holdout_fraction > 0`: the evaluation split site training recorded in the site's state
dir (data/splits.py) names the privacy units that never took part in training, so the site
knows which of its studies are members (trained on) and which are non-members (held out).
Three attacks each score every labeled study, higher meaning "member":

- discriminator: D(x, report, labels); a discriminator that memorised its training pairs scores
  them higher than unseen pairs;
- report loss: -teacher-forced report loss of R(E(x)); the classic loss-threshold attack on the
  image encoder + report decoder;
- nearest neighbour: -distance from the real image to the closest of M images the generator makes
  for the same labels; it tests what a synthetic release could leak.

Each attack is summarised by ROC AUC (0.5 = no better than chance) and TPR at 1% and 0.1% FPR,
with seeded bootstrap 95% intervals (the evaluation's AUROC and bootstrap, patients resampled
whole). Memorisation compares each synthetic image's distance to its
nearest member image with the real-to-real nearest-neighbour distances among members, and saves
the closest synthetic/real pairs as a PNG for a person to look at. audit.json and the PNG hold
real images and per-site details: they stay at the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from emixer_model.config import FINDINGS
from emixer_model.data.site import SiteData
from emixer_model.data.splits import EvaluationSplit, training_data, unit_of_row
from emixer_model.evaluation.bootstrap import Resampler, bootstrap, percentile_interval
from emixer_model.evaluation.image_metrics import auroc
from emixer_model.networks import EmixerNets
from emixer_model.shared import UserError, write_json_atomic

TARGET_FPRS = (0.01, 0.001)
PNG_NAME = "closest_pairs.png"
STAYS_AT_SITE = (
    "audit.json and the PNG contain this site's real images and study details: keep them at "
    "the site, never send them to the coordinator"
)


class AuditError(UserError, ValueError):
    """The audit cannot run on this model or data; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Members and non-members


@dataclass
class HoldoutSplit:
    """A site split by privacy unit: what training saw, and which labeled rows are (non-)members."""

    train: SiteData  # the site without its held-out units (what site training trains on)
    members: np.ndarray  # rows of the SiteData's labeled studies that were trained on
    nonmembers: np.ndarray  # rows of labeled studies of held-out units


def split_site(data: SiteData, split: EvaluationSplit) -> HoldoutSplit:
    """Members and non-members by the split site training recorded (data/splits.py): whole units
    on each side; a unit that joins a held-out and a trained patient is neither."""
    scored, held = (set(side) for side in split.sides(data))
    members = [i for u, (rows, _) in enumerate(data.units) if u not in held for i in rows]
    nonmembers = [i for u, (rows, _) in enumerate(data.units) if u in scored for i in rows]
    return HoldoutSplit(
        training_data(data, split), np.array(members, int), np.array(nonmembers, int)
    )


# ---------------------------------------------------------------------------------------------
# Metrics (pure numpy)


def _scores(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(members, dtype=np.float64).ravel()
    n = np.asarray(nonmembers, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise AuditError("an attack needs at least one member and one non-member score")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise AuditError("attack scores contain NaN or infinity; the model weights may be broken")
    return m, n


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) over every threshold, from (0, 0) to (1, 1); score >= threshold means member."""
    m, n = _scores(members, nonmembers)
    thresholds = np.unique(np.concatenate([m, n]))[::-1]
    tp = m.size - np.searchsorted(np.sort(m), thresholds, side="left")
    fp = n.size - np.searchsorted(np.sort(n), thresholds, side="left")
    return np.concatenate([[0.0], fp / n.size]), np.concatenate([[0.0], tp / m.size])


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """TPR at a false-positive rate, linearly interpolated on the ROC curve's upper envelope.

    Low-FPR TPR is what matters for privacy: an attack that confidently finds a few members is a
    leak even when its AUC is near 0.5.
    """
    curve_fpr, curve_tpr = roc_curve(members, nonmembers)
    last = np.append(np.diff(curve_fpr) > 0, True)  # best TPR at each distinct FPR
    return float(np.interp(fpr, curve_fpr[last], curve_tpr[last]))


def attack_metrics(
    members: np.ndarray,
    nonmembers: np.ndarray,
    resamples: int = 200,
    seed: int = 0,
    fprs: tuple[float, ...] = TARGET_FPRS,
    member_units: np.ndarray | None = None,
    nonmember_units: np.ndarray | None = None,
) -> dict[str, Any]:
    """AUC and TPR at each FPR with percentile bootstrap 95% CIs (evaluation/bootstrap.py).

    Members and non-members are resampled separately, so every resample keeps both groups, and
    by whole privacy unit (one unit per score unless `*_units` say which scores share a
    patient), so a patient's correlated studies never narrow the interval. A TPR at an FPR below
    1/(non-members) cannot be measured, only interpolated; such entries say `resolved: false`
    and how many non-members would be needed.
    """
    m, n = _scores(members, nonmembers)

    def statistic(m_rows: np.ndarray, n_rows: np.ndarray) -> np.ndarray:
        bm, bn = m[m_rows], n[n_rows]
        auc = auroc(np.r_[bm, bn], np.r_[np.ones(len(bm), bool), np.zeros(len(bn), bool)])
        return np.array([auc, *(tpr_at_fpr(bm, bn, f) for f in fprs)])

    resamplers = [
        Resampler(np.arange(m.size) if member_units is None else member_units, "members"),
        Resampler(np.arange(n.size) if nonmember_units is None else nonmember_units, "others"),
    ]
    point, draws = bootstrap(statistic, resamplers, resamples, seed)

    def ci(column: int) -> list[float]:
        return list(percentile_interval(draws[:, column]) or (math.nan, math.nan))

    tprs = {}
    for j, f in enumerate(fprs, start=1):
        needed = math.ceil(1 / f - 1e-9)
        tprs[f"{f:g}"] = {
            "value": float(point[j]),
            "ci95": ci(j),
            "resolved": n.size >= needed,
            "nonmembers_needed": needed,
        }
    return {
        "auc": float(point[0]),
        "auc_ci95": ci(0),
        "tpr_at_fpr": tprs,
        "members": int(m.size),
        "nonmembers": int(n.size),
        "bootstrap_resamples": resamples,
    }


# ---------------------------------------------------------------------------------------------
# Attacks: one score per labeled study, higher = "member"


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def discriminator_scores(
    nets: EmixerNets,
    images: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
) -> np.ndarray:
    """D(x, report, labels) for each real pair."""
    device = next(nets.parameters()).device
    out = [
        nets.d(images[s].to(device), tokens[s].to(device), labels[s].to(device)).cpu()
        for s in _batches(len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def report_loss_scores(
    nets: EmixerNets,
    images: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    batch_size: int = 64,
) -> np.ndarray:
    """Minus the teacher-forced report loss: trained-on reports are predicted better."""
    device = next(nets.parameters()).device
    out = [
        -nets.r.teacher_forced_loss(
            nets.e(images[s].to(device)), labels[s].to(device), tokens[s].to(device)
        ).cpu()
        for s in _batches(len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def generate_per_label_set(
    nets: EmixerNets,
    label_sets: torch.Tensor,
    per_label: int,
    latent_dim: int,
    seed: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """`per_label` generated images for each row of `label_sets` -> [K, per_label, 1, R, R]."""
    device = next(nets.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    y = label_sets.repeat_interleave(per_label, dim=0)
    z = torch.randn(len(y), latent_dim, generator=generator)
    images = torch.cat(
        [nets.g_ema(z[s].to(device), y[s].to(device)).cpu() for s in _batches(len(y), batch_size)]
    )
    return images.view(len(label_sets), per_label, *images.shape[1:])


def nearest_distances(
    queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: L2 distance to (and index of) the nearest reference image.

    exclude_self: queries and references are the same images; an image is not its own neighbour.
    Blocks of queries bound memory to block x references distances.
    """
    r = references.reshape(len(references), -1).double()
    best, index = [], []
    for s in _batches(len(queries), 512):
        dist = torch.cdist(queries[s].reshape(s.stop - s.start, -1).double(), r)
        if exclude_self:
            rows = torch.arange(s.stop - s.start)
            dist[rows, rows + s.start] = math.inf
        d, i = dist.min(dim=1)
        best.append(d)
        index.append(i)
    return torch.cat(best).numpy(), torch.cat(index).numpy()


def nearest_neighbour_scores(
    nets: EmixerNets,
    images: torch.Tensor,
    labels: torch.Tensor,
    per_label: int,
    latent_dim: int,
    seed: int,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Minus the distance from each real image to the closest generated image with its labels.

    Returns (scores, generated images [K*M,1,R,R], their label sets [K*M, L]); the generated
    images serve the memorisation check too.
    """
    label_sets, group = np.unique(labels.numpy(), axis=0, return_inverse=True)
    group = group.reshape(-1)
    label_sets = torch.from_numpy(label_sets)
    generated = generate_per_label_set(nets, label_sets, per_label, latent_dim, seed)
    scores = np.empty(len(images))
    for k in range(len(label_sets)):
        rows = np.flatnonzero(group == k)
        scores[rows] = -nearest_distances(images[rows], generated[k])[0]
    flat = generated.reshape(-1, *generated.shape[2:])
    return scores, flat, label_sets.repeat_interleave(per_label, dim=0)


def membership_attacks(
    nets: EmixerNets,
    data: SiteData,
    split: HoldoutSplit,
    latent_dim: int,
    per_label: int = 64,
    resamples: int = 200,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], torch.Tensor, torch.Tensor]:
    """Run the three attacks on the labeled studies of `data` and score them against the split.

    Returns (metrics per attack, generated images, their label sets).
    """
    if split.members.size == 0 or split.nonmembers.size == 0:
        raise AuditError(
            f"the split has {split.members.size} member and {split.nonmembers.size} non-member "
            "labeled studies; an audit needs both (use a site with more labeled studies or a "
            "holdout fraction that leaves some units on each side)"
        )
    nets.eval()
    rows = np.concatenate([split.members, split.nonmembers])
    images, tokens, labels = data.images[rows], data.tokens[rows], data.labels[rows]
    nn_scores, generated, generated_labels = nearest_neighbour_scores(
        nets, images, labels, per_label, latent_dim, seed
    )
    scores = {
        "discriminator": discriminator_scores(nets, images, tokens, labels),
        "report-loss": report_loss_scores(nets, images, labels, tokens),
        "nearest-neighbour": nn_scores,
    }
    cut = split.members.size
    unit = unit_of_row(data)
    metrics = {
        name: attack_metrics(
            s[:cut],
            s[cut:],
            resamples=resamples,
            seed=seed,
            member_units=unit[split.members],
            nonmember_units=unit[split.nonmembers],
        )
        for name, s in scores.items()
    }
    return metrics, generated, generated_labels


# ---------------------------------------------------------------------------------------------
# Memorisation


def memorisation(
    synthetic: torch.Tensor,
    synthetic_labels: torch.Tensor,
    member_images: torch.Tensor,
    member_rows: np.ndarray,
    png_path: Path | None = None,
    pairs: int = 8,
) -> dict[str, Any]:
    """How close do synthetic images come to real member images, measured against how close real
    images come to each other? A synthetic image nearer a member than 99% of members are to their
    own nearest neighbour is a likely copy; the closest pairs go to a PNG for a person to judge.
    """
    if len(member_images) < 2:
        raise AuditError("the memorisation check needs at least two member images")
    real_nn, _ = nearest_distances(member_images, member_images, exclude_self=True)
    synth_nn, nearest = nearest_distances(synthetic, member_images)
    threshold = float(np.percentile(real_nn, 1))
    order = np.argsort(synth_nn, kind="stable")[:pairs]
    closest = [
        {
            "synthetic_index": int(i),
            "synthetic_labels": [
                f for f, v in zip(FINDINGS, synthetic_labels[i].tolist(), strict=True) if v > 0.5
            ],
            "member_row": int(member_rows[nearest[i]]),
            "distance": float(synth_nn[i]),
        }
        for i in order
    ]
    result = {
        "synthetic_images": int(len(synthetic)),
        "member_images": int(len(member_images)),
        "real_to_real_p1": threshold,
        "real_to_real_median": float(np.median(real_nn)),
        "synthetic_to_real_median": float(np.median(synth_nn)),
        "fraction_closer_than_real_p1": float(np.mean(synth_nn < threshold)),
        "closest_pairs": closest,
    }
    if png_path is not None:
        _save_pairs_png(png_path, synthetic[order], member_images[nearest[order]], synth_nn[order])
        result["png"] = str(png_path)
    return result


def _save_pairs_png(
    path: Path, synthetic: torch.Tensor, real: torch.Tensor, distances: np.ndarray
) -> None:
    from matplotlib.figure import Figure  # no pyplot: Agg rendering without global state

    n = len(synthetic)
    fig = Figure(figsize=(2 * n, 5), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for k in range(n):
        for row, (image, title) in enumerate(
            ((synthetic[k], f"synthetic\nd={distances[k]:.2f}"), (real[k], "nearest member"))
        ):
            ax = axes[row][k]
            ax.imshow(image[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("Closest synthetic/real pairs (contains real images: keep at the site)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# The whole audit and the command


def run_audit(
    nets: EmixerNets,
    data: SiteData,
    holdout: EvaluationSplit,
    latent_dim: int,
    out_dir: Path,
    seed: int = 0,
    per_label: int = 64,
    resamples: int = 200,
) -> dict[str, Any]:
    """Split, attack, check memorisation; write out_dir/audit.json and the PNG; return the dict."""
    split = split_site(data, holdout)
    metrics, generated, generated_labels = membership_attacks(
        nets, data, split, latent_dim, per_label=per_label, resamples=resamples, seed=seed
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    memo = memorisation(
        generated,
        generated_labels,
        data.images[split.members],
        split.members,
        png_path=out_dir / PNG_NAME,
    )
    result = {
        "holdout_fraction": holdout.fraction,
        "holdout_seed": holdout.seed,
        "seed": seed,
        "units": len(data.units),
        "held_out_units": len(data.units) - len(split.train.units),
        "privacy_unit": "patient" if data.per_patient else "image",
        "generated_per_label_set": per_label,
        "attacks": metrics,
        "memorisation": memo,
        "note": STAYS_AT_SITE,
    }
    write_json_atomic(out_dir / "audit.json", result)
    return result


def _fmt(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_tpr(entry: dict[str, Any]) -> str:
    """A TPR cell; a '*' marks an FPR below what the number of non-members can resolve."""
    return _fmt(entry["value"], entry["ci95"]) + ("" if entry["resolved"] else " *")


def audit_table(result: dict[str, Any]) -> Table:
    """One row per attack: AUC and TPR at each target FPR with 95% CIs."""
    table = Table(title="Membership-inference audit (0.5 AUC = chance)")
    table.add_column("attack")
    table.add_column("AUC [95% CI]", justify="right")
    for f in TARGET_FPRS:
        table.add_column(f"TPR @ {f:.1%} FPR", justify="right")
    for name, m in result["attacks"].items():
        table.add_row(
            name,
            _fmt(m["auc"], m["auc_ci95"]),
            *(format_tpr(m["tpr_at_fpr"][f"{f:g}"]) for f in TARGET_FPRS),
        )
    return table


def unresolved_note(metrics: dict[str, Any]) -> str | None:
    """The footnote for '*' cells, or None when every TPR is resolved."""
    needs = sorted(
        {
            e["nonmembers_needed"]
            for m in metrics.values()
            for e in m["tpr_at_fpr"].values()
            if not e["resolved"]
        }
    )
    if not needs:
        return None
    n = next(iter(metrics.values()))["nonmembers"]
    return (
        f"* only {n} non-members: that FPR needs at least {', '.join(map(str, needs))} "
        "non-members to be measured; the value is interpolated from the ROC curve"
    )
