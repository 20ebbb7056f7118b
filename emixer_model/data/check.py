"""`emixer data check`: what in a folder can serve for training, what is skipped and why.

A site engineer runs this before joining a federation. It reads a site folder with exactly the
parsing and decoding code training uses (so "accepted" here means accepted there), or any other
folder as a pile of DICOM files. It never raises on file content: a bad studies.csv becomes an
entry in `errors`, a bad file a skip reason with example paths. The report stays on the site's
machine, so it may name files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from emixer_model.config import FINDINGS
from emixer_model.data.dicom import SKIP_REASONS, Decoded, SkipFile, decode_dicom
from emixer_model.data.site import (
    STUDIES_CSV,
    SiteDataError,
    group_units,
    read_studies,
    resolve_study_file,
    unlabeled_files,
)

MAX_EXAMPLES = 5
LABEL_STATES = {1: "positive", 0: "negative", -1: "uncertain", None: "blank"}


@dataclass
class CheckReport:
    """Outcome of checking one folder; `usable` says whether training could start from it."""

    folder: str
    site: bool  # a site folder (has studies.csv) rather than a plain folder of DICOM files
    resolution: int
    accepted: int = 0  # usable images in total (labeled + unlabeled, or every accepted file)
    accepted_labeled: int = 0  # usable studies.csv rows
    studies: int = 0  # rows in studies.csv
    skipped_counts: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # over usable rows
    patients: int | None = None  # distinct patients among usable rows (None: no patient column)
    per_patient: bool = False
    privacy_units: int | None = None  # the units sampling draws (site folders only)
    labeled_files: list[tuple[str, str]] = field(default_factory=list)  # (patient, path) accepted
    unlabeled_files: list[str] = field(default_factory=list)  # accepted unlabeled paths
    photometric: dict[str, int] = field(default_factory=dict)
    bits_stored: dict[str, int] = field(default_factory=dict)
    # every DICOM file read, accepted or skipped, by pydicom's transfer syntax keyword: a PACS
    # export that compresses shows here first
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)
    # the accepted files of each transfer syntax by the decoder that read them (GDCM is the
    # fallback for streams the strict decoders refuse: a count here flags a quirky export)
    decoders: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """A site folder needs a usable labeled study; a plain folder any usable image."""
        if self.errors:
            return False
        return self.accepted_labeled > 0 if self.site else self.accepted > 0

    def skip(self, path: str, skip: SkipFile) -> None:
        """Count a skipped file; keep its path (and any specific detail) as an example."""
        self.skipped_counts[skip.reason] = self.skipped_counts.get(skip.reason, 0) + 1
        if skip.transfer_syntax:
            self._count_syntax(skip.transfer_syntax)
        examples = self.skipped_examples.setdefault(skip.reason, [])
        if len(examples) < MAX_EXAMPLES:
            generic = skip.detail == SKIP_REASONS[skip.reason]
            examples.append(path if generic else f"{path} ({skip.detail})")

    def accept(self, decoded: Decoded) -> None:
        self.accepted += 1
        self.photometric[decoded.photometric] = self.photometric.get(decoded.photometric, 0) + 1
        bits = str(decoded.bits_stored)
        self.bits_stored[bits] = self.bits_stored.get(bits, 0) + 1
        self._count_syntax(decoded.transfer_syntax)
        by_decoder = self.decoders.setdefault(decoded.transfer_syntax, {})
        by_decoder[decoded.decoder] = by_decoder.get(decoded.decoder, 0) + 1

    def _count_syntax(self, name: str) -> None:
        self.transfer_syntaxes[name] = self.transfer_syntaxes.get(name, 0) + 1

    def _syntax_counts(self) -> str:
        """Files per transfer syntax, with the decoders that read the accepted ones."""
        parts = []
        for name, count in sorted(self.transfer_syntaxes.items()):
            read = _counts(self.decoders.get(name, {}), " ")
            parts.append(f"{name}: {count}" + (f" (read by {read})" if read != "-" else ""))
        return "\n".join(parts) or "-"

    def as_dict(self) -> dict[str, object]:
        """JSON-able form for `emixer data check --json`."""
        return {
            "folder": self.folder,
            "site": self.site,
            "usable": self.usable,
            "resolution": self.resolution,
            "accepted": self.accepted,
            "accepted_labeled": self.accepted_labeled,
            "studies": self.studies,
            "skipped": {
                reason: {
                    "count": count,
                    "explanation": SKIP_REASONS.get(reason, reason),
                    "examples": self.skipped_examples.get(reason, []),
                }
                for reason, count in sorted(self.skipped_counts.items())
            },
            "label_counts": self.label_counts,
            "patients": self.patients,
            "privacy_unit": "patient" if self.per_patient else "image",
            "privacy_units": self.privacy_units,
            "photometric": self.photometric,
            "bits_stored": self.bits_stored,
            "transfer_syntaxes": self.transfer_syntaxes,
            "decoders": self.decoders,
            "errors": self.errors,
            "warnings": self.warnings,
        }

    def render(self, console: Console) -> None:
        """Print the report as rich tables."""
        summary = Table(title=f"emixer data check: {self.folder}", show_header=False)
        summary.add_column("what")
        summary.add_column("value")
        summary.add_row("kind", "site folder" if self.site else "folder of DICOM files")
        if self.site:
            summary.add_row("studies.csv rows", str(self.studies))
            summary.add_row("usable labeled studies", str(self.accepted_labeled))
            summary.add_row("usable unlabeled scans", str(self.accepted - self.accepted_labeled))
            summary.add_row("patients", "-" if self.patients is None else str(self.patients))
            summary.add_row("privacy unit", "patient" if self.per_patient else "image")
            summary.add_row("privacy units", str(self.privacy_units))
        else:
            summary.add_row("usable images", str(self.accepted))
        summary.add_row("skipped", str(sum(self.skipped_counts.values())))
        summary.add_row("photometric", _counts(self.photometric))
        summary.add_row("bits stored", _counts(self.bits_stored))
        summary.add_row("transfer syntax", self._syntax_counts())
        verdict = "[green]yes[/green]" if self.usable else "[red]no[/red]"
        summary.add_row("usable for training", verdict)
        console.print(summary)

        if self.skipped_counts:
            skips = Table(title="skipped files")
            for name in ("reason", "count", "why", "examples"):
                skips.add_column(name)
            for reason, count in sorted(self.skipped_counts.items()):
                skips.add_row(
                    reason,
                    str(count),
                    SKIP_REASONS.get(reason, reason),
                    "\n".join(self.skipped_examples.get(reason, [])),
                )
            console.print(skips)
        if self.label_counts:
            labels = Table(title="labels of usable studies")
            labels.add_column("finding")
            for state in LABEL_STATES.values():
                labels.add_column(state, justify="right")
            for finding, counts in self.label_counts.items():
                labels.add_row(finding, *(str(counts[s]) for s in LABEL_STATES.values()))
            console.print(labels)
        for warning in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}", markup=True, highlight=False)
        for error in self.errors:
            console.print(f"[red]error:[/red] {error}", markup=True, highlight=False)


def _counts(counts: dict[str, int], separator: str = ": ") -> str:
    return ", ".join(f"{k}{separator}{v}" for k, v in sorted(counts.items())) or "-"


def check_folder(folder: Path, resolution: int = 64) -> CheckReport:
    """Check a site folder (has studies.csv) or any folder of DICOM files; never raises."""
    folder = Path(folder)
    is_site = (folder / STUDIES_CSV).is_file()
    report = CheckReport(folder=str(folder), site=is_site, resolution=resolution)
    if not folder.is_dir():
        report.errors.append(f"{folder} is not a folder")
        return report
    if is_site:
        labeled = _check_studies(folder, report)
        files = unlabeled_files(folder)
    else:
        labeled = set()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            if is_site:
                path, rel = resolve_study_file(folder, rel)
                if rel in labeled:
                    continue  # counted once, as a labeled study (load_site does the same)
            report.accept(_decode(path, resolution))
            if is_site:
                report.unlabeled_files.append(rel)
        except SkipFile as skip:
            report.skip(rel, skip)
    if is_site and report.accepted_labeled:
        _count_units(folder, report)
    return report


def _count_units(folder: Path, report: CheckReport) -> None:
    """Privacy units exactly as load_site forms them; scans with no identity become skips."""
    try:
        grouping = group_units(folder, report.labeled_files, report.unlabeled_files)
    except SiteDataError as err:
        report.errors.append(str(err))
        return
    report.per_patient = grouping.per_patient
    report.privacy_units = len(grouping.units)
    for rel in grouping.no_id:
        report.skip(rel, SkipFile("no-patient-id"))
    if not grouping.per_patient:
        report.warnings.append(
            "no scan names a patient: the privacy guarantee is per image, not per patient"
        )


def _decode(path: Path, resolution: int) -> Decoded:
    try:
        return decode_dicom(path, resolution)
    except SkipFile:
        raise
    except Exception as err:  # decode_dicom promises SkipFile only; a check must never crash
        raise SkipFile("unreadable", f"{type(err).__name__}: {err}") from None


def _check_studies(folder: Path, report: CheckReport) -> set[str]:
    """Check studies.csv rows and their files with the parser load_site uses.

    Returns the relative paths the rows name, so unlabeled/ files among them are not counted twice.
    """
    try:
        table = read_studies(folder)
    except SiteDataError as err:
        report.errors.append(str(err))
        return set()
    report.studies = len(table.studies)
    if table.ignored_columns:
        report.warnings.append(f"ignored unknown columns: {', '.join(table.ignored_columns)}")
    if table.missing_findings:
        report.warnings.append(
            f"no column for {', '.join(table.missing_findings)}: read as blank (negative)"
        )
    states: dict[str, Counter[str]] = {f: Counter() for f in FINDINGS}
    patients: set[str] = set()
    seen: dict[str, Decoded | SkipFile] = {}
    for study in table.studies:
        try:
            path, rel = resolve_study_file(folder, study.dicom)
            if rel not in seen:
                try:
                    seen[rel] = _decode(path, report.resolution)
                except SkipFile as skip:
                    seen[rel] = skip
            outcome = seen[rel]
            if isinstance(outcome, SkipFile):
                raise outcome
        except SkipFile as skip:
            report.skip(study.dicom or f"{STUDIES_CSV} line {study.line}", skip)
            continue
        report.accept(outcome)
        report.accepted_labeled += 1
        report.labeled_files.append((study.patient, rel))
        if study.patient:
            patients.add(study.patient)
        for finding, value in zip(FINDINGS, study.labels, strict=True):
            states[finding][LABEL_STATES[value]] += 1
    if table.patient_column:
        report.patients = len(patients)
    report.label_counts = {f: {s: states[f][s] for s in LABEL_STATES.values()} for f in FINDINGS}
    return set(seen)
