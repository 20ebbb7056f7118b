"""Public pretraining data: the public phantom collection, its loader, and the NIH converter."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emixer_model.cli import main
from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.data.dicom import decode_dicom, write_dicom
from emixer_model.data.phantoms import (
    CANARY,
    PUBLIC_LOOK,
    render_phantom,
    write_phantom_sites,
    write_public_collection,
)
from emixer_model.data.public import PublicDataError, decode_image, load_public
from emixer_model.data.site import load_site
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import PAD, UNK, encode_report, fits_caps

SIZE = 64
CFG = ModelConfig(resolution=32)


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


def test_public_reports_are_phrased_differently_but_state_their_labels(public, site):
    rows = [r for r in _rows(public) if r["report"]]
    site_text = " ".join(r["report"] for r in _rows(site)).lower()
    public_text = " ".join(r["report"] for r in rows).lower()
    assert "impression:" in site_text and "impression:" not in public_text
    assert site_text.count("there is") > 20 and public_text.count("there is") == 0
    for r in rows:
        ids = encode_report(r["report"], 6, 12)
        assert UNK not in ids and fits_caps(r["report"], 6, 12), r["report"]
        stated = label_report(r["report"])
        for f in FINDINGS[1:]:
            if r[f] in ("1", "-1"):
                assert stated.get(f) == int(r[f]), (f, r["report"])


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
    assert _high_frequency(pub.images) > 1.5 * _high_frequency(real.images)  # noisier
    dark = [(x < -0.9).float().mean().item() for x in (pub.images, real.images)]
    assert dark[0] < 0.7 * dark[1]  # cropped closer: less black background
    prevalence = pub.labels.mean(0) - real.labels.mean(0)
    assert prevalence.abs().sum() > 0.4  # another label mix
    assert (pub.labels.sum(0)[1:] >= 3).all()  # yet every finding is there to learn


@pytest.mark.parametrize("finding", FINDINGS[1:])
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
    assert "not a public phantom collection" in capsys.readouterr().out
