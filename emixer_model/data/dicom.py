"""Read any grey-scale DICOM into a fixed-size [-1, 1] image; write clean DICOM files.

Sites hold whatever their PACS exported, so decoding never trusts a file: anything that cannot
serve as one grey-scale X-ray raises `SkipFile` with a reason code, and the caller records it
instead of crashing. Compressed files (JPEG Lossless and Extended, JPEG-LS, JPEG 2000, RLE) decode
through pydicom's pixel-data plugins, pylibjpeg (+ its libjpeg, openjpeg and rle plugins),
pyjpegls and Pillow, then GDCM as the tolerant fallback for slightly non-conformant streams
(`decoders.py`); all are default dependencies. The pixel normalisation is fixed in code (privacy
invariant 5 in docs/PRIVACY.md) so every site maps intensities the same way and nothing is fitted
on a site's data: modality LUT, then the file's own VOI LUT / window when it has one (else a robust
0.5-99.5 percentile stretch of that image alone), MONOCHROME1 inverted, aspect-preserving resize,
black padding, then x * 2 - 1.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from emixer_model.data.decoders import decode_pixels, has_decoder

log = logging.getLogger("emixer.data.dicom")

# Bump when the decoding pipeline changes: decoded caches keyed on it are then rebuilt.
NORMALISATION_VERSION = 2  # 2: GDCM decodes files that were skipped before

# Percentiles of the fallback intensity stretch (images without a window): robust to a few hot or
# dead pixels and burned-in markers, which a plain min-max would let set the contrast.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

SKIP_REASONS: dict[str, str] = {
    "not-dicom": "not a DICOM file (no DICM header)",
    "no-pixel-data": "DICOM without an image (e.g. a structured report or presentation state)",
    "colour": "colour image (RGB/YBR/palette); only grey-scale X-rays are used",
    "multi-frame": "multi-frame DICOM; only single-frame radiographs are used",
    "compressed-no-decoder": "compressed transfer syntax that none of the installed decoders "
    "(pylibjpeg, pylibjpeg-libjpeg/-openjpeg/-rle, pyjpegls, Pillow, GDCM) handles; "
    "decompress the file",
    "unreadable": "the file is damaged or inconsistent (e.g. truncated)",
    "empty-image": "the image has one constant value",
    "outside-site-folder": "the studies.csv path points outside the site folder",
    "missing-file": "the studies.csv path names a file that does not exist",
    "no-patient-id": "no patient identity (patient column, DICOM PatientID or unlabeled.csv): "
    "with patient-level privacy a scan is never a unit of its own",
}

SOP_CLASSES: dict[str, str] = {
    "dx": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "cr": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "sc": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}


class SkipFile(Exception):
    """A file that cannot serve as a grey-scale X-ray; `reason` is a SKIP_REASONS key.

    `transfer_syntax` names the file's transfer syntax once it was read far enough to know it.
    """

    def __init__(self, reason: str, detail: str = "", transfer_syntax: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reason = reason
        self.detail = " ".join((detail or SKIP_REASONS[reason]).split())  # always one line
        self.transfer_syntax = transfer_syntax
        super().__init__(f"{reason}: {self.detail}")


@dataclass
class Decoded:
    """One decoded image plus the facts a data check reports about its source."""

    pixels: np.ndarray  # float32 [R, R] in [-1, 1]
    source_shape: tuple[int, int]
    bits_stored: int
    photometric: str
    transfer_syntax: str = ""  # pydicom's keyword for it, e.g. "JPEGLosslessSV1"
    decoder: str = ""  # what read the pixel data, e.g. "pylibjpeg" or "gdcm" (decoders.py)


class _PydicomRecords(logging.Handler):
    """Keeps pydicom's log records of a decode_dicom call away from the screen.

    pydicom logs a full traceback at ERROR whenever a decoder plugin fails (and then raises, or
    falls back to the next plugin). To a site engineer a traceback reads as a crash, yet the
    exception already becomes the file's skip reason. So while this thread decodes, pydicom's
    records are re-logged as one line (no traceback) at DEBUG on "emixer.data.dicom": in the log
    file, or on screen with --verbose. Outside a decode they go on to the root logger's handlers.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.active = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        path = getattr(self.active, "path", None)
        if path is None:
            logging.getLogger().handle(record)
            return
        message = " ".join(record.getMessage().split())
        log.debug("%s: pydicom %s: %s", path, record.levelname.lower(), message)


_PYDICOM = _PydicomRecords()
logging.getLogger("pydicom").addHandler(_PYDICOM)
logging.getLogger("pydicom").propagate = False  # _PYDICOM forwards what it does not fold


def decode_dicom(path: Path, resolution: int) -> Decoded:
    """Decode one file to a [resolution, resolution] float32 image in [-1, 1]; raises SkipFile."""
    _PYDICOM.active.path = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd tag; the skip suffices
            return _decode(Path(path), resolution)
    finally:
        _PYDICOM.active.path = None


def _decode(path: Path, resolution: int) -> Decoded:
    try:
        ds = pydicom.dcmread(path, force=False)
    except InvalidDicomError:
        raise SkipFile("not-dicom") from None
    except Exception as err:  # any library failure on a damaged file is a skip, never a crash
        raise SkipFile("unreadable", f"{type(err).__name__}: {err}") from None
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    name = (syntax.keyword or str(syntax)) if syntax else "missing"
    try:
        return _pixels(ds, syntax, name, path, resolution)
    except SkipFile as skip:
        skip.transfer_syntax = name
        raise
    except Exception as err:  # e.g. every decoder plugin failed on a damaged stream
        raise SkipFile("unreadable", f"{type(err).__name__}: {err}", name) from None


def _pixels(
    ds: Dataset, syntax: pydicom.uid.UID | None, name: str, path: Path, resolution: int
) -> Decoded:
    if "PixelData" not in ds:
        raise SkipFile("no-pixel-data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or not photometric.startswith("MONOCHROME"):
        raise SkipFile(
            "colour",
            f"PhotometricInterpretation {photometric or 'missing'}, SamplesPerPixel {samples}",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SkipFile("multi-frame", f"{frames} frames")
    if syntax is not None and syntax.is_compressed and not has_decoder(syntax):
        raise SkipFile("compressed-no-decoder", f"{syntax.name} has no installed decoder")

    raw, decoder = decode_pixels(ds, syntax, path)
    if raw.ndim != 2:
        raise SkipFile("unreadable", f"pixel array has shape {raw.shape}, expected 2-D")
    image = apply_modality_lut(raw.astype(np.float64), ds).astype(np.float64)
    if not np.isfinite(image).all():
        raise SkipFile("unreadable", "pixel values are not finite after the modality LUT")
    if image.max() == image.min():
        raise SkipFile("empty-image")
    image01 = _to_unit_range(image, ds)
    if photometric == "MONOCHROME1":
        image01 = 1.0 - image01
    pixels = _fit_square(image01, resolution) * 2.0 - 1.0
    return Decoded(
        pixels=np.clip(pixels, -1.0, 1.0).astype(np.float32),
        source_shape=(int(raw.shape[0]), int(raw.shape[1])),
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        photometric=photometric,
        transfer_syntax=name,
        decoder=decoder,
    )


def _to_unit_range(image: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map modality values to [0, 1] with the file's VOI when usable, else a percentile stretch."""
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            out = apply_voi_lut(image, ds)  # prefers the LUT when a file has both
            if "VOILUTSequence" in ds:
                lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
                lo, hi = float(lut.min()), float(lut.max())
            else:  # the window's output range: the same transform at the extremes
                lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds))
            if hi > lo and np.isfinite([lo, hi]).all():
                return np.clip((out - lo) / (hi - lo), 0.0, 1.0)
        except Exception:  # a malformed window or LUT: fall back to the image's own range
            pass
    lo, hi = np.percentile(image, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:  # a few bright pixels on a flat field: percentiles collapse, use the full range
        lo, hi = image.min(), image.max()
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def _fit_square(image01: np.ndarray, resolution: int) -> np.ndarray:
    """Resize keeping the aspect ratio to fit resolution x resolution, centred on black."""
    h, w = image01.shape
    scale = resolution / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
    if (new_h, new_w) != (h, w):
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1
        )
    out = np.zeros((resolution, resolution), dtype=np.float32)
    top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
    out[top : top + new_h, left : left + new_w] = x[0, 0].clamp(0.0, 1.0).numpy()
    return out


def write_dicom(
    path: Path,
    image01: np.ndarray,
    *,
    bits_stored: int = 8,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    sop_class: str = "dx",
    patient_id: str | None = None,
    patient_name: str | None = None,
    extra: dict[str, object] | None = None,
) -> None:
    """Write a grey-scale image as an explicit little-endian DICOM file with fresh UIDs.

    Phantom sites go through here (and tests that need odd files), so every file we produce is
    one pydicom reads back. A release's images go through `SecondaryCaptureWriter`, which writes
    the full Secondary Capture IOD.
    """
    if sop_class not in SOP_CLASSES:
        raise ValueError(f"sop_class must be one of {', '.join(SOP_CLASSES)}, not {sop_class!r}")
    stored = _stored_pixels(image01, bits_stored, photometric)
    _check_keywords(extra)
    allocated = stored.itemsize * 8

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[sop_class]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASSES[sop_class]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name or "ANONYMOUS"
    ds.PatientID = patient_id or "ANONYMOUS"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    _save_atomically(ds, Path(path))


@dataclass(frozen=True)
class ReleaseSeries:
    """The one study and series every image of a release belongs to, so a PACS or viewer imports
    the synthetic set as one unit (one study per image scattered it)."""

    study_uid: str
    series_uid: str
    created: datetime.datetime  # StudyDate/StudyTime: when the release was made, not a patient's

    @classmethod
    def new(cls) -> ReleaseSeries:
        return cls(generate_uid(), generate_uid(), datetime.datetime.now())


class SecondaryCaptureWriter:
    """Writes a release's images as 8-bit DICOM Secondary Captures that `dciodvfy` accepts.

    highdicom builds the SC Image IOD, so its Type 2 attributes (patient birth date and sex,
    study date/time/ID, accession number, referring physician, patient orientation) are present;
    those that would describe a patient are empty: the image depicts none. ConversionType SYN
    says the image is synthetic. BodyPartExamined CHEST settles Laterality (Type 2C): the chest
    is not a paired organ, so the attribute must be absent (without a body part, dciodvfy asks
    for it).

    Building that dataset cost 2.4-2.8 ms a file (bench/README.md), as much as generating the
    pair, while a release's files differ only in their SOP instance UID, instance number,
    patient ID, per-file `extra` attributes and pixels. So highdicom builds one dataset per
    release, pydicom encodes each of its attributes once, and a file is those bytes with its own
    attributes encoded in their place (tests/test_release_dicom.py compares the two). The
    writer only reads its state after __init__, so threads may share it.
    """

    def __init__(
        self,
        series: ReleaseSeries,
        shape: tuple[int, int],
        *,
        patient_name: str,
        extra: dict[str, object] | None = None,
    ) -> None:
        built = secondary_capture(
            np.zeros(shape),
            series=series,
            instance_number=1,
            patient_id="",
            patient_name=patient_name,
            extra=extra,
        )
        out = DicomBytesIO()
        built.save_as(out, enforce_file_format=True)  # settles the VRs highdicom leaves open
        template = pydicom.dcmread(DicomBytesIO(out.getvalue()))
        self.shape = tuple(shape)
        self._pixel_vr = template["PixelData"].VR
        self._meta = {e.tag: _encode(e) for e in template.file_meta if e.tag != META_LENGTH}
        self._encoded = {elem.tag: _encode(elem) for elem in template}

    def write(
        self,
        path: Path,
        image01: np.ndarray,
        *,
        instance_number: int,
        patient_id: str,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Write one image in [0, 1] of the writer's shape with a fresh SOP instance UID."""
        stored = _stored_pixels(image01, 8, "MONOCHROME2")
        if stored.shape != self.shape:
            raise ValueError(f"image of shape {stored.shape}; this release's are {self.shape}")
        _check_keywords(extra)
        own = Dataset()
        own.SOPInstanceUID = generate_uid()
        own.InstanceNumber = instance_number
        own.PatientID = patient_id
        for keyword, value in (extra or {}).items():
            setattr(own, keyword, value)
        own.PixelData = stored.tobytes()
        own["PixelData"].VR = self._pixel_vr
        uid = DataElement(META_INSTANCE_UID, "UI", own.SOPInstanceUID)
        meta = _joined({**self._meta, uid.tag: _encode(uid)})
        length = _encode(DataElement(META_LENGTH, "UL", len(meta)))
        body = _joined({**self._encoded, **{elem.tag: _encode(elem) for elem in own}})
        write_atomically(Path(path), b"\0" * 128 + b"DICM" + length + meta + body)


def secondary_capture(
    image01: np.ndarray,
    *,
    series: ReleaseSeries,
    instance_number: int,
    patient_id: str,
    patient_name: str,
    extra: dict[str, object] | None = None,
) -> Dataset:
    """highdicom's Secondary Capture of one image (see SecondaryCaptureWriter for what is in it)."""
    from highdicom.sc import SCImage

    stored = _stored_pixels(image01, 8, "MONOCHROME2")
    _check_keywords(extra)
    ds = SCImage(
        pixel_array=stored,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=series.study_uid,
        series_instance_uid=series.series_uid,
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer="EMIXER-FL",
        patient_id=patient_id,
        patient_name=patient_name,
        study_id="1",
        study_date=series.created.date(),
        study_time=series.created.time(),
        accession_number="",
        referring_physician_name="",
        # a chest radiograph as read (PA): rows run to the patient's left, columns to the feet
        patient_orientation=("L", "F"),
    )
    ds.ConversionType = "SYN"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "EMIXER-FL synthetic release"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


META_LENGTH, META_INSTANCE_UID = 0x00020000, 0x00020003  # FileMetaInformationGroupLength, ...


def _joined(encoded: dict[int, bytes]) -> bytes:
    """Encoded elements in ascending tag order, as a DICOM group or dataset stores them."""
    return b"".join(encoded[tag] for tag in sorted(encoded))


def _encode(elem: DataElement) -> bytes:
    """One data element as explicit VR little endian bytes (a release's transfer syntax)."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_data_element(out, elem)
    return out.getvalue()


def _stored_pixels(image01: np.ndarray, bits_stored: int, photometric: str) -> np.ndarray:
    """An image in [0, 1] as the unsigned integers a file stores (MONOCHROME1 inverted)."""
    image = np.asarray(image01, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"write_dicom needs a 2-D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("write_dicom: the image contains NaN or infinite values")
    if image.min() < -1e-6 or image.max() > 1 + 1e-6:
        raise ValueError("write_dicom: pixel values must lie in [0, 1]; rescale the image first")
    if not isinstance(bits_stored, int) or not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be an integer from 8 to 16, not {bits_stored!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    top = 2**bits_stored - 1
    stored = np.rint(np.clip(image, 0.0, 1.0) * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint8 if bits_stored == 8 else np.uint16)


def _check_keywords(extra: dict[str, object] | None) -> None:
    unknown = [k for k in (extra or {}) if tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")


def _save_atomically(ds: Dataset, path: Path) -> None:
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    write_atomically(path, out.getvalue())


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name then rename, so a crash never leaves a half-written file that a
    later data check would have to skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def normalise_grey(image: np.ndarray, resolution: int) -> np.ndarray:
    """[-1, 1] pixels [R, R] of a grey image with no window of its own (a PNG, say): the same
    percentile stretch, resize and scaling a DICOM without VOI gets, so every format a loader
    accepts maps intensities one way. Raises SkipFile("empty-image") for a constant image."""
    values = np.asarray(image, dtype=np.float64)
    if values.max() == values.min():
        raise SkipFile("empty-image")
    pixels = _fit_square(_to_unit_range(values, Dataset()), resolution) * 2.0 - 1.0
    return np.clip(pixels, -1.0, 1.0).astype(np.float32)
