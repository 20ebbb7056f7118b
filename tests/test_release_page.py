"""A release's index.html works in a real browser: Debian's chromium, driven by Playwright.

Every image decodes, the page logs no console errors, no image or caption in the evaluation
figures or the sample cards covers another, every figure has a caption, and at a phone's 390 px
the page does not scroll sideways. Playwright's own browser download is not reachable here, so
the test uses the system chromium (`.ci/run` installs it); without one it is skipped, loudly.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

WIDTHS = (1280, 390)

# The boxes of every image and caption in the figure section and the sample cards, in page px.
BOXES_JS = """
() => Array.from(document.querySelectorAll(
    '#evaluation figure img, #evaluation figcaption, #samples img, #samples figcaption'
)).map(e => {
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


@pytest.mark.parametrize("width", WIDTHS)
def test_release_page_in_chromium(browser, evaluated_release: Path, width: int) -> None:
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto((evaluated_release / "index.html").as_uri(), wait_until="load")

    images = page.evaluate(
        "() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
    )
    figures = sorted(p.stem for p in (evaluated_release / "figures").glob("*.png"))
    assert len(figures) >= 4 and len(images) > len(figures)
    broken = [alt for alt, complete, natural in images if not (complete and natural > 0)]
    assert not broken, f"images that did not decode: {broken}"
    assert not errors, f"console errors: {errors}"

    captions = page.evaluate(
        "() => Array.from(document.querySelectorAll('#evaluation figure'))"
        ".map(f => [f.querySelector('img').alt, f.querySelector('figcaption').textContent])"
    )
    assert sorted(alt for alt, _ in captions) == figures
    short = [alt for alt, text in captions if len(text.split()) < 8]
    assert not short, f"figures without a caption saying what they show: {short}"

    boxes = page.evaluate(BOXES_JS)
    assert all(box["w"] > 0 and box["h"] > 0 for box in boxes)
    assert not _overlaps(boxes), f"overlapping at {width} px: {_overlaps(boxes)}"
    overflow = page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at {width} px"
    page.close()
