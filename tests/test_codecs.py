"""Compressed DICOM as a PACS exports it decodes through pydicom's pixel-data plugins.

Each transfer syntax with an encoder available here (pydicom's RLE encoder, pyjpegls for JPEG-LS,
pylibjpeg-openjpeg for JPEG 2000, Pillow for JPEG Baseline) is tested on a file we compress
ourselves, against the original array. JPEG Lossless (Process 14) and JPEG Extended 12-bit have no
encoder in Python here, so they are tested on the small files pydicom ships with its wheel:
`SC_rgb_jpeg_gdcm.dcm` (JPEG Lossless SV1, compared with the same image stored as RLE) and
`JPGExtended.dcm` (12-bit, decoded and checked for range only: no uncompressed original ships).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from emixer_model.cli import main
from emixer_model.data.check import check_folder
from emixer_model.data.dicom import SkipFile, decode_dicom, write_dicom

R = 16


def _phantom(bits: int) -> np.ndarray:
    """A smooth gradient with a bright disc: compressible, and with the full range present."""
    y, x = np.mgrid[0:32, 0:40] / 40.0
    image = 0.2 + 0.5 * x + 0.1 * y
    image[(x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.02] = 1.0
    image[0, 0] = 0.0
    return np.clip(image, 0.0, 1.0)


def _plain(folder: Path, syntax: pydicom.uid.UID, bits: int) -> Path:
    return folder / f"plain-{syntax.keyword}-{bits}.dcm"


def _compressed(folder: Path, syntax: pydicom.uid.UID, bits: int, **options: object) -> Path:
    """An uncompressed phantom (`_plain`) and its compressed copy (the returned path)."""
    plain = _plain(folder, syntax, bits)
    write_dicom(plain, _phantom(bits), bits_stored=bits)
    ds = pydicom.dcmread(plain)
    ds.compress(syntax, **options)
    path = folder / f"{syntax.keyword}-{bits}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


LOSSLESS = [(RLELossless, 8), (RLELossless, 16), (JPEGLSLossless, 12), (JPEG2000Lossless, 16)]


@pytest.mark.parametrize(("syntax", "bits"), LOSSLESS, ids=lambda v: str(getattr(v, "keyword", v)))
def test_lossless_syntaxes_decode_to_the_original_pixels(tmp_path, syntax, bits) -> None:
    path = _compressed(tmp_path, syntax, bits)
    plain = _plain(tmp_path, syntax, bits)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(
        pydicom.dcmread(path).pixel_array, pydicom.dcmread(plain).pixel_array
    )
    decoded = decode_dicom(path, R)
    assert decoded.transfer_syntax == syntax.keyword and decoded.bits_stored == bits
    np.testing.assert_array_equal(decoded.pixels, decode_dicom(plain, R).pixels)


LOSSY = [
    (JPEGLSNearLossless, 12, {"jls_error": 3}),
    (JPEG2000, 16, {"j2k_cr": [5]}),
]


@pytest.mark.parametrize(("syntax", "bits", "options"), LOSSY, ids=["JPEG-LS-near", "JPEG2000"])
def test_lossy_syntaxes_decode_close_to_the_original(tmp_path, syntax, bits, options) -> None:
    path = _compressed(tmp_path, syntax, bits, **options)
    plain = pydicom.dcmread(_plain(tmp_path, syntax, bits)).pixel_array
    got = pydicom.dcmread(path).pixel_array.astype(np.int64)
    if syntax == JPEGLSNearLossless:  # the near-lossless bound is exact: |error| <= NEAR
        assert np.abs(got - plain).max() <= 3
    else:
        assert np.abs(got - plain).mean() < 0.01 * 2**bits
    decoded = decode_dicom(path, R)
    assert decoded.transfer_syntax == syntax.keyword
    # the decoded image is the original's, not noise: mean error under 2% of the [-1, 1] range
    original = decode_dicom(_plain(tmp_path, syntax, bits), R).pixels
    assert np.abs(decoded.pixels - original).mean() < 0.04


def test_jpeg_baseline_encoded_with_pillow_decodes(tmp_path) -> None:
    plain = tmp_path / "plain.dcm"
    write_dicom(plain, _phantom(8), bits_stored=8)
    ds = pydicom.dcmread(plain)
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buf, format="jpeg", quality=95)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "baseline.dcm", enforce_file_format=True)
    got = pydicom.dcmread(tmp_path / "baseline.dcm").pixel_array.astype(np.int64)
    assert np.abs(got - ds.pixel_array).mean() < 3
    assert decode_dicom(tmp_path / "baseline.dcm", R).transfer_syntax == "JPEGBaseline8Bit"


def test_jpeg_lossless_process_14_decodes_exactly() -> None:
    """No JPEG Lossless encoder is installed: pydicom's GDCM-made file against its RLE twin."""
    lossless = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    assert lossless.file_meta.TransferSyntaxUID.keyword == "JPEGLosslessSV1"
    twin = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array
    np.testing.assert_array_equal(lossless.pixel_array, twin)
    with pytest.raises(SkipFile) as info:  # decoded, then refused for what it is: a colour image
        decode_dicom(Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm")), R)
    assert info.value.reason == "colour" and info.value.transfer_syntax == "JPEGLosslessSV1"


def test_jpeg_extended_12_bit_decodes() -> None:
    """No 12-bit JPEG encoder is installed (Pillow refuses 12-bit): pydicom's own sample file."""
    path = Path(get_testdata_file("JPGExtended.dcm"))
    raw = pydicom.dcmread(path).pixel_array
    assert raw.shape == (1024, 256) and 0 <= raw.min() < raw.max() < 2**12
    decoded = decode_dicom(path, R)
    assert decoded.transfer_syntax == "JPEGExtended12Bit" and decoded.bits_stored == 12
    assert decoded.pixels.std() > 0.05


def test_data_check_counts_files_per_transfer_syntax(tmp_path, capsys) -> None:
    folder = tmp_path / "pacs"
    folder.mkdir()
    _compressed(folder, RLELossless, 16)
    _compressed(folder, JPEGLSLossless, 12)
    broken = pydicom.dcmread(_plain(folder, JPEGLSLossless, 12))
    broken.file_meta.TransferSyntaxUID = JPEGLSLossless
    broken.PixelData = encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"])
    broken["PixelData"].VR = "OB"
    broken.save_as(folder / "broken-jpegls.dcm")
    report = check_folder(folder, resolution=R)
    assert report.transfer_syntaxes == {
        "ExplicitVRLittleEndian": 2,
        "RLELossless": 1,
        "JPEGLSLossless": 2,  # the broken one is counted too: it was read, then skipped
    }
    assert report.accepted == 4 and report.skipped_counts == {"unreadable": 1}
    assert main(["data", "check", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["transfer_syntaxes"] == report.transfer_syntaxes
