"""`emixer audit`: metric arithmetic, the member/non-member split, the refusal, a full run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emixer_model.config import FINDINGS
from emixer_model.data.site import SiteData, load_site
from emixer_model.data.splits import EvaluationSplit, create_or_load_split
from emixer_model.evaluation.image_metrics import auroc
from emixer_model.membership_audit import (
    attack_metrics,
    memorisation,
    split_site,
    tpr_at_fpr,
)
from emixer_model.networks import build_networks, get_weights
from emixer_model.text.vocabulary import VOCAB_SIZE
from server.checkpoint import Checkpoint, save_checkpoint
from tests.conftest import tiny_config


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The attack's AUC: the evaluation's one AUROC with members as the positive class."""
    return auroc(
        np.r_[members, nonmembers], np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    )


def test_perfect_separation() -> None:
    members = np.linspace(10, 11, 150)
    nonmembers = np.linspace(0, 1, 200)
    assert roc_auc(members, nonmembers) == 1.0
    assert tpr_at_fpr(members, nonmembers, 0.01) == 1.0
    assert roc_auc(nonmembers, members) == 0.0


def test_identical_scores_are_chance() -> None:
    same = np.zeros(100)
    assert roc_auc(same, same) == pytest.approx(0.5)
    assert tpr_at_fpr(same, same, 0.01) == pytest.approx(0.01)
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(2, 2000))
    assert roc_auc(draws[0], draws[1]) == pytest.approx(0.5, abs=0.03)


def test_auc_counts_ties_as_half() -> None:
    # pairs (m, n): 1>0 win, 1=1 tie, 2>0, 2>1  -> (3 + 0.5) / 4
    assert roc_auc(np.array([1.0, 2.0]), np.array([0.0, 1.0])) == pytest.approx(0.875)


def test_tpr_interpolates_between_roc_points() -> None:
    # 4 non-members: one false positive costs FPR 0.25. The top member is above every
    # non-member (TPR 0.5 at FPR 0); the next one only after the top non-member (TPR 1 at 0.25).
    members = np.array([10.0, 4.5])
    nonmembers = np.array([5.0, 3.0, 2.0, 1.0])
    assert tpr_at_fpr(members, nonmembers, 0.0) == pytest.approx(0.5)
    assert tpr_at_fpr(members, nonmembers, 0.125) == pytest.approx(0.75)


def test_metrics_ci_contains_estimate_and_flags_unresolved_fpr() -> None:
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.8, 1, 150), rng.normal(0, 1, 150)
    m = attack_metrics(members, nonmembers, resamples=200, seed=3)
    lo, hi = m["auc_ci95"]
    assert lo <= m["auc"] <= hi and lo > 0.5
    for entry in m["tpr_at_fpr"].values():
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert m["tpr_at_fpr"]["0.01"]["resolved"]  # 150 non-members resolve 1% ...
    assert not m["tpr_at_fpr"]["0.001"]["resolved"]  # ... but not 0.1%
    assert m["tpr_at_fpr"]["0.001"]["nonmembers_needed"] == 1000
    assert attack_metrics(members, nonmembers, resamples=50, seed=3) == attack_metrics(
        members, nonmembers, resamples=50, seed=3
    )


def test_patients_with_many_studies_widen_the_interval() -> None:
    """Studies of one patient are resampled together: 4 patients x 10 identical studies are 4
    observations, not 40, so the interval is wider than if each study were its own unit."""
    rng = np.random.default_rng(2)
    members = np.repeat(rng.normal(0.5, 1, 4), 10)
    nonmembers = rng.normal(0, 1, 40)
    per_study = attack_metrics(members, nonmembers, resamples=300, seed=0)
    per_patient = attack_metrics(
        members, nonmembers, resamples=300, seed=0, member_units=np.repeat(np.arange(4), 10)
    )
    assert per_patient["auc"] == per_study["auc"]
    width = {k: np.diff(m["auc_ci95"])[0] for k, m in (("s", per_study), ("p", per_patient))}
    assert width["p"] > 1.5 * width["s"]


def test_split_keeps_patients_whole_and_matches_training() -> None:
    r = 8
    n = 6
    data = SiteData(
        images=torch.zeros(n, 1, r, r),
        labels=torch.zeros(n, len(FINDINGS)),
        tokens=torch.zeros(n, 2, 3, dtype=torch.int64),
        unlabeled=torch.zeros(2, 1, r, r),
        units=[([0, 1], []), ([2], [0]), ([3, 4, 5], []), ([], [1])],
        per_patient=True,
        skipped=[],
        files=[f"images/{i}.dcm" for i in range(n)],
        unlabeled_files=["unlabeled/0.dcm", "unlabeled/1.dcm"],
    )
    recorded = EvaluationSplit.choose(data, 0.5, seed=0)
    split = split_site(data, recorded)
    held = set(recorded.sides(data)[1])
    assert len(held) == 2
    expected_nonmembers = sorted(i for u in held for i in data.units[u][0])
    assert sorted(split.nonmembers.tolist()) == expected_nonmembers
    assert sorted(split.members.tolist() + expected_nonmembers) == list(range(n))
    # training sees exactly the kept units: the same data site training would use
    assert split.train.units == data.without_units(held).units
    trained_rows = sorted(i for rows, _ in split.train.units for i in rows)
    assert trained_rows == sorted(split.members.tolist())


def test_memorisation_flags_a_copied_member(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    members = -torch.rand(20, 1, 8, 8, generator=gen)  # dark images in [-1, 0]
    bright = 1 - 0.1 * torch.rand(30, 1, 8, 8, generator=gen)  # far from every member
    synthetic = torch.cat([bright, members[3:4]])  # ... and one copy of member 3
    labels = torch.zeros(31, len(FINDINGS))
    labels[-1, 1] = 1
    png = tmp_path / "pairs.png"
    memo = memorisation(synthetic, labels, members, np.arange(100, 120), png_path=png)
    assert memo["fraction_closer_than_real_p1"] == pytest.approx(1 / 31)
    assert memo["closest_pairs"][0] == {
        "synthetic_index": 30,
        "synthetic_labels": [FINDINGS[1]],
        "member_row": 103,
        "distance": 0.0,
    }
    assert memo["real_to_real_p1"] > 0  # an image is not its own nearest neighbour
    assert png.is_file()


def _checkpoint(tmp_path, holdout: float):
    cfg = tiny_config(train={"holdout_fraction": holdout, "device": "cpu"})
    torch.manual_seed(0)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    ckpt = Checkpoint(
        server_round=1, arrays=get_weights(nets), ledger={"sites": {}}, config=cfg.to_dict()
    )
    return save_checkpoint(tmp_path / "ckpt", ckpt)


def test_refuses_model_trained_without_holdout(tmp_path, tiny_sites, capsys) -> None:
    from emixer_cli.main import main

    path = _checkpoint(tmp_path, holdout=0.0)
    out = tmp_path / "audit"
    rc = main(["audit", "--model", str(path), "--site", str(tiny_sites[0]), "--out", str(out)])
    assert rc == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert "records no evaluation split" in printed
    assert "train.holdout_fraction > 0" in printed
    assert not out.exists()


def test_end_to_end_audit_writes_json_and_png(tmp_path, tiny_sites, capsys) -> None:
    from emixer_cli.main import main

    path = _checkpoint(tmp_path, holdout=0.5)
    state = tmp_path / "state"  # site training records its evaluation split before round 1
    cfg = tiny_config()
    create_or_load_split(load_site(tiny_sites[0], state, cfg.model), state, 0.5)
    out = tmp_path / "audit"
    argv = ["audit", "--model", str(path), "--site", str(tiny_sites[0]), "--out", str(out)]
    argv += ["--state-dir", str(tmp_path / "state"), "--per-label", "8"]
    assert main(argv) == 0
    result = json.loads((out / "audit.json").read_text())
    assert set(result["attacks"]) == {"discriminator", "report-loss", "nearest-neighbour"}
    for metrics in result["attacks"].values():
        assert 0.0 <= metrics["auc"] <= 1.0
        assert metrics["members"] > 0 and metrics["nonmembers"] > 0
        assert set(metrics["tpr_at_fpr"]) == {"0.01", "0.001"}
    memo = result["memorisation"]
    assert 0.0 <= memo["fraction_closer_than_real_p1"] <= 1.0
    assert len(memo["closest_pairs"]) == 8
    png = out / "closest_pairs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = " ".join(capsys.readouterr().out.split())
    assert "keep them at the site" in printed
