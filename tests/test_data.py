"""The DICOM data layer: decoding, odd files, site folders, the decoded cache and the data check."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless
from rich.console import Console

from emixer_cli.main import main
from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.data import site as site_module
from emixer_model.data.check import check_folder
from emixer_model.data.dicom import SKIP_REASONS, Decoded, SkipFile, decode_dicom, write_dicom
from emixer_model.data.site import (
    SiteDataError,
    SiteFiles,
    Study,
    group_units,
    load_site,
    privacy_units,
)

R = 16
CFG = ModelConfig(resolution=R, max_sentences=3, max_words=6)


def _image(h: int, w: int, seed: int = 0, lo: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = lo + (1 - lo) * rng.random((h, w))
    img[0, 0], img[-1, -1] = lo, 1.0  # the full range is present
    return img


def _full_window(bits: int) -> dict[str, object]:
    top = 2**bits - 1
    return {"WindowCenter": top / 2, "WindowWidth": top + 1}


# (a) round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_round_trip_with_window_keeps_pixel_values(tmp_path: Path, bits: int) -> None:
    img = _image(12, 12)
    write_dicom(tmp_path / "a.dcm", img, bits_stored=bits, extra=_full_window(bits))
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert (
        ds.BitsStored == bits
        and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    )
    decoded = decode_dicom(tmp_path / "a.dcm", 12)
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.shape == (12, 12)
    assert decoded.bits_stored == bits and decoded.source_shape == (12, 12)
    np.testing.assert_allclose(decoded.pixels, img * 2 - 1, atol=4 / 2**bits + 1e-3)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_decodes_like_monochrome2(tmp_path: Path, bits: int) -> None:
    img = _image(30, 22, seed=bits)
    write_dicom(tmp_path / "m1.dcm", img, bits_stored=bits, photometric="MONOCHROME1")
    write_dicom(tmp_path / "m2.dcm", img, bits_stored=bits, photometric="MONOCHROME2")
    stored1 = pydicom.dcmread(tmp_path / "m1.dcm").pixel_array
    stored2 = pydicom.dcmread(tmp_path / "m2.dcm").pixel_array
    assert np.array_equal(stored1.astype(int), 2**bits - 1 - stored2.astype(int))
    a = decode_dicom(tmp_path / "m1.dcm", R)
    b = decode_dicom(tmp_path / "m2.dcm", R)
    assert a.photometric == "MONOCHROME1"
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-5)
    assert a.pixels.min() >= -1 and a.pixels.max() <= 1


def test_voi_lut_sequence_sets_the_contrast(tmp_path: Path) -> None:
    img = np.linspace(0, 1, 256).reshape(16, 16)
    write_dicom(tmp_path / "a.dcm", img, bits_stored=8)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.LUTData = [round(4095 * (i / 255) ** 2) for i in range(256)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    px = decode_dicom(tmp_path / "lut.dcm", 16).pixels
    np.testing.assert_allclose(px, img**2 * 2 - 1, atol=2e-3)


@pytest.mark.parametrize(("h", "w"), [(20, 40), (40, 20)])
def test_non_square_images_are_padded_black_and_centred(tmp_path: Path, h: int, w: int) -> None:
    img = _image(h, w, lo=0.6)
    write_dicom(tmp_path / "a.dcm", img, bits_stored=12, extra=_full_window(12))
    px = decode_dicom(tmp_path / "a.dcm", 20).pixels
    content = px[5:15, :] if h < w else px[:, 5:15]
    pad = np.concatenate([px[:5], px[15:]]) if h < w else np.concatenate([px[:, :5], px[:, 15:]])
    assert np.all(pad == -1.0)
    assert content.min() > 0.0  # 0.6 .. 1.0 maps to 0.2 .. 1.0


def test_write_dicom_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D"):
        write_dicom(tmp_path / "a.dcm", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_dicom(tmp_path / "a.dcm", np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="not DICOM keywords"):
        write_dicom(tmp_path / "a.dcm", np.zeros((4, 4)), extra={"NotAKeyword": 1})
    assert not list(tmp_path.iterdir())


# (b) odd files -----------------------------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, str | None]:
    """Write one file per oddity; returns file name -> expected skip reason (None: accepted)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = _image(24, 24)
    write_dicom(folder / "good.dcm", img, bits_stored=16)
    write_dicom(folder / "mono1.dcm", img, photometric="MONOCHROME1", modality="CR", sop_class="cr")
    write_dicom(folder / "flat.dcm", np.full((8, 8), 0.3))
    data = (folder / "good.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) - 300])
    (folder / "notes.txt").write_text("not an image\n")

    ds = pydicom.dcmread(folder / "good.dcm")
    rgb = np.zeros((24, 24, 3), dtype=np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(folder / "colour.dcm")

    ds = pydicom.dcmread(folder / "good.dcm")
    del ds.PixelData
    (folder / "sub").mkdir()
    ds.save_as(folder / "sub" / "report.dcm")

    ds = pydicom.dcmread(folder / "good.dcm")
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(folder / "cine.dcm")
    expected: dict[str, str | None] = {
        "good.dcm": None,
        "mono1.dcm": None,
        "flat.dcm": "empty-image",
        "truncated.dcm": "unreadable",
        "notes.txt": "not-dicom",
        "colour.dcm": "colour",
        "sub/report.dcm": "no-pixel-data",
        "cine.dcm": "multi-frame",
    }
    if not get_decoder(JPEGLSLossless).is_available:
        ds = pydicom.dcmread(folder / "good.dcm")
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / "jpegls.dcm")
        expected["jpegls.dcm"] = "compressed-no-decoder"
    return expected


def test_each_odd_file_is_decoded_or_skipped_with_its_reason(tmp_path: Path) -> None:
    expected = _bad_files(tmp_path / "pile")
    for name, reason in expected.items():
        if reason is None:
            assert decode_dicom(tmp_path / "pile" / name, R).pixels.shape == (R, R)
        else:
            with pytest.raises(SkipFile) as info:
                decode_dicom(tmp_path / "pile" / name, R)
            assert info.value.reason == reason, name
            assert reason in SKIP_REASONS and info.value.detail


def test_check_folder_reports_a_pile_of_odd_files(tmp_path: Path) -> None:
    expected = _bad_files(tmp_path / "pile")
    report = check_folder(tmp_path / "pile", resolution=R)
    skipped = [r for r in expected.values() if r is not None]
    assert not report.site and report.usable
    assert report.accepted == 2
    assert report.skipped_counts == {r: 1 for r in skipped}
    assert report.skipped_examples["no-pixel-data"] == ["sub/report.dcm"]
    assert report.skipped_examples["unreadable"][0].startswith("truncated.dcm (")  # library detail
    assert report.photometric == {"MONOCHROME1": 1, "MONOCHROME2": 1}
    json.dumps(report.as_dict())
    out = io.StringIO()
    report.render(Console(file=out, width=200))
    assert "multi-frame" in out.getvalue() and "usable for training" in out.getvalue()


def test_check_folder_with_nothing_usable_is_not_usable(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    report = check_folder(tmp_path, resolution=R)
    assert not report.usable and report.skipped_counts == {"not-dicom": 1}


# (c) site folders --------------------------------------------------------------------------

HEADER = ["dicom", "report", "patient", *FINDINGS, "Scanner"]


def _row(dicom: str, patient: str, **labels: str) -> list[str]:
    values = {f: "" for f in FINDINGS} | {k.replace("_", " "): v for k, v in labels.items()}
    return [dicom, "Heart size is normal. No effusion.", patient, *values.values(), "X"]


def _write_csv(site: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = [",".join(header)] + [",".join(r) for r in rows]
    (site / "studies.csv").write_text("\n".join(lines) + "\n")


def _make_site(root: Path) -> Path:
    site = root / "site"
    for i in range(4):
        write_dicom(
            site / "images" / f"s{i}.dcm", _image(20 + 4 * i, 24, seed=i), patient_id=f"P{i}"
        )
    write_dicom(site / "unlabeled" / "u0.dcm", _image(30, 30, seed=9), patient_id="P0")
    write_dicom(site / "unlabeled" / "deep" / "u1.bin", _image(18, 30, seed=8), bits_stored=12)
    (site / "unlabeled" / "readme.txt").write_text("unlabeled scans\n")
    write_dicom(root / "outside.dcm", _image(20, 20))
    (site / "unlabeled" / "link.dcm").symlink_to(root / "outside.dcm")
    rows = [
        _row("images/s0.dcm", "p1", Cardiomegaly="1", Edema="0"),
        _row("../outside.dcm", "p9", Cardiomegaly="1"),
        _row("images/s1.dcm", "p2", Pleural_Effusion="-1.0"),
        _row("./images/s2.dcm", "p1", No_Finding="1.0"),
        _row(str(root / "outside.dcm"), "p9"),
        _row("images/missing.dcm", "p3"),
        _row("images/s3.dcm", "p4", Pneumothorax="-1", Support_Devices="1"),
    ]
    _write_csv(site, HEADER, rows)
    # u1 carries no PatientID of its own; unlabeled.csv names its patient
    (site / "unlabeled.csv").write_text("dicom,patient\nunlabeled/deep/u1.bin,p4\n")
    return site


def test_load_site_shapes_labels_units_and_skips(tmp_path: Path) -> None:
    site = _make_site(tmp_path)
    calls: list[tuple[int, int]] = []
    data = load_site(site, tmp_path / "state", CFG, progress=lambda d, t: calls.append((d, t)))
    assert data.images.shape == (4, 1, R, R) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.unlabeled.shape == (2, 1, R, R)
    assert data.tokens.shape == (4, 3, 6) and data.tokens.dtype == torch.int64
    assert (data.tokens[:, 0, 0] > 3).all()  # a real word opens each report
    assert data.labels.shape == (4, len(FINDINGS))
    col = {f: i for i, f in enumerate(FINDINGS)}
    assert data.labels[0].tolist() == [1.0 if f == "Cardiomegaly" else 0.0 for f in FINDINGS]
    assert data.labels[1, col["Pleural Effusion"]] == 1.0  # uncertain -> positive by default
    assert data.labels[2, col["No Finding"]] == 1.0
    assert data.labels[3, col["Pneumothorax"]] == 1.0 and data.labels[3, col["Support Devices"]]
    assert data.per_patient
    # one unit per patient across labeled and unlabeled scans: u0 shares s0's PatientID, u1 is p4's
    assert data.units == [([0, 2], [1]), ([1], []), ([3], [0])]  # unlabeled/deep/u1.bin sorts first
    reasons = {path: reason for path, reason, _ in data.skipped}
    assert reasons["../outside.dcm"] == "outside-site-folder"
    assert reasons[str(tmp_path / "outside.dcm")] == "outside-site-folder"
    assert reasons["images/missing.dcm"] == "missing-file"
    assert reasons["unlabeled/readme.txt"] == "not-dicom"
    assert reasons["unlabeled/link.dcm"] == "outside-site-folder"
    assert calls and calls[-1] == (calls[-1][1], calls[-1][1])
    assert not any((site / name).exists() for name in ("cache", "state"))

    negative = load_site(site, tmp_path / "state", CFG, uncertain_as="negative")
    assert negative.labels[1, col["Pleural Effusion"]] == 0.0
    assert negative.labels[3, col["Pneumothorax"]] == 0.0


def test_without_patient_ids_each_study_is_a_unit(tmp_path: Path) -> None:
    site = _make_site(tmp_path)
    for i in range(4):  # the same scans, de-identified: no PatientID
        write_dicom(site / "images" / f"s{i}.dcm", _image(20 + 4 * i, 24, seed=i))
    rows = [_row(f"images/s{i}.dcm", "", Edema="1") for i in range(4)]
    write_dicom(site / "unlabeled" / "u0.dcm", _image(30, 30, seed=9))
    rows.append(_row("unlabeled/u0.dcm", ""))  # labeled after all: not an unlabeled scan too
    _write_csv(site, HEADER, rows)
    data = load_site(site, tmp_path / "state", CFG)
    assert not data.per_patient
    assert data.units == [([i], []) for i in range(5)] + [([], [0])]
    report = check_folder(site, resolution=R)
    assert report.accepted_labeled == 5 and report.accepted == 6


def test_copies_of_labeled_scans_put_into_unlabeled_add_no_unit(tmp_path: Path, capsys) -> None:
    """The review's reproduction: follow-up scans carrying a patient's PatientID were new units."""
    site = _make_site(tmp_path)
    before = load_site(site, tmp_path / "state", CFG)
    for i in range(4):
        shutil.copy(site / "images" / f"s{i}.dcm", site / "unlabeled" / f"copy{i}.dcm")
    after = load_site(site, tmp_path / "state", CFG)
    assert after.unlabeled.shape[0] == before.unlabeled.shape[0] + 4
    assert len(after.units) == len(before.units) == 3
    assert sorted(i for labeled, _ in after.units for i in labeled) == [0, 1, 2, 3]
    capsys.readouterr()  # the loads' log lines
    assert main(["data", "check", "--json", str(site)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["privacy_unit"] == "patient" and report["privacy_units"] == 3


def test_in_patient_mode_a_scan_without_identity_is_skipped_not_a_unit(tmp_path: Path) -> None:
    site = _make_site(tmp_path)
    write_dicom(site / "unlabeled" / "nobody.dcm", _image(26, 26, seed=5))  # ANONYMOUS
    rows = [_row("images/s0.dcm", "p1"), _row("images/anon.dcm", "")]
    write_dicom(site / "images" / "anon.dcm", _image(22, 22, seed=6))
    _write_csv(site, HEADER, rows)
    data = load_site(site, tmp_path / "state", CFG)
    reasons = {path: reason for path, reason, _ in data.skipped}
    assert reasons["images/anon.dcm"] == reasons["unlabeled/nobody.dcm"] == "no-patient-id"
    assert data.per_patient and data.images.shape[0] == 1
    report = check_folder(site, resolution=R)
    assert report.skipped_counts["no-patient-id"] == 2 and report.privacy_units == len(data.units)


def _decoded(labeled: list[str], unlabeled: list[str]) -> SiteFiles:
    """Decoded samples as decode_studies hands them on: labeled studies without a patient cell."""
    blank = tuple(None for _ in FINDINGS)
    studies = [(Study(n, rel, "", blank, ""), rel) for n, rel in enumerate(labeled, start=2)]
    return SiteFiles(studies, unlabeled, [], len(labeled))


def test_privacy_units_join_a_patients_labeled_and_unlabeled_scans(tmp_path: Path) -> None:
    for rel, patient in [("a.dcm", "P1"), ("b.dcm", "P2"), ("u.dcm", "P1"), ("anon.dcm", None)]:
        write_dicom(tmp_path / rel, _image(20, 20), patient_id=patient)
    decoded = _decoded(["a.dcm", "anon.dcm", "b.dcm"], ["u.dcm"])
    kept, grouping = privacy_units(tmp_path, decoded)
    assert grouping.per_patient
    assert [rel for _, rel in kept.labeled] == ["a.dcm", "b.dcm"] and kept.unlabeled == ["u.dcm"]
    assert grouping.units == [([0], [0]), ([1], [])]  # P1's labeled and unlabeled scan: one unit
    assert kept.skipped == [("anon.dcm", "no-patient-id", SKIP_REASONS["no-patient-id"])]


def test_unit_matching_normalises_and_merges_when_unsure(tmp_path: Path) -> None:
    """#17 hole 8: `P1` and `p 1`, and an MRN with and without IssuerOfPatientID, are one
    patient: identities match after normalising, so one patient is never split in two units."""
    labeled = [("P1", "a.dcm"), ("p 1", "b.dcm"), ("P2", "c.dcm"), ("", "d.dcm"), ("", "e.dcm")]
    identities = {
        "a.dcm": ("", "A-9"),
        "b.dcm": None,
        "c.dcm": ("HOSPITAL-A", "12345"),
        "d.dcm": ("", "012345"),  # the same MRN, zero-padded, without its issuer
        "e.dcm": ("HOSPITAL-B", "mrn-77"),
        "u1.dcm": ("", "MRN 77"),
        "u2.dcm": ("OTHER", "a9"),  # a.dcm's patient as another system writes the number
    }
    grouping = group_units(tmp_path, labeled, ["u1.dcm", "u2.dcm"], identities)
    units = sorted((sorted(rows), sorted(scans)) for rows, scans in grouping.units)
    assert units == [([0, 1], [1]), ([2, 3], []), ([4], [0])]


def test_privacy_units_without_labeled_identities_are_single_images(tmp_path: Path) -> None:
    for rel in ("a.dcm", "b.dcm"):
        write_dicom(tmp_path / rel, _image(20, 20))
    write_dicom(tmp_path / "u.dcm", _image(20, 20), patient_id="P1")
    decoded = _decoded(["a.dcm", "b.dcm"], ["u.dcm"])
    kept, grouping = privacy_units(tmp_path, decoded)
    assert not grouping.per_patient and kept == decoded
    # the unlabeled scan's PatientID does not matter: no labeled scan names anyone
    assert grouping.units == [([0], []), ([1], []), ([], [0])]


def test_bad_studies_csv_names_what_to_fix(tmp_path: Path) -> None:
    site = _make_site(tmp_path)
    _write_csv(
        site, ["dicom", "patient", *FINDINGS], [["images/s0.dcm", "p1", *[""] * len(FINDINGS)]]
    )
    with pytest.raises(SiteDataError, match="report") as info:
        load_site(site, tmp_path / "state", CFG)
    assert "found: dicom, patient" in str(info.value)
    report = check_folder(site, resolution=R)
    assert not report.usable and "report" in report.errors[0]

    _write_csv(site, HEADER, [_row("images/s0.dcm", "p1", Edema="yes")])
    with pytest.raises(SiteDataError, match="line 2, column 'Edema'"):
        load_site(site, tmp_path / "state", CFG)


def test_folder_without_studies_or_usable_rows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="not a site folder"):
        load_site(tmp_path / "nowhere", tmp_path / "state", CFG)
    site = _make_site(tmp_path)
    _write_csv(site, HEADER, [_row("images/missing.dcm", "p1")])
    with pytest.raises(SiteDataError, match="emixer data check"):
        load_site(site, tmp_path / "state", CFG)
    with pytest.raises(SiteDataError, match="inside the site folder"):
        load_site(site, site / "state", CFG)


def test_decoded_cache_is_reused_and_rebuilt_when_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _make_site(tmp_path)
    state = tmp_path / "state"
    first = load_site(site, state, CFG)
    assert len(list((state / "cache").glob("*.pt"))) == 1

    def refuse(path: Path, resolution: int) -> None:
        raise AssertionError("decoded again although the cache is valid")

    def no_header(path: Path) -> None:
        raise AssertionError("a header read although the cache holds the identities")

    monkeypatch.setattr(site_module, "decode_dicom", refuse)
    monkeypatch.setattr(site_module, "dicom_identity", no_header)
    second = load_site(site, state, CFG)
    assert torch.equal(first.images, second.images) and second.skipped == first.skipped
    assert second.units == first.units and second.per_patient == first.per_patient
    monkeypatch.undo()

    decoded: list[Path] = []

    def counting(path: Path, resolution: int) -> Decoded:
        decoded.append(path)
        return decode_dicom(path, resolution)

    monkeypatch.setattr(site_module, "decode_dicom", counting)
    bigger = load_site(site, state, ModelConfig(resolution=R * 2, max_sentences=3, max_words=6))
    assert bigger.images.shape[-1] == R * 2 and decoded

    decoded.clear()
    target = site / "images" / "s0.dcm"
    write_dicom(target, 1 - _image(20, 24, seed=0))
    os.utime(target, ns=(1, 1))  # a new mtime whatever the clock resolution
    changed = load_site(site, state, CFG)
    assert decoded and not torch.equal(changed.images[0], first.images[0])

    decoded.clear()
    (cache,) = (state / "cache").glob("*.pt")
    cache.write_bytes(b"garbage")
    again = load_site(site, state, CFG)
    assert decoded and torch.equal(again.images, changed.images)


def test_check_folder_on_a_site_uses_the_site_rules(tmp_path: Path) -> None:
    site = _make_site(tmp_path)
    report = check_folder(site, resolution=R)
    assert report.site and report.usable and not report.errors
    assert report.studies == 7 and report.accepted_labeled == 4 and report.accepted == 6
    assert report.patients == 3 and report.per_patient
    assert report.skipped_counts == {"outside-site-folder": 3, "missing-file": 1, "not-dicom": 1}
    assert report.label_counts["Cardiomegaly"] == {
        "positive": 1,
        "negative": 0,
        "uncertain": 0,
        "blank": 3,
    }
    assert report.label_counts["Pleural Effusion"]["uncertain"] == 1
    assert any("Scanner" in w for w in report.warnings)
    out = io.StringIO()
    report.render(Console(file=out, width=200))
    assert "Cardiomegaly" in out.getvalue()


def test_reports_over_the_length_cap_are_truncated_with_a_logged_count(tmp_path, caplog) -> None:
    site = _make_site(tmp_path)
    long_report = "The heart is enlarged with a small left pleural effusion today. " * 4
    rows = [_row("images/s0.dcm", "p1"), _row("images/s1.dcm", "p2")]
    rows[0][1] = long_report
    _write_csv(site, HEADER, rows)
    with caplog.at_level(logging.WARNING, logger="emixer.data"):
        data = load_site(site, tmp_path / "state", CFG)
    assert "1 of 2 reports exceed the report length cap (3 sentences of at most 5 words)" in (
        caplog.text
    )
    assert (data.tokens[0] != 0).sum(dim=1).tolist() == [6, 6, 6]  # 5 words + EOS, 3 sentences
