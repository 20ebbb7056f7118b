"""Build a public collection folder (read by data.public.load_public) from NIH ChestX-ray14.

The coordinator runs this once on a downloaded copy of ChestX-ray14: `Data_Entry_2017.csv`
(columns Image Index, Finding Labels as "Cardiomegaly|Effusion", Patient ID, ...) and its PNG
images. The result is the site folder format with our finding columns and empty reports
(ChestX-ray14 ships labels only). docs/PUBLIC_DATA.md says how to run it and what the licence asks.

Label mapping (NIH_TO_FINDINGS): Effusion -> Pleural Effusion; Nodule and Mass -> Lung Lesion;
Cardiomegaly, Consolidation, Pneumothorax, Edema and No Finding keep their names. The other NIH
findings (Atelectasis, Infiltration, Pneumonia, Emphysema, Fibrosis, Pleural_Thickening, Hernia)
have no column here and are ignored. A mapped finding an image does not list is written 0 (NIH
labels are a complete list per image); Support Devices and Pneumoperitoneum, which NIH does not
label, stay blank.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emixer_model.config import FINDINGS
from emixer_model.data.phantoms import write_replacing
from emixer_model.data.public import SOURCE_JSON, PublicDataError
from emixer_model.data.site import STUDIES_CSV

NIH_TO_FINDINGS: dict[str, str | None] = {
    "No Finding": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Consolidation": "Consolidation",
    "Pneumothorax": "Pneumothorax",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Edema": "Edema",
    "Atelectasis": None,
    "Infiltration": None,
    "Pneumonia": None,
    "Emphysema": None,
    "Fibrosis": None,
    "Pleural_Thickening": None,
    "Hernia": None,
}
NIH_UNLABELED = ("Support Devices", "Pneumoperitoneum")  # NIH never labels them: blank, not 0
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
NIH_NAME = "NIH ChestX-ray14"
NIH_ATTRIBUTION = (
    "NIH Clinical Center is the data provider (https://nihcc.app.box.com/v/ChestXray-NIHCC); "
    "cite Wang et al., ChestX-ray8, IEEE CVPR 2017, pp. 3462-3471"
)
IMAGES_DIR = "images"


@dataclass
class Conversion:
    """What a conversion wrote and what it left out (by csv line, reason and detail)."""

    out: Path
    written: int
    linked: int  # images hard-linked (same file system) instead of copied
    skipped: list[tuple[int, str, str]]


def nih_labels(text: str) -> dict[str, int]:
    """Our finding cells of one NIH "Finding Labels" value; raises ValueError naming the problem.

    A mapped finding the image lists is 1, every other mapped finding 0, "No Finding" 1 only
    when it is the whole value; NIH_UNLABELED findings are left out (blank).
    """
    names = [name.strip() for name in text.split("|") if name.strip()]
    if not names:
        raise ValueError("empty Finding Labels")
    unknown = [name for name in names if name not in NIH_TO_FINDINGS]
    if unknown:
        raise ValueError(f"unknown NIH label(s) {', '.join(unknown)}")
    if "No Finding" in names and len(names) > 1:
        raise ValueError(f"'No Finding' together with findings: {text}")
    present = {NIH_TO_FINDINGS[name] for name in names} - {None}
    return {f: int(f in present) for f in FINDINGS if f not in NIH_UNLABELED}


def convert_nih(
    csv_path: Path, images_dir: Path, out: Path, limit: int | None = None
) -> Conversion:
    """Write a public collection at `out` (a new folder) from ChestX-ray14's csv and PNGs.

    Rows are taken in csv order, at most `limit` of them. Images are found by file name
    anywhere under images_dir (the download unpacks into images_001/images, ...). A row is
    skipped with a reason when its image is missing, its file name repeats an earlier row, or
    its labels are empty or unknown. Raises PublicDataError when the csv or folders are wrong
    or no row is usable; nothing is written then.
    """
    csv_path, images_dir, out = Path(csv_path), Path(images_dir), Path(out)
    if limit is not None and limit < 1:
        raise PublicDataError(f"--limit must be at least 1, not {limit}")
    if not images_dir.is_dir():
        raise PublicDataError(f"images folder {images_dir} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublicDataError(f"{out} exists and is not empty; give a new folder")
    rows = _read_nih_csv(csv_path)
    found = {path.name: path for path in sorted(images_dir.rglob("*.png"))}

    skipped: list[tuple[int, str, str]] = []
    studies: list[tuple[Path, list[str]]] = []
    names: set[str] = set()
    for line, row in rows:
        if limit is not None and len(studies) == limit:
            break
        name = (row.get("Image Index") or "").strip()
        if name not in found:
            skipped.append((line, "missing-image", f"{name or 'empty Image Index'} not found"))
            continue
        if name in names:
            skipped.append((line, "duplicate", f"{name} already converted"))
            continue
        try:
            labels = nih_labels(row.get("Finding Labels") or "")
        except ValueError as err:
            skipped.append((line, "bad-labels", str(err)))
            continue
        names.add(name)
        patient = (row.get("Patient ID") or "").strip()
        cells = [str(labels[f]) if f in labels else "" for f in FINDINGS]
        studies.append(
            (found[name], [f"{IMAGES_DIR}/{name}", "", f"NIH-{patient}" if patient else "", *cells])
        )
    if not studies:
        raise PublicDataError(
            f"no usable row in {csv_path} ({len(rows)} rows, {len(skipped)} skipped; first: "
            f"line {skipped[0][0]}: {skipped[0][2]})"
            if skipped
            else f"{csv_path} has no data rows"
        )

    linked = 0

    def write(folder: Path) -> None:
        nonlocal linked
        (folder / IMAGES_DIR).mkdir(parents=True)
        for source, row in studies:
            linked += _link_or_copy(source, folder / row[0])
        with open(folder / STUDIES_CSV, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["dicom", "report", "patient", *FINDINGS])
            writer.writerows(row for _, row in studies)
        source = {
            "name": NIH_NAME,
            "kind": "nih-chestxray14",
            "csv": csv_path.name,
            "csv_sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
            "studies": len(studies),
            "limit": limit,
            "reports": "none (ChestX-ray14 ships labels only)",
            "label_mapping": NIH_TO_FINDINGS,
            "not_labeled": list(NIH_UNLABELED),
            "attribution": NIH_ATTRIBUTION,
        }
        text = json.dumps(source, indent=2) + "\n"
        (folder / SOURCE_JSON).write_text(text, encoding="utf-8")

    if out.exists():
        out.rmdir()  # empty (checked above): replaced by the finished folder
    write_replacing(out, write)
    return Conversion(out, len(studies), linked, skipped)


def _read_nih_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every non-blank row; raises PublicDataError for a wrong file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in NIH_COLUMNS if c not in header]
            if missing:
                raise PublicDataError(
                    f"{path} lacks the column(s) {', '.join(missing)}; is it "
                    "Data_Entry_2017.csv from ChestX-ray14?"
                )
            reader.fieldnames = header
            return [
                (reader.line_num, row)
                for row in reader
                if any((value or "").strip() for value in row.values() if isinstance(value, str))
            ]
    except FileNotFoundError:
        raise PublicDataError(f"{path} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise PublicDataError(f"{path} cannot be read as a UTF-8 CSV: {err}") from None


def _link_or_copy(source: Path, target: Path) -> int:
    """Hard-link when source and target share a file system (112,120 PNGs are ~45 GB), else
    copy; returns 1 when linked. A symlink would leave the folder and the loader refuses it."""
    try:
        os.link(source, target)
        return 1
    except OSError:
        shutil.copyfile(source, target)
        return 0
