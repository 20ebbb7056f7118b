"""Compressed DICOM as a PACS exports it decodes through pydicom's pixel-data plugins.

Each transfer syntax with an encoder available here (pydicom's RLE encoder, pyjpegls for JPEG-LS,
pylibjpeg-openjpeg for JPEG 2000, Pillow for JPEG Baseline) is tested on a file we compress
ourselves, against the original array. No Python package here encodes JPEG Lossless (Process 14),
so `_jpeg_lossless_sv1` below writes one (about 40 lines: first-order prediction, one fixed
Huffman table); the decoded pixels must equal the original exactly. Nothing here encodes JPEG
Extended 12-bit (Pillow refuses 12-bit), so that syntax is tested on pydicom's own sample
`JPGExtended.dcm` (decoded and range-checked only: no uncompressed original ships with it).

GDCM is the fallback for streams the strict decoders refuse: pydicom's `JPEG-lossy.dcm` is the
same image as `JPGExtended.dcm` with a non-conformant scan header, and GDCM alone reads it; GDCM
also reads every lossless file above back to the original pixels.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from emixer_cli.main import main
from emixer_model.data.check import check_folder
from emixer_model.data.decoders import gdcm_pixels
from emixer_model.data.dicom import decode_dicom, write_dicom

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
    # the fallback alone reads the same pixels
    np.testing.assert_array_equal(gdcm_pixels(path), pydicom.dcmread(plain).pixel_array)


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


def _jpeg_lossless_sv1(image: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless (ITU T.81 Process 14, selection value 1) stream of a grey image.

    Prediction: the sample to the left (first row), above (first column), else left; the first
    sample is predicted by 2**(precision - 1). The 17 difference categories get one 5-bit code
    each, so the Huffman table is trivial; differences are taken modulo 2**16 as T.81 says.
    """
    rows, cols = image.shape
    x = image.astype(np.int64)
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:] = x[0, :-1]
    prediction[1:, 0] = x[:-1, 0]
    prediction[1:, 1:] = x[1:, :-1]
    diffs = (x - prediction) % 65536
    diffs = np.where(diffs > 32768, diffs - 65536, diffs)
    out, acc, used = bytearray(), 0, 0

    def put(value: int, length: int) -> None:
        nonlocal acc, used
        acc, used = (acc << length) | (value & ((1 << length) - 1)), used + length
        while used >= 8:
            used -= 8
            out.append((acc >> used) & 0xFF)
            if out[-1] == 0xFF:
                out.append(0)  # byte stuffing

    for d in diffs.ravel().tolist():
        category = min(16, abs(d).bit_length())
        put(category, 5)  # the canonical code of category c is c itself, 5 bits long
        if 0 < category < 16:
            put(d if d > 0 else d - 1, category)
    if used:
        put((1 << (8 - used)) - 1, 8 - used)  # pad the last byte with 1-bits
    frame = bytes([0xFF, 0xC3, 0, 11, precision, *rows.to_bytes(2, "big")])
    frame += bytes([*cols.to_bytes(2, "big"), 1, 1, 0x11, 0])
    huffman = bytes([0xFF, 0xC4, 0, 36, 0x00, 0, 0, 0, 0, 17, *[0] * 11, *range(17)])
    scan = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + frame + huffman + scan + bytes(out) + b"\xff\xd9"


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless], ids=lambda s: s.keyword)
@pytest.mark.parametrize("bits", [12, 16])
def test_jpeg_lossless_process_14_decodes_to_the_original_pixels(tmp_path, syntax, bits) -> None:
    plain = _plain(tmp_path, syntax, bits)
    write_dicom(plain, _phantom(bits), bits_stored=bits)
    ds = pydicom.dcmread(plain)
    noise = np.random.default_rng(bits).integers(0, 2**bits, ds.pixel_array.shape)
    original = np.where(noise % 5 == 0, noise, ds.pixel_array).astype(np.uint16)  # big jumps too
    ds.PixelData = original.tobytes()
    ds.save_as(plain)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([_jpeg_lossless_sv1(original, bits)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "lossless.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "lossless.dcm").pixel_array, original)
    decoded = decode_dicom(tmp_path / "lossless.dcm", R)
    assert decoded.transfer_syntax == syntax.keyword and decoded.bits_stored == bits
    np.testing.assert_array_equal(decoded.pixels, decode_dicom(plain, R).pixels)


def test_jpeg_extended_12_bit_decodes() -> None:
    """No 12-bit JPEG encoder is installed (Pillow refuses 12-bit): pydicom's own sample file."""
    path = Path(get_testdata_file("JPGExtended.dcm"))
    raw = pydicom.dcmread(path).pixel_array
    assert raw.shape == (1024, 256) and 0 <= raw.min() < raw.max() < 2**12
    decoded = decode_dicom(path, R)
    assert decoded.transfer_syntax == "JPEGExtended12Bit" and decoded.bits_stored == 12
    assert decoded.decoder == "pylibjpeg"
    assert decoded.pixels.std() > 0.05


def test_a_jpeg_stream_the_strict_decoders_refuse_decodes_through_gdcm() -> None:
    """`JPEG-lossy.dcm`'s scan header ends the spectral selection at 0 where sequential JPEG
    needs 63; otherwise it is `JPGExtended.dcm`, whose pylibjpeg decode is the reference."""
    quirky = Path(get_testdata_file("JPEG-lossy.dcm"))
    reference = Path(get_testdata_file("JPGExtended.dcm"))
    with pytest.raises(RuntimeError, match="misplaced marker"):
        pixel_array(quirky, decoding_plugin="pylibjpeg")
    with pytest.raises(RuntimeError, match="12-bit"):
        pixel_array(quirky, decoding_plugin="pillow")
    raw = gdcm_pixels(quirky)
    expected = pydicom.dcmread(reference).pixel_array
    assert raw.shape == (1024, 256) and raw.dtype == np.uint16 and raw.max() < 2**12
    assert np.abs(raw.astype(np.int64) - expected).max() <= 1  # the two IDCTs round apart
    decoded = decode_dicom(quirky, R)
    assert decoded.transfer_syntax == "JPEGExtended12Bit" and decoded.decoder == "gdcm"
    assert np.abs(decoded.pixels - decode_dicom(reference, R).pixels).max() < 0.01


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
    shutil.copy(get_testdata_file("JPEG-lossy.dcm"), folder)
    report = check_folder(folder, resolution=R)
    assert report.transfer_syntaxes == {
        "ExplicitVRLittleEndian": 2,
        "RLELossless": 1,
        "JPEGLSLossless": 2,  # the broken one is counted too: it was read, then skipped
        "JPEGExtended12Bit": 1,
    }
    assert report.decoders == {
        "ExplicitVRLittleEndian": {"pydicom": 2},
        "RLELossless": {"pylibjpeg": 1},
        "JPEGLSLossless": {"pylibjpeg": 1},
        "JPEGExtended12Bit": {"gdcm": 1},
    }
    assert report.accepted == 5 and report.skipped_counts == {"unreadable": 1}
    assert main(["data", "check", str(folder), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["transfer_syntaxes"] == report.transfer_syntaxes
    assert checked["decoders"] == report.decoders
    assert main(["data", "check", str(folder)]) == 0
    assert "JPEGExtended12Bit: 1 (read by gdcm 1)" in " ".join(capsys.readouterr().out.split())
