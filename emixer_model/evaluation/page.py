"""evaluation.html: the evaluation's page, in the evaluation's own folder at the site.

It holds statistics of the site's real data (not differentially private), so it is never part of
a release (docs/PRIVACY.md invariant 4); a site that wants to publish it does so as a step of its
own. The figures are the same rows the terminal prints (evaluation/tables.py) as HTML tables with
value, interval, n and verdict columns, then the PNG figures with captions. Tables scroll inside
their own box and images are at most as wide as their grid cell, so the page fits a 390 px phone
screen without sideways scrolling and nothing overlaps (tests/test_release_page.py checks both
in Chromium).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from emixer_model.evaluation.tables import (
    FIGURE_COLUMNS,
    cell,
    figure_row,
    figure_tables,
    finding_table,
    inputs_line,
)

PAGE_NAME = "evaluation.html"

# What each figure shows, by file stem (evaluation/evaluate.py draws them), in page order.
FIGURE_CAPTIONS: dict[str, str] = {
    "label_auroc": "Label fidelity: per finding, the AUROC of the judge (a CNN trained on the "
    "sites' training-side real images) on held-out real images and on the synthetic images "
    "against the labels they were generated for, and of the second judge (a linear model on "
    "pooled pixels) on the synthetic images. 0.5 (dashed) is chance.",
    "tstr": "Train on ..., test on the held-out real patients: mean AUROC of classifiers trained "
    "on real images, on the public collection alone (when given), on synthetic images only, "
    "and on real + synthetic.",
    "training_curves": "Privacy spent: each site's cumulative epsilon per round, from the signed "
    "privacy ledger in the release's manifest.",
    "synthetic_samples": "Synthetic images, a few per label condition, titled with the labels "
    "they were generated for.",
}

STYLE = """
body { font-family: sans-serif; margin: 0 auto; padding: 1em; max-width: 1200px;
       overflow-wrap: anywhere; }
figure { margin: 0; min-width: 0; }
figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: 0.85em; margin-top: 0.3em; }
.figures { display: grid; gap: 1.5em;
           grid-template-columns: repeat(auto-fill, minmax(min(100%, 520px), 1fr)); }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin-bottom: 1em; }
h3 { font-size: 1em; margin: 1em 0 0.3em; }
td, th { border: 1px solid #999; padding: 0.2em 0.4em; white-space: nowrap; }
th { text-align: left; }
tr > th:first-child { white-space: normal; min-width: 8em; max-width: 22em; }
td.num { text-align: right; }
td.text { white-space: normal; min-width: 12em; }
@media (max-width: 480px) { table { font-size: 0.75em; } td, th { padding: 0.2em; } }
"""


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A titled table whose cells after the first are right-aligned numbers, but a figure
    table's verdict, which is text and wraps."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)

    def row(cells: Sequence[str]) -> str:
        tds = [f"<th>{html.escape(cells[0])}</th>"]
        for index, text in enumerate(cells[1:], start=1):
            kind = "text" if header[index] == "verdict" else "num"
            tds.append(f'<td class="{kind}">{html.escape(text)}</td>')
        return "<tr>" + "".join(tds) + "</tr>"

    body = "".join(row(cells) for cells in rows)
    return (
        f'<h3>{html.escape(title)}</h3><div class="wide"><table><tr>{head}</tr>{body}</table></div>'
    )


def _figures(out_dir: Path, written: Sequence[str]) -> str:
    order = list(FIGURE_CAPTIONS)
    files = sorted(
        (Path(f) for f in written),
        key=lambda f: (order.index(f.stem) if f.stem in order else len(order), f.stem),
    )
    return "".join(
        f'<figure><img src="{html.escape(f.as_posix())}" alt="{html.escape(f.stem)}">'
        f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(f.stem, f.stem))}</figcaption></figure>"
        for f in files
        if (out_dir / f).is_file()
    )


def write_evaluation_html(out_dir: Path, result: dict, findings: Sequence[str]) -> Path:
    """Write out_dir/evaluation.html from an evaluation result whose figures are in out_dir."""
    tables = [
        _table(title, ("measure", *FIGURE_COLUMNS), [(n, *figure_row(e)) for n, e in rows])
        for title, rows in figure_tables(result)
    ]
    names, rows = finding_table(result, findings)
    if rows:
        cells = [(finding, *(cell(e) for e in entries)) for finding, entries in rows]
        tables.append(_table("per finding: value [95% interval]", ("finding", *names), cells))
    release = result["release"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EMIXER-FL evaluation of a synthetic release</title>
<style>{STYLE}</style></head><body>
<h1>Evaluation of a synthetic release at this site</h1>
<p>Release <code>{html.escape(release["folder"])}</code>, model checkpoint sha256
<code>{html.escape(release["model_sha256"][:16])}…</code> (round {release["round"]}).
{html.escape(inputs_line(result))}.</p>
<p><b>{html.escape(result["note"])}</b></p>
<h2>Figures with 95% bootstrap intervals</h2>
<section id="tables">
{"".join(tables)}
</section>
<h2>Plots</h2>
<div class="figures" id="figures">
{_figures(out_dir, result["figures"])}
</div>
</body></html>
"""
    path = out_dir / PAGE_NAME
    path.write_text(page)
    return path
