"""Load a public labeled collection for the coordinator's non-private pretraining (issue 11).

A public collection uses the site folder format (docs/DESIGN.md section 6): studies.csv with a
`dicom` column naming each image file, a `report` column that may be empty, one column per
finding and an optional `patient` column. Unlike a site folder, image files may be PNG (8- or
16-bit grey) beside DICOM. Pixels go through the same fixed normalisation as site data, so the
pretrained networks see public and site images on one intensity scale.

What is loaded is named and hashed (`PublicData.source()`): the release manifest records exactly
which public data the model learned without privacy. No site data is ever read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from emixer_model.config import ModelConfig
from emixer_model.data.dicom import Decoded, SkipFile, decode_dicom, normalise_grey
from emixer_model.data.site import (
    STUDIES_CSV,
    SiteDataError,
    read_studies,
    resolve_studies,
)
from emixer_model.shared import ProgressFn
from emixer_model.text.vocabulary import encode_report, fits_caps, tokenize

log = logging.getLogger("emixer.data")

SOURCE_JSON = "source.json"  # {"name": ...}: the collection's name in the manifest
SOURCE_TEXT = "SOURCE"  # or a text file whose first line is the name
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HASH_FORMAT = b"emixer-public-content-v1"  # bump when what content_hash covers changes
GREY_MODES = {"1": 1, "L": 8, "LA": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32}


class PublicDataError(SiteDataError):
    """The public collection cannot be used; the message says what to fix (the CLI prints it)."""


@dataclass
class PublicData:
    """A public collection's usable labeled studies as tensors, with what identifies it."""

    images: torch.Tensor  # [N, 1, R, R] float32 in [-1, 1], the site data's normalisation
    labels: torch.Tensor  # [N, L] float32 multi-hot over FINDINGS (uncertain counted positive)
    tokens: torch.Tensor  # [N, S, W] int64 report ids (all PAD where there is no report)
    has_report: torch.Tensor  # [N] bool: the study has a non-empty report
    name: str  # from source.json / SOURCE, else the folder name
    content_hash: str  # sha256 over studies.csv and every used image file, in path order
    skipped: list[tuple[str, str, str]]  # (relative path, reason code, detail)

    def source(self) -> dict[str, object]:
        """What a manifest records about the public pretraining data."""
        return {
            "name": self.name,
            "content_hash": self.content_hash,
            "studies": len(self.images),
            "with_report": int(self.has_report.sum()),
        }


def decode_png(path: Path, resolution: int) -> Decoded:
    """Decode a grey PNG (colour stored with equal channels counts as grey); raises SkipFile."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. odd text chunks; the skip reason suffices
            with Image.open(path) as png:
                mode = png.mode
                values = np.asarray(png)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as err:
        raise SkipFile("unreadable", f"PNG: {type(err).__name__}: {err}") from None
    if mode in ("RGB", "RGBA"):
        rgb = values[..., :3]
        if not ((rgb == rgb[..., :1]).all()):
            raise SkipFile("colour", f"PNG mode {mode} with differing colour channels")
        values, bits = rgb[..., 0], 8
    elif mode in GREY_MODES:
        values, bits = (values[..., 0] if mode == "LA" else values), GREY_MODES[mode]
    else:
        raise SkipFile("colour", f"PNG mode {mode}; only grey-scale images are used")
    return Decoded(
        pixels=normalise_grey(values, resolution),
        source_shape=(int(values.shape[0]), int(values.shape[1])),
        bits_stored=bits,
        photometric="MONOCHROME2",
    )


def decode_image(path: Path, resolution: int) -> Decoded:
    """Decode a PNG (by its signature, whatever the extension) or a DICOM; raises SkipFile."""
    try:
        with open(path, "rb") as handle:
            png = handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError as err:
        raise SkipFile("unreadable", f"{type(err).__name__}: {err}") from None
    if png:
        return decode_png(path, resolution)
    try:
        return decode_dicom(path, resolution)
    except SkipFile as skip:
        if skip.reason == "not-dicom":
            raise SkipFile("not-dicom", "neither a PNG nor a DICOM file") from None
        raise


def source_name(folder: Path) -> str:
    """The collection's name: source.json's "name", else SOURCE's first line, else the folder."""
    folder = Path(folder)
    if (folder / SOURCE_JSON).is_file():
        try:
            name = json.loads((folder / SOURCE_JSON).read_text(encoding="utf-8")).get("name")
        except (ValueError, AttributeError) as err:
            raise PublicDataError(f"{folder / SOURCE_JSON} is not a JSON object: {err}") from None
        if not isinstance(name, str) or not name.strip():
            raise PublicDataError(f'{folder / SOURCE_JSON} needs a non-empty "name" string')
        return name.strip()
    if (folder / SOURCE_TEXT).is_file():
        try:
            lines = (folder / SOURCE_TEXT).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PublicDataError(f"{folder / SOURCE_TEXT} is not UTF-8 text") from None
        name = next((line.strip() for line in lines if line.strip()), "")
        if name:
            return name
    return folder.resolve().name


def content_hash(folder: Path, files: list[str]) -> str:
    """sha256 over studies.csv and the given files (relative paths), each framed by its path and
    length, in sorted path order: any changed byte, rename or added study changes it."""
    root = Path(folder)
    digest = hashlib.sha256(HASH_FORMAT)
    for rel in [STUDIES_CSV, *sorted(set(files))]:
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def load_public(
    folder: Path,
    model_cfg: ModelConfig,
    progress: ProgressFn | None = None,
) -> PublicData:
    """Decode a public collection into tensors; odd files are skipped with a reason.

    Raises PublicDataError when the folder has no studies.csv, the csv is invalid, or no study
    is usable. `progress(done, total)` is called after each decoded file.
    """
    folder = Path(folder)
    if not (folder / STUDIES_CSV).is_file():
        raise PublicDataError(
            f"{folder} is not a public collection: needs {STUDIES_CSV} (columns dicom, report, "
            "one per finding, optional patient) naming PNG or DICOM image files"
        )
    try:
        table = read_studies(folder)
    except SiteDataError as err:
        raise PublicDataError(str(err)) from None
    name = source_name(folder)

    rows, skipped = resolve_studies(folder, table)
    root = folder.resolve()
    files = sorted({rel for _, rel in rows})
    decoded: dict[str, np.ndarray] = {}
    for done, rel in enumerate(files, start=1):
        try:
            decoded[rel] = decode_image(root / rel, model_cfg.resolution).pixels
        except SkipFile as skip:
            skipped.append((rel, skip.reason, skip.detail))
        if progress is not None:
            progress(done, len(files))

    usable = [(study, rel) for study, rel in rows if rel in decoded]
    if not usable:
        raise PublicDataError(
            f"{folder} has no usable study ({len(table.studies)} rows in {STUDIES_CSV}, "
            f"{len(skipped)} skipped: {_reason_counts(skipped) or 'no rows'})"
        )
    if skipped:
        log.warning("%s: skipped %d (%s)", name, len(skipped), _reason_counts(skipped))
    S, W = model_cfg.max_sentences, model_cfg.max_words
    cut = sum(not fits_caps(study.report, S, W) for study, _ in usable)
    if cut:
        log.warning("%s: %d reports cut to %d sentences x %d words", name, cut, S, W - 1)
    label_map = {1: 1.0, -1: 1.0, 0: 0.0, None: 0.0}
    return PublicData(
        images=torch.from_numpy(np.stack([decoded[rel] for _, rel in usable]))[:, None],
        labels=torch.tensor(
            [[label_map[v] for v in study.labels] for study, _ in usable], dtype=torch.float32
        ),
        tokens=torch.from_numpy(np.stack([encode_report(s.report, S, W) for s, _ in usable])),
        has_report=torch.tensor([bool(tokenize(study.report)) for study, _ in usable]),
        name=name,
        content_hash=content_hash(root, [rel for _, rel in usable]),
        skipped=skipped,
    )


def _reason_counts(skipped: list[tuple[str, str, str]]) -> str:
    counts = Counter(reason for _, reason, _ in skipped)
    return ", ".join(f"{count} {reason}" for reason, count in counts.most_common())
