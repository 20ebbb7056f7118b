"""Load one site folder (docs/DESIGN.md section 6) into tensors, with privacy units and skips.

A site folder is `studies.csv` (dicom, report, one column per finding, optional patient) plus an
optional `unlabeled/` tree of DICOM scans. Every odd file is skipped with a reason that stays at
the site; only a folder that cannot serve at all raises SiteDataError. Decoding is the slow part,
so decoded pixels are cached in the site's state directory, keyed on the resolution, the
normalisation version and each file's path, size and modification time: any change rebuilds.
The privacy unit (invariant 6) is the patient: the connected components of every identity the site
holds for a file (the `patient` column, each file's DICOM PatientID + IssuerOfPatientID, an optional
`unlabeled.csv` naming the patient of unlabeled scans), labeled and unlabeled scans together. In
patient mode a scan with no identity is skipped (`no-patient-id`), never a unit of its own. Only
when no labeled scan has any identity is the unit the single image. Identities never leave here.
`load_site` runs the steps in order: find_site_files, decode_studies, privacy_units, site_tensors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import torch

from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.data.dicom import NORMALISATION_VERSION, SKIP_REASONS, SkipFile, decode_dicom
from emixer_model.shared import ProgressFn, UserError
from emixer_model.text.vocabulary import encode_report, fits_caps

log = logging.getLogger("emixer.data")

# Bumped when the decode cache's content changes (2: each file's DICOM identity is kept beside its
# pixels, so a warm load reads no header), so older caches miss instead of failing to load.
CACHE_FORMAT = 2

STUDIES_CSV = "studies.csv"
UNLABELED_DIR = "unlabeled"
UNLABELED_CSV = "unlabeled.csv"  # optional: (dicom, patient) of unlabeled scans
# PatientID values that name nobody (de-identification placeholders): no identity at all
PLACEHOLDER_IDS = frozenset({"", "anonymous", "anon", "unknown", "none", "n/a", "na", "-"})
REQUIRED_COLUMNS = ("dicom", "report")
PATIENT_COLUMN = "patient"
LABEL_VALUES = {1.0: 1, 0.0: 0, -1.0: -1}


class SiteDataError(UserError):
    """The site folder cannot be used for training; the message says what to fix."""


@dataclass
class Study:
    """One parsed row of studies.csv (labels: 1, 0, -1 or None for blank, in FINDINGS order)."""

    line: int
    dicom: str
    report: str
    labels: tuple[int | None, ...]
    patient: str


@dataclass
class StudyTable:
    """studies.csv parsed and validated; shared by load_site and `emixer data check`."""

    studies: list[Study]
    patient_column: bool  # the csv has a `patient` column (possibly with blanks)
    per_patient: bool  # ... and it names a patient on every row: the privacy unit is the patient
    ignored_columns: list[str]
    missing_findings: list[str]


@dataclass
class SiteData:
    """A site's usable data as tensors, ready for private training."""

    images: torch.Tensor  # [N, 1, R, R] float32 in [-1, 1]
    labels: torch.Tensor  # [N, L] float32 multi-hot over FINDINGS
    tokens: torch.Tensor  # [N, S, W] int64 report ids
    unlabeled: torch.Tensor  # [U, 1, R, R] float32 in [-1, 1]
    units: list[tuple[list[int], list[int]]]  # privacy units: (image indices, unlabeled indices)
    per_patient: bool
    skipped: list[tuple[str, str, str]]  # (relative path, reason code, detail); stays at the site
    # each image's and unlabeled scan's file relative to the site folder: what identifies a unit
    # in the evaluation split (emixer_model.data.splits); stays at the site
    files: list[str] = field(default_factory=list)
    unlabeled_files: list[str] = field(default_factory=list)

    def without_units(self, held_out: set[int]) -> SiteData:
        """The same data with some privacy units taken out of training (kept for the audit)."""
        kept = [unit for index, unit in enumerate(self.units) if index not in held_out]
        return replace(self, units=kept)


def read_studies(site_dir: Path) -> StudyTable:
    """Parse and validate studies.csv; raises SiteDataError naming the bad row, column or value."""
    path = Path(site_dir) / STUDIES_CSV
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise SiteDataError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise SiteDataError(f"{path} is not UTF-8 text: save it as a UTF-8 CSV file") from None
    except (OSError, csv.Error) as err:
        raise SiteDataError(f"{path} cannot be read as CSV: {err}") from None
    if not rows:
        raise SiteDataError(f"{path} is empty: it needs a header row and one row per study")

    header = [name.strip() for name in rows[0]]
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        key = name.lower()
        if key in index:
            raise SiteDataError(f"{path}: column {name!r} appears twice; keep one")
        index[key] = i
    missing = [c for c in REQUIRED_COLUMNS if c not in index]
    if missing:
        raise SiteDataError(
            f"{path} lacks the column(s) {', '.join(missing)}; found: {', '.join(header)}; "
            f"needed: {', '.join(REQUIRED_COLUMNS)}, one column per finding "
            f"({', '.join(FINDINGS)}) and optionally {PATIENT_COLUMN}"
        )
    finding_cols = {f: index.get(f.lower()) for f in FINDINGS}
    missing_findings = [f for f, i in finding_cols.items() if i is None]
    if len(missing_findings) == len(FINDINGS):
        raise SiteDataError(
            f"{path} has no finding columns; found: {', '.join(header)}; "
            f"add one column per finding: {', '.join(FINDINGS)}"
        )
    known = {*REQUIRED_COLUMNS, PATIENT_COLUMN, *(f.lower() for f in FINDINGS)}
    ignored = [name for name in header if name.lower() not in known]

    def cell(row: list[str], col: int | None) -> str:
        return row[col].strip() if col is not None and col < len(row) else ""

    studies: list[Study] = []
    patient_col = index.get(PATIENT_COLUMN)
    for line, row in enumerate(rows[1:], start=2):
        if not any(value.strip() for value in row):
            continue  # blank line
        labels: list[int | None] = []
        for finding, col in finding_cols.items():
            labels.append(_parse_label(cell(row, col), line, finding, path))
        studies.append(
            Study(
                line=line,
                dicom=cell(row, index["dicom"]),
                report=row[index["report"]] if index["report"] < len(row) else "",
                labels=tuple(labels),
                patient=cell(row, patient_col),
            )
        )
    per_patient = patient_col is not None and bool(studies) and all(s.patient for s in studies)
    return StudyTable(studies, patient_col is not None, per_patient, ignored, missing_findings)


def _parse_label(text: str, line: int, finding: str, path: Path) -> int | None:
    if not text:
        return None
    try:
        value = LABEL_VALUES.get(float(text))
    except ValueError:
        value = None
    if value is None:
        raise SiteDataError(
            f"{path} line {line}, column {finding!r}: {text!r} is not 1, 0, -1 or blank"
        )
    return value


def resolve_study_file(site_dir: Path, dicom: str) -> tuple[Path, str]:
    """The file a studies.csv `dicom` cell or an unlabeled/ entry names, and its relative path.

    Raises SkipFile("outside-site-folder") for absolute paths or paths (or symlinks) escaping the
    folder, so a csv can never make the loader read other files on the site's machine.
    """
    if not dicom:
        raise SkipFile("missing-file", "the dicom cell is empty")
    root = Path(site_dir).resolve()
    rel = Path(dicom)
    if rel.is_absolute() or rel.drive:
        raise SkipFile("outside-site-folder", "absolute path; give it relative to the site folder")
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise SkipFile("outside-site-folder", "the path leaves the site folder")
    if not target.is_file():
        raise SkipFile("missing-file")
    return target, target.relative_to(root).as_posix()


def resolve_studies(
    folder: Path, table: StudyTable
) -> tuple[list[tuple[Study, str]], list[tuple[str, str, str]]]:
    """(study, file relative to `folder`) for every row whose file can be used, and a skip
    (path or csv line, reason, detail) for every other row."""
    rows: list[tuple[Study, str]] = []
    skipped: list[tuple[str, str, str]] = []
    for study in table.studies:
        try:
            _, rel = resolve_study_file(folder, study.dicom)
        except SkipFile as skip:
            where = study.dicom or f"{STUDIES_CSV} line {study.line}"
            skipped.append((where, skip.reason, skip.detail))
            continue
        rows.append((study, rel))
    return rows, skipped


def unlabeled_files(site_dir: Path) -> list[Path]:
    """Every file under unlabeled/, recursively and in a stable order, whatever its extension."""
    folder = Path(site_dir) / UNLABELED_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file())


Identity = tuple[str, str] | None  # (IssuerOfPatientID, PatientID) of a file, None if it has none


def dicom_identity(path: Path) -> Identity:
    """(IssuerOfPatientID, PatientID) of a DICOM file, read without its pixels; None if absent."""
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["PatientID", "IssuerOfPatientID"],
        )
    except Exception:  # any unreadable header simply carries no identity
        return None
    patient = str(ds.get("PatientID", "") or "").strip()
    if patient.lower() in PLACEHOLDER_IDS:
        return None
    return str(ds.get("IssuerOfPatientID", "") or "").strip(), patient


def unit_key(identifier: str) -> str:
    """The key one identifier matches by: case, spaces, punctuation and the leading zeros of a
    number tell no two patients apart, so `P1`, `p 1` and `P-001` are one patient. When unsure
    the grouping merges, never splits: a larger unit only strengthens each patient's guarantee,
    while one patient split into two units would be counted twice."""
    compact = "".join(ch for ch in identifier.casefold() if ch.isalnum())
    return re.sub(r"\d+", lambda number: number.group().lstrip("0") or "0", compact)


def read_unlabeled_csv(site_dir: Path) -> dict[str, str]:
    """unlabeled.csv as {relative path: patient}; {} when the file is absent."""
    path = Path(site_dir) / UNLABELED_CSV
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"{path} cannot be read as a UTF-8 CSV file: {err}") from None
    if rows and not {"dicom", "patient"} <= {k.strip().lower() for k in rows[0] if k}:
        raise SiteDataError(f"{path} needs the columns dicom and patient")
    patients: dict[str, str] = {}
    for row in rows:
        cells = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        try:
            _, rel = resolve_study_file(site_dir, cells["dicom"])
        except SkipFile:
            continue  # the file itself is reported (or absent) through unlabeled/
        if cells["patient"]:
            patients[rel] = cells["patient"]
    return patients


@dataclass
class UnitGrouping:
    """Privacy units over given labeled and unlabeled samples (indices into the given lists)."""

    per_patient: bool
    labeled: list[int]  # labeled samples kept (in patient mode: those with an identity)
    unlabeled: list[int]
    units: list[tuple[list[int], list[int]]]  # indices into `labeled` / `unlabeled` as kept
    no_id: list[str]  # relative paths skipped with `no-patient-id`


def group_units(
    site_dir: Path,
    labeled: list[tuple[str, str]],
    unlabeled: list[str],
    identities: Mapping[str, Identity] | None = None,
) -> UnitGrouping:
    """Connected components of the identities of (patient, path) labeled and path unlabeled
    samples, matched after normalising (`unit_key`). Used by training and by `emixer data
    check`, so both count the same units. Each file's DICOM identity comes from `identities`
    (the decode cache's) or else its header."""
    root = Path(site_dir).resolve()
    extra = read_unlabeled_csv(site_dir)

    def keys(patient: str, rel: str) -> set[tuple[str, str]]:
        """Every identity of a file as (source, `unit_key`); empty: it names nobody. The DICOM
        key leaves IssuerOfPatientID out (an MRN with or without its issuer is one patient); the
        `patient` column stays its own source, since a local pseudonym may equal another
        patient's MRN, and the two meet through the files that carry both."""
        identity = identities.get(rel) if identities is not None else dicom_identity(root / rel)
        found = {("patient", unit_key(patient))}
        if identity is not None:
            found.add(("dicom", unit_key(identity[1])))
        return {key for key in found if key[1]}

    labeled_keys = [keys(patient, rel) for patient, rel in labeled]
    unlabeled_keys = [keys(extra.get(rel, ""), rel) for rel in unlabeled]
    if not any(labeled_keys):
        units = [([i], []) for i in range(len(labeled))]
        units += [([], [j]) for j in range(len(unlabeled))]
        return UnitGrouping(
            False, list(range(len(labeled))), list(range(len(unlabeled))), units, []
        )
    kept_l = [i for i, k in enumerate(labeled_keys) if k]
    kept_u = [j for j, k in enumerate(unlabeled_keys) if k]
    no_id = [labeled[i][1] for i, k in enumerate(labeled_keys) if not k]
    no_id += [unlabeled[j] for j, k in enumerate(unlabeled_keys) if not k]
    samples = [labeled_keys[i] for i in kept_l] + [unlabeled_keys[j] for j in kept_u]
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str], int] = {}
    for index, sample_keys in enumerate(samples):
        for key in sample_keys:
            if key in owner:
                parent[find(index)] = find(owner[key])
            else:
                owner[key] = index
    components: dict[int, tuple[list[int], list[int]]] = {}
    for index in range(len(samples)):
        unit = components.setdefault(find(index), ([], []))
        if index < len(kept_l):
            unit[0].append(index)
        else:
            unit[1].append(index - len(kept_l))
    return UnitGrouping(True, kept_l, kept_u, list(components.values()), no_id)


@dataclass
class SiteFiles:
    """The samples one step of load_site hands the next, so each step can be run on its own:
    labeled studies with their file and unlabeled scans (paths relative to the site folder), and
    every file skipped so far with its reason. Each step only narrows it."""

    labeled: list[tuple[Study, str]]
    unlabeled: list[str]
    skipped: list[tuple[str, str, str]]  # (relative path, reason code, detail)
    csv_rows: int  # rows in studies.csv, for the message when no study is usable


def load_site(
    site_dir: Path,
    state_dir: Path,
    model_cfg: ModelConfig,
    uncertain_as: str = "positive",
    progress: ProgressFn | None = None,
) -> SiteData:
    """Decode a site folder into tensors (cached under state_dir) with its privacy units."""
    if uncertain_as not in ("positive", "negative"):
        raise ValueError(f"uncertain_as must be 'positive' or 'negative', not {uncertain_as!r}")
    site_dir, state_dir = Path(site_dir), Path(state_dir)
    _check_folders(site_dir, state_dir)
    found = find_site_files(site_dir)
    decoded, pixels, identities = decode_studies(
        site_dir, state_dir, found, model_cfg.resolution, progress
    )
    kept, grouping = privacy_units(site_dir, decoded, identities)
    if not kept.labeled:
        raise SiteDataError(
            f"{site_dir} has no usable labeled study ({kept.csv_rows} rows in {STUDIES_CSV}, "
            f"{len(kept.skipped)} files skipped); run `emixer data check {site_dir}` to see why"
        )
    return site_tensors(kept, pixels, grouping, model_cfg, uncertain_as)


def _check_folders(site_dir: Path, state_dir: Path) -> None:
    """Refuse a folder that is no site folder, and a state directory inside the site folder."""
    if not (site_dir / STUDIES_CSV).is_file():
        raise SiteDataError(
            f"{site_dir} is not a site folder: needs {STUDIES_CSV} (columns dicom, report, one "
            f"per finding, optional patient) and optionally {UNLABELED_DIR}/ with DICOM scans"
        )
    if state_dir.resolve().is_relative_to(site_dir.resolve()):
        raise SiteDataError(
            f"state directory {state_dir} is inside the site folder {site_dir}; choose one "
            "outside it (the data folder stays read-only and holds only data)"
        )


def find_site_files(site_dir: Path) -> SiteFiles:
    """The studies studies.csv names and the scans under unlabeled/, each resolved inside the
    folder (a csv cell or a symlink never makes the loader read elsewhere); a scan both labeled
    and under unlabeled/ is one labeled sample."""
    table = read_studies(site_dir)
    if table.ignored_columns:
        log.warning(
            "%s: ignoring unknown column(s): %s", STUDIES_CSV, ", ".join(table.ignored_columns)
        )
    if table.missing_findings:
        log.warning(
            "%s: no column for %s; read as blank", STUDIES_CSV, ", ".join(table.missing_findings)
        )
    rows, skipped = resolve_studies(site_dir, table)
    labeled_rels = {rel for _, rel in rows}
    unlabeled_rels: list[str] = []
    for path in unlabeled_files(site_dir):
        written = path.relative_to(site_dir).as_posix()
        try:
            _, rel = resolve_study_file(site_dir, written)
        except SkipFile as skip:  # a symlink out of the folder
            skipped.append((written, skip.reason, skip.detail))
            continue
        if rel not in labeled_rels:  # one scan is one sample, never labeled and unlabeled too
            unlabeled_rels.append(rel)
    return SiteFiles(rows, unlabeled_rels, skipped, len(table.studies))


def decode_studies(
    site_dir: Path,
    state_dir: Path,
    found: SiteFiles,
    resolution: int,
    progress: ProgressFn | None = None,
) -> tuple[SiteFiles, dict[str, torch.Tensor], dict[str, Identity]]:
    """The found samples whose files decode, with their pixels and DICOM identities by relative
    path (from the cache under state_dir while no file changed: decoding and header reads are
    the slow part); a failure is a skip."""
    files = sorted({rel for _, rel in found.labeled} | set(found.unlabeled))
    pixels, failures, identities = _decode_cached(
        site_dir.resolve(), state_dir, files, resolution, progress
    )
    decoded = SiteFiles(
        labeled=[(study, rel) for study, rel in found.labeled if rel in pixels],
        unlabeled=[rel for rel in found.unlabeled if rel in pixels],
        skipped=found.skipped + [(rel, *failures[rel]) for rel in files if rel in failures],
        csv_rows=found.csv_rows,
    )
    return decoded, pixels, identities


def privacy_units(
    site_dir: Path, decoded: SiteFiles, identities: Mapping[str, Identity] | None = None
) -> tuple[SiteFiles, UnitGrouping]:
    """The privacy units (invariant 6) over the decoded samples, and the samples they cover.

    The unit is the patient, labeled and unlabeled scans together, whenever any labeled scan
    names one; then a scan with no identity is skipped (`no-patient-id`), never a unit of its own.
    Only when no labeled scan names anyone is every image its own unit. The units' indices are
    into the returned samples. `identities` are the files' DICOM identities (read from the
    headers when not given).
    """
    labeled = [(study.patient, rel) for study, rel in decoded.labeled]
    grouping = group_units(site_dir, labeled, decoded.unlabeled, identities)
    if not grouping.per_patient:
        log.warning("no scan names a patient; the privacy unit is the image")
        return decoded, grouping
    no_id = [(rel, "no-patient-id", SKIP_REASONS["no-patient-id"]) for rel in grouping.no_id]
    kept = SiteFiles(
        labeled=[decoded.labeled[i] for i in grouping.labeled],
        unlabeled=[decoded.unlabeled[j] for j in grouping.unlabeled],
        skipped=decoded.skipped + no_id,
        csv_rows=decoded.csv_rows,
    )
    return kept, grouping


def site_tensors(
    kept: SiteFiles,
    pixels: dict[str, torch.Tensor],
    grouping: UnitGrouping,
    model_cfg: ModelConfig,
    uncertain_as: str,
) -> SiteData:
    """The kept samples as the tensors private training reads: uncertain labels mapped as the
    run says, reports encoded and cut to the model's length cap (the cut is logged, counted)."""
    usable = kept.labeled
    uncertain = 1.0 if uncertain_as == "positive" else 0.0
    label_map = {1: 1.0, 0: 0.0, -1: uncertain, None: 0.0}
    images = torch.stack([pixels[rel] for _, rel in usable])[:, None]
    labels = torch.tensor(
        [[label_map[v] for v in s.labels] for s, _ in usable], dtype=torch.float32
    )
    tokens = torch.from_numpy(
        np.stack(
            [
                encode_report(s.report, model_cfg.max_sentences, model_cfg.max_words)
                for s, _ in usable
            ]
        ).astype(np.int64)
    )
    S, W = model_cfg.max_sentences, model_cfg.max_words
    cut = sum(not fits_caps(s.report, S, W) for s, _ in usable)
    if cut:
        log.warning(
            "%d of %d reports exceed the report length cap (%d sentences of at most %d words) "
            "and were truncated for training; raise model.max_sentences/max_words to keep more",
            cut,
            len(usable),
            S,
            W - 1,
        )
    r = model_cfg.resolution
    unlabeled = (
        torch.stack([pixels[rel] for rel in kept.unlabeled])[:, None]
        if kept.unlabeled
        else torch.zeros(0, 1, r, r)
    )
    return SiteData(
        images,
        labels,
        tokens,
        unlabeled,
        grouping.units,
        grouping.per_patient,
        kept.skipped,
        files=[rel for _, rel in usable],
        unlabeled_files=list(kept.unlabeled),
    )


def _decode_cached(
    root: Path,
    state_dir: Path,
    files: list[str],
    resolution: int,
    progress: ProgressFn | None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str]], dict[str, Identity]]:
    """Decode `files` (relative to root) and read their DICOM identities, or load both from the
    cache (keyed on every file's size and mtime); returns (pixels, failures, identities)."""
    stats = []
    for rel in files:
        st = (root / rel).stat()
        stats.append([rel, st.st_size, st.st_mtime_ns])
    key_text = json.dumps([resolution, NORMALISATION_VERSION, CACHE_FORMAT, stats])
    key = hashlib.sha256(key_text.encode()).hexdigest()
    cache_dir = state_dir / "cache"
    cache_file = cache_dir / f"{key}.pt"
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, weights_only=True)
            paths, pixels = cached["paths"], cached["pixels"]
            failures = {rel: (reason, detail) for rel, reason, detail in cached["skipped"]}
            identities = {rel: None for rel in paths}
            identities.update({rel: (issuer, pid) for rel, issuer, pid in cached["identities"]})
            if progress is not None:
                progress(len(files), len(files))
            return dict(zip(paths, pixels, strict=True)), failures, identities
        except Exception as err:  # a damaged cache is only lost time: decode again
            log.warning("decoded-image cache %s is damaged (%s); rebuilding it", cache_file, err)

    decoded: dict[str, torch.Tensor] = {}
    failures = {}
    identities = {}
    for done, rel in enumerate(files, start=1):
        try:
            decoded[rel] = torch.from_numpy(decode_dicom(root / rel, resolution).pixels)
            identities[rel] = dicom_identity(root / rel)
        except SkipFile as skip:
            failures[rel] = (skip.reason, skip.detail)
        if progress is not None:
            progress(done, len(files))

    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = list(decoded)
    payload = {
        "paths": paths,
        "pixels": torch.stack([decoded[p] for p in paths])
        if paths
        else torch.zeros(0, resolution, resolution),
        "skipped": [[rel, reason, detail] for rel, (reason, detail) in failures.items()],
        "identities": [[rel, *found] for rel, found in identities.items() if found is not None],
    }
    tmp = cache_file.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, cache_file)
    for old in cache_dir.glob("*.pt"):
        if old != cache_file:
            old.unlink(missing_ok=True)  # an older key: its files changed, it can never hit again
    return decoded, failures, identities
