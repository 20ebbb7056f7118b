"""Public pretraining data: the public phantom collection, its loader, and the NIH converter."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emixer_cli.main import main
from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.data import phantoms
from emixer_model.data.dicom import decode_dicom, write_dicom
from emixer_model.data.phantoms import (
    CANARY,
    PUBLIC_LOOK,
    PUBLIC_PREVALENCE,
    render_phantom,
    write_phantom_sites,
    write_public_collection,
)
from emixer_model.data.public import PublicDataError, decode_image, load_public
from emixer_model.data.public_convert import NIH_UNLABELED, convert_nih, nih_labels
from emixer_model.data.site import load_site
from emixer_model.text.grammar import SITE_ONLY_FINDING
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import PAD, UNK, encode_report, fits_caps
from tests.conftest import site_knowledge_in

SIZE = 64
CFG = ModelConfig(resolution=32)


def _printed(capsys) -> str:
    """What the CLI printed, with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "studies.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    return write_public_collection(tmp_path_factory.mktemp("pub") / "public", n=120, size=SIZE)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sites")
    return write_phantom_sites(out, sites=1, per_site=120, unlabeled=0, size=SIZE)[0]


def _image_bytes(folder: Path) -> list[bytes]:
    """Pixel content of every image file (DICOM UIDs are fresh on every write)."""
    out = []
    for path in sorted((folder / "images").iterdir()):
        out.append(path.read_bytes() if path.suffix == ".png" else pydicom.dcmread(path).PixelData)
    return out


def test_public_collection_is_deterministic_and_mixes_png_and_dicom(public, tmp_path):
    again = write_public_collection(tmp_path / "again", n=120, size=SIZE)
    assert (again / "studies.csv").read_text() == (public / "studies.csv").read_text()
    assert _image_bytes(again) == _image_bytes(public)
    other = write_public_collection(tmp_path / "other", n=120, seed=1, size=SIZE)
    assert (other / "studies.csv").read_text() != (public / "studies.csv").read_text()

    modes = {Image.open(p).mode for p in (public / "images").glob("*.png")}
    assert modes == {"L", "I;16"}  # 8-bit and 16-bit grey PNG
    dicoms = list((public / "images").glob("*.dcm"))
    pngs = list((public / "images").glob("*.png"))
    assert 0.25 <= len(dicoms) / 120 <= 0.6 and len(pngs) + len(dicoms) == 120
    rows = _rows(public)
    assert list(rows[0]) == ["dicom", "report", "patient", *FINDINGS]
    missing = sum(not r["report"] for r in rows) / len(rows)
    assert 0.25 <= missing <= 0.55  # a share of the studies come without a report
    assert max(map(list(r["patient"] for r in rows).count, {r["patient"] for r in rows})) > 1
    assert not any(CANARY in r["patient"] for r in rows)  # public data is not site data
    assert not any(CANARY in str(pydicom.dcmread(p).PatientID) for p in dicoms)


def test_public_reports_use_the_public_grammar_and_state_their_labels(public):
    rows = [r for r in _rows(public) if r["report"]]
    for r in rows:
        ids = encode_report(r["report"], 6, 12)
        assert UNK not in ids and fits_caps(r["report"], 6, 12), r["report"]
        stated = label_report(r["report"])
        for f in FINDINGS[1:]:
            if r[f] in ("1", "-1"):
                assert stated.get(f) == int(r[f]), (f, r["report"])
        assert site_knowledge_in(r["report"]) == [], r["report"]
    assert sum("cardiomegaly" in r["report"].lower() for r in rows) >= 3


def test_public_style_never_shows_what_only_sites_know(public, tmp_path, monkeypatch):
    """No public study labels or names the site-only finding, and the renderer never draws it
    or a site's own appearance of a shared finding for the public collection or the control
    pseudo-sites."""
    rows = _rows(public)
    assert {r[SITE_ONLY_FINDING] for r in rows} == {""}  # never labeled, not even negative
    assert SITE_ONLY_FINDING not in PUBLIC_PREVALENCE

    calls = Counter()
    for name in ("_free_air", "_loculated_effusion"):
        drawing = getattr(phantoms, name)
        monkeypatch.setattr(phantoms, name, _counted(drawing, name, calls))
    write_public_collection(tmp_path / "public", n=120, size=32)
    phantoms.write_pseudo_sites(tmp_path / "pseudo", sites=3, per_site=60, unlabeled=4, size=32)
    assert calls == Counter()
    write_phantom_sites(tmp_path / "sites", sites=3, per_site=60, unlabeled=0, size=32)
    assert calls["_free_air"] > 0 and calls["_loculated_effusion"] > 0  # the sites draw them


def _counted(function: Callable, name: str, calls: Counter) -> Callable:
    """`function`, counting its calls in calls[name]."""

    def counting(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return counting


def test_report_text_does_not_depend_on_the_hash_seed():
    code = (
        "import numpy as np; from emixer_model.text.grammar import write_report; "
        "print(write_report({'Pleural Effusion': 1, 'Lung Lesion': -1}, np.random.default_rng(4)))"
    )
    texts = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(texts) == 1


def _high_frequency(images: torch.Tensor) -> float:
    """Mean absolute difference to a 3x3 local mean: how much pixel noise an image carries."""
    return (images - F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)).abs().mean().item()


def test_public_look_and_label_mix_differ_from_the_sites(public, site, tmp_path):
    cfg = ModelConfig(resolution=SIZE)
    pub = load_public(public, cfg)
    real = load_site(site, tmp_path / "state", cfg)
    assert pub.images.mean() - real.images.mean() > 0.15  # brighter mid-tones (gamma < 1)
    assert _high_frequency(pub.images) > 1.3 * _high_frequency(real.images)  # noisier
    dark = [(x < -0.9).float().mean().item() for x in (pub.images, real.images)]
    assert dark[0] < 0.7 * dark[1]  # cropped closer: less black background
    prevalence = pub.labels.mean(0) - real.labels.mean(0)
    assert prevalence.abs().sum() > 0.4  # another label mix
    shared = [FINDINGS.index(f) for f in FINDINGS[1:] if f != SITE_ONLY_FINDING]
    assert (pub.labels.sum(0)[shared] >= 3).all()  # yet every shared finding is there to learn
    assert pub.labels[:, FINDINGS.index(SITE_ONLY_FINDING)].sum() == 0  # never the site-only one


@pytest.mark.parametrize("finding", [f for f in FINDINGS[1:] if f != SITE_ONLY_FINDING])
def test_findings_are_drawn_in_the_public_look(finding):
    positive, uncertain = [], []
    for i in range(10):  # paired: the same seed with and without the finding
        normal = render_phantom({"No Finding": 1}, np.random.default_rng(i), SIZE, PUBLIC_LOOK)
        sick = render_phantom({finding: 1}, np.random.default_rng(i), SIZE, PUBLIC_LOOK)
        faint = render_phantom({finding: -1}, np.random.default_rng(i), SIZE, PUBLIC_LOOK)
        positive.append(np.abs(sick - normal).max())
        uncertain.append(np.abs(faint - normal).max())
    assert min(positive) > 0.1  # far above the public look's pixel noise step (~0.05)
    assert np.mean(uncertain) < np.mean(positive)


def test_load_public_shapes_range_labels_and_reports(public):
    data = load_public(public, CFG)
    rows = _rows(public)
    n, r = len(rows), CFG.resolution
    assert data.images.shape == (n, 1, r, r) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1 and data.images.min() == -1
    assert data.labels.shape == (n, len(FINDINGS))
    assert data.tokens.shape == (n, CFG.max_sentences, CFG.max_words)
    assert data.tokens.dtype == torch.int64 and data.has_report.dtype == torch.bool
    assert data.has_report.tolist() == [bool(row["report"]) for row in rows]
    assert (data.tokens[~data.has_report] == PAD).all()
    assert (data.tokens[data.has_report, 0, 0] != PAD).all()
    expected = [[1.0 if row[f] in ("1", "-1") else 0.0 for f in FINDINGS] for row in rows]
    assert data.labels.tolist() == expected  # uncertain counts as positive, blank as negative
    assert data.name == "public phantoms (seed 0, 120 studies, 64 px)" and not data.skipped
    assert data.source() == {
        "name": data.name,
        "content_hash": data.content_hash,
        "studies": n,
        "with_report": int(data.has_report.sum()),
    }


def test_png_and_dicom_go_through_the_same_normalisation(tmp_path):
    image = render_phantom({"Cardiomegaly": 1}, np.random.default_rng(0), 48)[:, 4:40]
    Image.fromarray(np.rint(image * 65535).astype(np.uint16)).save(tmp_path / "a.png")
    write_dicom(tmp_path / "a.dcm", image, bits_stored=16)
    write_dicom(tmp_path / "b.dcm", image, bits_stored=16, photometric="MONOCHROME1")
    png = decode_image(tmp_path / "a.png", 32)
    assert png.source_shape == (48, 36) and png.bits_stored == 16
    for name in ("a.dcm", "b.dcm"):
        assert np.abs(png.pixels - decode_dicom(tmp_path / name, 32).pixels).max() < 1e-3
    grey_rgb = np.repeat(np.rint(image * 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "rgb.png")
    eight = decode_image(tmp_path / "rgb.png", 32)  # grey stored as RGB is grey
    assert np.abs(eight.pixels - png.pixels).max() < 0.02


def _copy(public: Path, dest: Path) -> Path:
    shutil.copytree(public, dest)
    return dest


def test_content_hash_tracks_every_byte_and_only_content(public, tmp_path):
    first = load_public(public, CFG).content_hash
    moved = _copy(public, tmp_path / "elsewhere")
    assert load_public(moved, CFG).content_hash == first  # the location is not content
    dicom = sorted((moved / "images").glob("*.dcm"))[0]
    data = bytearray(dicom.read_bytes())
    data[-1] ^= 1  # one bit of the last pixel
    dicom.write_bytes(bytes(data))
    changed = load_public(moved, CFG)
    assert not changed.skipped and changed.content_hash != first
    (moved / "source.json").write_text('{"name": "renamed"}')
    assert load_public(moved, CFG).content_hash == changed.content_hash


def test_source_name_falls_back_to_SOURCE_then_the_folder(public, tmp_path):
    folder = _copy(public, tmp_path / "my_collection")
    (folder / "source.json").unlink()
    assert load_public(folder, CFG).name == "my_collection"
    (folder / "SOURCE").write_text("\nNIH ChestX-ray14 subset\nmore text\n")
    assert load_public(folder, CFG).name == "NIH ChestX-ray14 subset"
    (folder / "source.json").write_text("[1, 2]")
    with pytest.raises(PublicDataError, match="not a JSON object"):
        load_public(folder, CFG)


def test_odd_files_are_skipped_with_reasons_and_nothing_usable_is_an_error(public, tmp_path):
    folder = _copy(public, tmp_path / "odd")
    (folder / "images" / "notes.txt").write_text("not an image")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)).save(
        folder / "images" / "colour.png"
    )
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "images" / "flat.png")
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    extra = ["notes.txt", "colour.png", "flat.png", "broken.png", "gone.png", "../../x.png"]
    with open(folder / "studies.csv", "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for name in extra:
            writer.writerow([f"images/{name}", "", "PUBLIC-9", "", "1"] + [""] * 6)
    data = load_public(folder, CFG)
    assert len(data.images) == len(_rows(public))
    reasons = {Path(path).name: reason for path, reason, _ in data.skipped}
    assert reasons == {
        "notes.txt": "not-dicom",
        "colour.png": "colour",
        "flat.png": "empty-image",
        "broken.png": "unreadable",
        "gone.png": "missing-file",
        "x.png": "outside-site-folder",
    }
    with open(folder / "studies.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dicom", "report", *FINDINGS])
        writer.writerow(["images/notes.txt", "", "1"] + [""] * 7)
    with pytest.raises(PublicDataError, match="no usable study .*1 not-dicom"):
        load_public(folder, CFG)
    with pytest.raises(PublicDataError, match="is not a public collection"):
        load_public(tmp_path, CFG)


def test_cli_writes_a_public_collection_and_refuses_other_folders(tmp_path, capsys):
    out = tmp_path / "public"
    args = ["phantoms", "--public", "--out", str(out), "--per-site", "12", "--size", "32"]
    assert main(args) == 0
    assert len(_rows(out)) == 12 and (out / "source.json").is_file()
    assert main(args) == 0  # rewriting its own collection is fine
    (tmp_path / "data").mkdir()
    assert main([*args[:3], str(tmp_path / "data"), *args[4:]]) == 2
    assert "not a public phantom collection" in _printed(capsys)


# --- NIH ChestX-ray14 converter ----------------------------------------------------------------

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)
NIH_ROWS = [  # (image, labels, patient); the real file's extra columns are filled in below
    ("00000001_000.png", "Cardiomegaly|Effusion", "1"),
    ("00000001_001.png", "Nodule|Atelectasis", "1"),
    ("00000002_000.png", "No Finding", "2"),
    ("00000003_000.png", "", "3"),  # empty labels
    ("99999999_000.png", "Mass", "4"),  # no such image
    ("00000004_000.png", "Edema|Pneumothorax|Consolidation|Hernia|Mass", "5"),
    ("00000005_000.png", "Pnemonia", "6"),  # misspelt: not an NIH label
]


@pytest.fixture
def nih(tmp_path) -> tuple[Path, Path]:
    """A fake Data_Entry_2017.csv and 5 tiny PNGs split over two images_00N folders."""
    lines = [
        f"{name},{labels},0,{patient},58,M,PA,64,64,0.143,0.143,\n"
        for name, labels, patient in NIH_ROWS
    ]
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(NIH_HEADER + "".join(lines))
    rng = np.random.default_rng(0)
    pngs = [name for name, _, _ in NIH_ROWS if not name.startswith("9")]
    for k, name in enumerate(pngs):
        folder = tmp_path / "nih" / f"images_00{1 + k // 3}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / name)
    return csv_path, tmp_path / "nih"


def test_nih_labels_map_to_our_findings():
    assert nih_labels("Cardiomegaly|Effusion") == {
        "No Finding": 0,
        "Cardiomegaly": 1,
        "Pleural Effusion": 1,
        "Consolidation": 0,
        "Pneumothorax": 0,
        "Lung Lesion": 0,
        "Edema": 0,
    }  # Support Devices and Pneumoperitoneum are no NIH labels: left out (blank), never negative
    assert nih_labels("Nodule")["Lung Lesion"] == nih_labels("Mass")["Lung Lesion"] == 1
    assert set(nih_labels("Atelectasis|Hernia").values()) == {0}  # unmapped findings ignored
    assert nih_labels("No Finding")["No Finding"] == 1
    for bad, message in [
        ("", "empty"),
        ("Pnemonia", "unknown NIH label"),
        ("No Finding|Mass", "together"),
    ]:
        with pytest.raises(ValueError, match=message):
            nih_labels(bad)


def test_convert_nih_writes_a_loadable_collection_and_skips_bad_rows(nih, tmp_path):
    csv_path, images = nih
    result = convert_nih(csv_path, images, tmp_path / "out")
    assert result.written == 4 and result.linked == 4
    assert [(line, reason) for line, reason, _ in result.skipped] == [
        (5, "bad-labels"),
        (6, "missing-image"),
        (8, "bad-labels"),
    ]
    assert "99999999_000.png not found" in result.skipped[1][2]
    rows = _rows(result.out)
    assert [r["dicom"] for r in rows] == [
        "images/00000001_000.png",
        "images/00000001_001.png",
        "images/00000002_000.png",
        "images/00000004_000.png",
    ]
    assert [r["patient"] for r in rows] == ["NIH-1", "NIH-1", "NIH-2", "NIH-5"]
    assert all(r["report"] == "" for r in rows)
    assert all(r[f] == "" for r in rows for f in NIH_UNLABELED)
    assert set(NIH_UNLABELED) == {"Support Devices", "Pneumoperitoneum"}
    mapped = [i for i, f in enumerate(FINDINGS) if f not in NIH_UNLABELED]
    table = [[r[FINDINGS[i]] for i in mapped] for r in rows]
    assert table == [
        ["0", "1", "1", "0", "0", "0", "0"],
        ["0", "0", "0", "0", "0", "1", "0"],
        ["1", "0", "0", "0", "0", "0", "0"],
        ["0", "0", "0", "1", "1", "1", "1"],
    ]
    data = load_public(result.out, CFG)
    assert data.name == "NIH ChestX-ray14" and not data.has_report.any() and not data.skipped
    assert data.labels[:, mapped].tolist() == [[float(c) for c in row] for row in table]
    assert data.images.shape == (4, 1, CFG.resolution, CFG.resolution)
    assert json.loads((result.out / "source.json").read_text())["label_mapping"]["Mass"] == (
        "Lung Lesion"
    )


def test_convert_nih_limit_and_clear_errors(nih, tmp_path):
    csv_path, images = nih
    assert convert_nih(csv_path, images, tmp_path / "two", limit=2).written == 2
    with pytest.raises(PublicDataError, match="not empty"):
        convert_nih(csv_path, images, tmp_path / "two")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("Image,Labels\na.png,Mass\n")
    with pytest.raises(PublicDataError, match="lacks the column.*Image Index"):
        convert_nih(wrong, images, tmp_path / "x")
    bad_only = tmp_path / "bad.csv"
    bad_only.write_text(NIH_HEADER + "00000003_000.png,,0,3,58,M,PA,64,64,0.1,0.1,\n")
    with pytest.raises(PublicDataError, match="no usable row .*line 2: empty Finding Labels"):
        convert_nih(bad_only, images, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(PublicDataError, match="does not exist"):
        convert_nih(tmp_path / "none.csv", images, tmp_path / "z")


def test_cli_convert_nih(nih, tmp_path, capsys):
    csv_path, images = nih
    args = ["public", "convert-nih", "--csv", str(csv_path), "--images", str(images)]
    assert main([*args, "--out", str(tmp_path / "out"), "--limit", "4"]) == 0
    printed = _printed(capsys)
    assert "wrote 4 studies" in printed and "line 5: bad-labels" in printed
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in _printed(capsys)
