"""A release's index.html and an evaluation's evaluation.html work in a real browser: Debian's
chromium, driven by Playwright.

On both pages every image decodes, the page logs no console errors, no image, caption or table
covers another, and at a phone's 390 px the page does not scroll sideways. The release page shows
release content only (no evaluation figure, nothing from real data); the evaluation page shows
its figures as tables with value, interval, n and verdict columns and every plot with a caption.
Playwright's own browser download is not reachable here, so the test uses the system chromium
(`.ci/run` installs it); without one it is skipped, loudly.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

WIDTHS = (1280, 390)

# The boxes of every image, caption and table of a page's sections, in page px.
BOXES_JS = """
selector => Array.from(document.querySelectorAll(selector)).map(e => {
    const r = e.getBoundingClientRect();
    return {what: e.tagName + ' ' + (e.alt || e.textContent.slice(0, 40)),
            x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
})
"""


def _skip_loudly(why: str) -> None:
    message = f"release page NOT tested in a browser: {why}; .ci/run installs chromium"
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _skip_loudly("playwright is not installed (pip install -e '.[test]')")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).is_file():
        _skip_loudly("no chromium found (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=executable, headless=True, args=["--no-sandbox"]
            )
        except Error as err:
            _skip_loudly(f"chromium at {executable} does not start ({str(err).splitlines()[0]})")
        yield chromium
        chromium.close()


def _overlaps(boxes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of boxes whose intersection is more than a rounding pixel in both directions."""
    pairs = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
            dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
            if dx > 1 and dy > 1:
                pairs.append((a["what"], b["what"]))
    return pairs


def _open(browser: Browser, path: Path, width: int, errors: list[str]) -> tuple[Page, int]:
    """The page at `width` px with every image decoded; console errors go to `errors`."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(path.as_uri(), wait_until="load")
    images = page.evaluate(
        "() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
    )
    broken = [alt for alt, complete, natural in images if not (complete and natural > 0)]
    assert images and not broken, f"images that did not decode: {broken}"
    return page, len(images)


def _check_layout(page: Page, selector: str, width: int) -> None:
    """Nothing `selector` matches overlaps, and the page does not scroll sideways."""
    boxes = page.evaluate(BOXES_JS, selector)
    assert boxes and all(box["w"] > 0 and box["h"] > 0 for box in boxes)
    assert not _overlaps(boxes), f"overlapping at {width} px: {_overlaps(boxes)}"
    overflow = page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at {width} px"


@pytest.mark.parametrize("width", WIDTHS)
def test_release_page_in_chromium(
    browser: Browser, small_release: Path, small_evaluation: Path, width: int
) -> None:
    errors: list[str] = []
    page, _ = _open(browser, small_release / "index.html", width, errors)
    assert not errors, f"console errors: {errors}"
    _check_layout(page, "#samples img, #samples figcaption", width)
    # an evaluation ran, and nothing of it reached the release or its page
    assert not {"evaluation.json", "evaluation.html", "figures"} & {
        p.name for p in small_release.iterdir()
    }
    text = page.inner_text("body")
    assert "AUROC" not in text and "held out" not in text
    page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_evaluation_page_in_chromium(browser: Browser, small_evaluation: Path, width: int) -> None:
    from emixer_model.evaluation.evaluate import TRAINING_PATIENTS
    from emixer_model.evaluation.tables import FIGURE_COLUMNS, FIGURE_TABLES

    errors: list[str] = []
    page, image_count = _open(browser, small_evaluation / "evaluation.html", width, errors)
    assert not errors, f"console errors: {errors}"
    figures = sorted(p.stem for p in (small_evaluation / "figures").glob("*.png"))
    assert len(figures) >= 4 and image_count == len(figures)
    captions = page.evaluate(
        "() => Array.from(document.querySelectorAll('#figures figure'))"
        ".map(f => [f.querySelector('img').alt, f.querySelector('figcaption').textContent])"
    )
    assert sorted(alt for alt, _ in captions) == figures
    short = [alt for alt, text in captions if len(text.split()) < 8]
    assert not short, f"figures without a caption saying what they show: {short}"

    tables = page.evaluate(
        "() => Array.from(document.querySelectorAll('#tables table')).map(t =>"
        " Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent)))"
    )
    figure_tables = [t for t in tables if t[0][1:] == list(FIGURE_COLUMNS)]
    assert len(figure_tables) == len(FIGURE_TABLES)
    shown = {row[0]: row[1:] for table in figure_tables for row in table[1:]}
    assert "report label F1 (macro)" in shown and "synthetic (TSTR)" in shown
    value, interval, n, verdict = shown["report label F1 (macro)"]
    assert float(value) >= 0 and interval.startswith("[") and int(n) > 0
    assert verdict.startswith(TRAINING_PATIENTS)  # the fixture's site recorded no split
    per_finding = [t for t in tables if t[0][0] == "finding"]
    assert per_finding and len(per_finding[0]) > 5

    _check_layout(page, "#figures img, #figures figcaption, #tables table", width)
    page.close()
