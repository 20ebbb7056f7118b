"""Phantom hospitals: deterministic, findings visible, DICOM variety, canary tags, non-IID sites."""

import csv
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from emixer_model.config import FINDINGS
from emixer_model.data.dicom import decode_dicom
from emixer_model.data.phantoms import (
    BASE_PREVALENCE,
    CANARY,
    MIN_POSITIVES,
    SITE_APPEARANCE_FINDING,
    SITE_KNOWLEDGE,
    render_phantom,
    site_knowledge,
    write_phantom_sites,
    write_pseudo_sites,
)
from emixer_model.text.grammar import SITE_ONLY_FINDING, SITE_PHRASING, uses_site_phrasing
from emixer_model.text.labeler import label_report
from tests.conftest import site_knowledge_in

SIZE = 64
AXIS = np.linspace(-1, 1, SIZE)


def _side(img: np.ndarray, sign: int, x0: float, x1: float, y0: float, y1: float) -> float:
    """Mean of a box on one side of the chest, in the renderer's [-1, 1] coordinates."""
    rows = (AXIS >= y0) & (AXIS <= y1)
    cols = (sign * AXIS >= x0) & (sign * AXIS <= x1)
    return float(img[np.ix_(rows, cols)].mean())


# finding -> effect of the finding's pixel change (sick - normal): positive when visible
EFFECTS = {
    "Cardiomegaly": lambda d: _side(d, 1, 0.3, 0.5, 0.1, 0.35) + _side(d, -1, 0.3, 0.5, 0.1, 0.35),
    "Pleural Effusion": lambda d: max(_side(d, s, 0.3, 0.65, 0.05, 0.35) for s in (-1, 1)),
    "Consolidation": lambda d: max(_side(d, s, 0.25, 0.6, -0.6, 0.35) for s in (-1, 1)),
    "Pneumothorax": lambda d: -min(_side(d, s, 0.3, 0.75, -0.75, 0.0) for s in (-1, 1)),
    "Lung Lesion": lambda d: float(d.max()),
    "Edema": lambda d: _side(d, 1, 0.1, 0.4, -0.2, 0.2) + _side(d, -1, 0.1, 0.4, -0.2, 0.2),
    "Support Devices": lambda d: float(d.max()),
    # free air: a dark crescent under a hemidiaphragm
    "Pneumoperitoneum": lambda d: -min(_side(d, s, 0.25, 0.55, 0.3, 0.55) for s in (-1, 1)),
}


def test_render_is_deterministic_and_in_range():
    a = render_phantom({"Edema": 1}, np.random.default_rng(5), SIZE)
    b = render_phantom({"Edema": 1}, np.random.default_rng(5), SIZE)
    c = render_phantom({"Edema": 1}, np.random.default_rng(6), SIZE)
    assert a.shape == (SIZE, SIZE) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert 0.0 <= a.min() and a.max() <= 1.0
    with pytest.raises(ValueError, match="at least 16"):
        render_phantom({}, np.random.default_rng(0), 8)


@pytest.mark.parametrize("finding", list(EFFECTS))
def test_each_finding_is_visible_where_expected(finding):
    effects = []
    for i in range(20):  # the same seed with and without the finding: a paired comparison
        normal = render_phantom({"No Finding": 1}, np.random.default_rng(100 + i), SIZE)
        sick = render_phantom({finding: 1}, np.random.default_rng(100 + i), SIZE)
        faint = render_phantom({finding: -1}, np.random.default_rng(100 + i), SIZE)
        effects.append((EFFECTS[finding](sick - normal), EFFECTS[finding](faint - normal)))
    positive, uncertain = np.array(effects).T
    assert positive.mean() > 0.03 and (positive > 0).mean() >= 0.9
    assert 0 < uncertain.mean() < positive.mean()  # uncertain findings are drawn fainter


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_sites(out, sites=3, per_site=60, unlabeled=4, seed=3, size=SIZE)


def _rows(site: Path) -> list[dict[str, str]]:
    with open(site / "studies.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_site_layout_labels_and_reports(sites):
    assert [s.name for s in sites] == ["site_1", "site_2", "site_3"]
    assert not [p for p in sites[0].parent.iterdir() if p.name.startswith(".")]
    mixes = []
    for number, site in enumerate(sites, start=1):
        rows = _rows(site)
        assert list(rows[0]) == ["dicom", "report", "patient", *FINDINGS]
        assert len(rows) == 60 and len(list((site / "unlabeled").glob("*.dcm"))) == 4
        assert all((site / r["dicom"]).is_file() for r in rows)
        counts = Counter(f for r in rows for f in FINDINGS if r[f] == "1")
        sees = [*BASE_PREVALENCE]
        sees += [SITE_ONLY_FINDING] if site_knowledge(number).site_only_prevalence else []
        assert all(counts[f] >= MIN_POSITIVES for f in sees)
        cells = [r[f] for r in rows for f in FINDINGS]
        assert {"1", "0", "-1", ""} <= set(cells)
        for r in rows:  # the report states exactly the positive and uncertain labels
            stated = label_report(r["report"])
            for f in FINDINGS[1:]:
                if r[f] in ("1", "-1"):
                    assert stated.get(f) == int(r[f]), (f, r["report"])
            assert CANARY not in r["report"]
        per_patient = Counter(r["patient"] for r in rows)
        assert all(CANARY in p for p in per_patient) and set(per_patient.values()) <= {1, 2, 3}
        assert max(per_patient.values()) > 1
        mixes.append(np.array([counts[f] for f in BASE_PREVALENCE]))
    for a, b in itertools.combinations(mixes, 2):
        assert np.abs(a - b).sum() >= 10  # non-IID label mixes


def test_dicom_variety_and_canary_tags(sites):
    files = sorted(sites[0].glob("*/*.dcm"))
    seen = Counter()
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID", "InstitutionName", "StudyDescription"):
            assert CANARY in str(ds.data_element(keyword).value)
        seen.update([ds.PhotometricInterpretation, ds.Modality, f"bits{ds.BitsStored}"])
        seen.update([f"shape{ds.Rows}x{ds.Columns}"])
    assert seen["MONOCHROME1"] and seen["MONOCHROME2"] and seen["DX"] and seen["CR"]
    assert sum(k.startswith("bits") for k in seen) == 3
    assert sum(k.startswith("shape") for k in seen) >= 2
    decoded = decode_dicom(files[0], SIZE)
    assert decoded.pixels.shape == (SIZE, SIZE)


def test_sites_are_reproducible_and_replaced_in_place(tmp_path):
    first = write_phantom_sites(tmp_path, sites=1, per_site=4, unlabeled=1, seed=3, size=SIZE)[0]
    pixels = [pydicom.dcmread(p).PixelData for p in sorted(first.glob("*/*.dcm"))]
    text = (first / "studies.csv").read_text()
    again = write_phantom_sites(tmp_path, sites=1, per_site=4, unlabeled=1, seed=3, size=SIZE)[0]
    assert again == first and (again / "studies.csv").read_text() == text
    assert [pydicom.dcmread(p).PixelData for p in sorted(again.glob("*/*.dcm"))] == pixels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_1"]
    other = write_phantom_sites(tmp_path / "b", sites=1, per_site=4, unlabeled=1, seed=4, size=SIZE)
    assert (other[0] / "studies.csv").read_text() != text


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="sites >= 1"):
        write_phantom_sites(tmp_path, sites=0)
    with pytest.raises(ValueError, match="at least 16"):
        write_phantom_sites(tmp_path, size=4)


def test_only_the_sites_that_see_the_site_only_finding_have_or_name_it(sites):
    column = {}
    for number, site in enumerate(sites, start=1):
        rows = _rows(site)
        column[number] = Counter(r[SITE_ONLY_FINDING] for r in rows)
        named = [r for r in rows if SITE_ONLY_FINDING in label_report(r["report"])]
        if site_knowledge(number).site_only_prevalence == 0:
            assert set(column[number]) == {""} and named == []  # never seen, never named
        else:
            assert column[number]["1"] + column[number]["-1"] >= 0.1 * len(rows)
            assert column[number]["0"] > 0  # some reports deny it
    assert {n for n, k in column.items() if k["1"]} == {1, 2}


def test_site_phrasing_appears_only_at_its_site(sites):
    for number, site in enumerate(sites, start=1):
        rows = _rows(site)
        for finding in SITE_PHRASING:
            positive = [r["report"] for r in rows if r[finding] == "1"]
            share = np.mean([uses_site_phrasing(report, finding) for report in positive])
            if site_knowledge(number).own_phrasing:
                assert len(positive) >= MIN_POSITIVES and share >= 0.8, (number, finding)
            else:
                assert not any(uses_site_phrasing(r["report"], finding) for r in rows), number
    assert [n for n in SITE_KNOWLEDGE if SITE_KNOWLEDGE[n].own_phrasing] == [2]


# Where the two ways of drawing an effusion put their fluid: the public basal meniscus fills the
# costophrenic region, site 3's loculated lens the lateral mid zone.
BASE = (0.3, 0.65, 0.15, 0.35)
LATERAL_MID_ZONE = (0.5, 0.75, -0.45, -0.15)


def test_site_appearance_differs_from_the_public_rendering():
    labels = {SITE_APPEARANCE_FINDING: 1}
    for i in range(20):  # the same seed drawn both ways: a paired comparison
        public = render_phantom(labels, np.random.default_rng(200 + i), SIZE)
        site = render_phantom(labels, np.random.default_rng(200 + i), SIZE, loculated_effusion=True)
        normal = render_phantom({"No Finding": 1}, np.random.default_rng(200 + i), SIZE)
        lateral = max(_side(site - public, s, *LATERAL_MID_ZONE) for s in (-1, 1))
        basal = max(_side(public - site, s, *BASE) for s in (-1, 1))
        assert lateral > 0.05 and basal > 0.03, i
        assert max(_side(site - normal, s, *LATERAL_MID_ZONE) for s in (-1, 1)) > 0.05  # visible
    assert [n for n in SITE_KNOWLEDGE if SITE_KNOWLEDGE[n].loculated_effusion] == [3]


@pytest.fixture(scope="module")
def pseudo_sites(tmp_path_factory) -> list[Path]:
    """The control for the `sites` fixture: the same arguments, public style."""
    out = tmp_path_factory.mktemp("pseudo")
    return write_pseudo_sites(out, sites=3, per_site=60, unlabeled=4, seed=3, size=SIZE)


def _stated(row: dict[str, str]) -> dict[str, str]:
    """The positive and uncertain cells of a row's shared findings."""
    return {f: row[f] for f in BASE_PREVALENCE if row[f] in ("1", "-1")}


def test_pseudo_sites_have_the_sites_sizes_patients_and_label_mixes(sites, pseudo_sites):
    assert [p.name for p in pseudo_sites] == [s.name for s in sites]
    for site, pseudo in zip(sites, pseudo_sites, strict=True):
        real_rows, pseudo_rows = _rows(site), _rows(pseudo)
        assert list(pseudo_rows[0]) == list(real_rows[0])  # the same csv columns
        assert [r["dicom"] for r in pseudo_rows] == [r["dicom"] for r in real_rows]
        assert [r["patient"] for r in pseudo_rows] == [r["patient"] for r in real_rows]
        assert [_stated(r) for r in pseudo_rows] == [_stated(r) for r in real_rows]
        for real, control in zip(real_rows, pseudo_rows, strict=True):
            only_site_only = real[SITE_ONLY_FINDING] in ("1", "-1") and not _stated(real)
            assert control["No Finding"] == ("1" if only_site_only else real["No Finding"])
        unlabeled = [sorted(p.name for p in (f / "unlabeled").iterdir()) for f in (site, pseudo)]
        assert unlabeled[0] == unlabeled[1]


def test_pseudo_sites_know_nothing_the_public_collection_does_not(sites, pseudo_sites):
    for site, pseudo in zip(sites, pseudo_sites, strict=True):
        rows = _rows(pseudo)
        assert {r[SITE_ONLY_FINDING] for r in rows} == {"0"}  # known absent at every study
        for r in rows:
            assert site_knowledge_in(r["report"]) == [], r["report"]
            stated = label_report(r["report"])
            assert all(stated.get(f) == int(v) for f, v in _stated(r).items()), r["report"]
        # the site format, in the public look: brighter mid-tones (gamma < 1) than the site's
        mean = [
            np.mean([decode_dicom(path, SIZE).pixels.mean() for path in folder.glob("*/*.dcm")])
            for folder in (site, pseudo)
        ]
        assert mean[1] - mean[0] > 0.15
        assert CANARY in str(pydicom.dcmread(next(pseudo.glob("images/*.dcm"))).PatientID)
