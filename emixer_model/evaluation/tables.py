"""The evaluation's tables, once: which figures of evaluation.json are shown, in which rows, and
how a figure reads as text. The terminal (rich) and evaluation.html render the same rows, so the
page shows what the terminal shows: value, 95% interval, n and verdict per figure, and one row
per finding for the per-label figures.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

Path = tuple[str, ...]  # keys into evaluation.json

# (title, ((row name, path to a figure), ...)); a row whose figure the result lacks is left out
FIGURE_TABLES: tuple[tuple[str, tuple[tuple[str, Path], ...]], ...] = (
    (
        "the synthetic release, judged on this site's held-out patients",
        (
            ("judge's own mean AUROC on held-out real images", ("tstr", "mean_auroc", "real")),
            (
                "label fidelity: judge's mean AUROC on synthetic images",
                ("label_fidelity", "mean_auroc"),
            ),
            (
                "label fidelity as a fraction of the judge's lift",
                ("label_fidelity", "lift_fraction"),
            ),
            ("report label F1 (macro)", ("report_consistency", "macro_f1")),
            ("image-report agreement (Cohen's kappa)", ("image_report_agreement", "kappa")),
            ("Frechet distance (judge features)", ("frechet", "distance")),
            ("duplicate rate", ("text", "duplicate_rate")),
            ("distinct reports", ("text", "distinct_reports")),
        ),
    ),
    (
        "train on ..., test on the held-out patients (mean AUROC)",
        (
            ("real (training-side patients: the ceiling)", ("tstr", "mean_auroc", "real")),
            ("public collection alone (the floor)", ("tstr", "mean_auroc", "public")),
            ("synthetic (TSTR)", ("tstr", "mean_auroc", "synthetic")),
            ("real + synthetic", ("tstr", "mean_auroc", "real_plus_synthetic")),
            ("TSTR / train-on-real", ("tstr", "ratio")),
            ("TSTR - train-on-public", ("tstr", "synthetic_minus_public")),
            ("augmentation gain (real + synthetic - real)", ("tstr", "augmentation_gain")),
        ),
    ),
)

# (column name, path to a {finding: figure} dict): one row per finding
FINDING_COLUMNS: tuple[tuple[str, Path], ...] = (
    ("real held-out AUROC", ("tstr", "per_label", "real")),
    ("fidelity", ("label_fidelity", "per_label")),
    ("fidelity, linear judge", ("label_fidelity", "second_judge", "per_label")),
    ("train-on-public AUROC", ("tstr", "per_label", "public")),
    ("TSTR AUROC", ("tstr", "per_label", "synthetic")),
    ("report F1", ("report_consistency", "per_label")),
    ("phrasing share", ("phrasing", "per_label")),
)
FIGURE_COLUMNS = ("value", "95% interval", "n", "verdict")
# the measures of evaluation.json's "compared" section, as its rows name them
COMPARED_MEASURES = (
    ("fidelity (judge's AUROC)", "label_fidelity"),
    ("fidelity, linear judge", "linear_label_fidelity"),
    ("report F1", "report_label_f1"),
    ("phrasing share", "phrasing_share"),
)


def lookup(result: dict, path: Path) -> dict | None:
    """The entry at `path`, or None where the result has no such entry."""
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value + 0.0:.4g}"  # + 0.0: no "-0"


def interval(entry: dict) -> str:
    if entry["low"] is None or entry["high"] is None:
        return ""
    return f"[{number(entry['low'])}, {number(entry['high'])}]"


def cell(entry: dict | None) -> str:
    """A figure in a table cell: value and interval, compact."""
    if entry is None:
        return "-"
    if entry["value"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['value']:.2f}"
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def figure_row(entry: dict) -> tuple[str, str, str, str]:
    """The FIGURE_COLUMNS of one figure."""
    return number(entry["value"]), interval(entry), str(entry["n"]), entry["verdict"]


def figure_tables(result: dict) -> list[tuple[str, list[tuple[str, dict]]]]:
    """(title, [(row name, figure)]) of every FIGURE_TABLES table, rows the result has."""
    tables = []
    for title, rows in FIGURE_TABLES:
        found = [(name, lookup(result, path)) for name, path in rows]
        tables.append((title, [(name, entry) for name, entry in found if entry is not None]))
    return tables


def finding_table(
    result: dict, findings: Sequence[str]
) -> tuple[list[str], list[tuple[str, list[dict | None]]]]:
    """(column names, [(finding, [figure per column])]) for the given findings; columns the
    result lacks are left out, and a finding a column has no figure for shows "-"."""
    columns = [(name, lookup(result, path)) for name, path in FINDING_COLUMNS]
    columns = [(name, per_label) for name, per_label in columns if per_label is not None]
    rows = [(f, [per_label.get(f) for _, per_label in columns]) for f in findings]
    return [name for name, _ in columns], rows


def inputs_line(result: dict) -> str:
    """What was scored, in one sentence: the caption of every table."""
    inputs = result["inputs"]
    return (
        f"{inputs['synthetic_pairs']} synthetic pairs; real studies: {inputs['real_train']} "
        f"training-side (the judge's) / {inputs['real_test']} held out "
        f"({inputs['real_test_units']} privacy units); {inputs['scored_on']}"
    )


def rich_tables(result: dict, findings: Sequence[str]) -> list[Table]:
    """The terminal's tables: every figure table, then one row per finding; the first says what
    was scored."""
    tables = []
    for title, rows in figure_tables(result):
        caption = None if tables else f"95% bootstrap intervals; {inputs_line(result)}"
        table = Table(title=title, caption=caption)
        table.add_column("measure")
        for column in FIGURE_COLUMNS:
            table.add_column(column, justify="left" if column == "verdict" else "right")
        for name, entry in rows:
            table.add_row(name, *figure_row(entry))
        tables.append(table)
    names, rows = finding_table(result, findings)
    if rows:
        table = Table(title="per finding: value [95% interval]")
        table.add_column("finding")
        for name in names:
            table.add_column(name, justify="right")
        for finding, entries in rows:
            table.add_row(finding, *(cell(e) for e in entries))
        tables.append(table)
    return tables


def compared_table(result: dict, findings: Sequence[str]) -> Table | None:
    """Each compared model beside the release, per finding and measure (evaluation.json's
    "compared"); None when nothing was compared."""
    models = lookup(result, ("compared", "models"))
    if not models:
        return None
    table = Table(
        title="per finding: other models beside this release, same judges, same held-out "
        "patients (value [95% interval])",
        caption="95% bootstrap intervals over the pairs; the judges of the tables above",
    )
    table.add_column("finding")
    table.add_column("measure")
    for name in models:
        table.add_column(name, justify="right")
    for finding in findings:
        for label, key in COMPARED_MEASURES:
            entries = [figures.get(key, {}).get(finding) for figures in models.values()]
            if any(entry is not None for entry in entries):
                table.add_row(finding, label, *(cell(entry) for entry in entries))
    return table
