"""index.html: the page a researcher opens first: sample images with their labels and reports, the
privacy summary, and the evaluation figures when `emixer evaluate` has written them.

The sample images are embedded as data URIs, so the page shows them wherever it is copied; the
figures are linked only when their files exist. The layout is a responsive grid in which every
image is at most as wide as its own cell, so no figure can cover another, and the page fits a
390 px phone screen without sideways scrolling (tests/test_release_page.py checks both in
Chromium).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
from pathlib import Path

import numpy as np

from emixer_model.data.dicom import decode_dicom

SAMPLES_PER_CONDITION = 6

# What each evaluation figure shows, by file stem (emixer_model/evaluation/evaluate.py draws them),
# in the order the page shows them; a figure not listed here is shown after these, under its name.
FIGURE_CAPTIONS: dict[str, str] = {
    "label_auroc": "Label fidelity: per finding, the AUROC of a classifier trained on the sites' "
    "real images, on held-out real images and on the synthetic images against the labels they "
    "were generated for. 0.5 (dashed) is chance.",
    "tstr": "Train on synthetic, test on real: mean AUROC on held-out real images of a classifier "
    "trained on real images, on synthetic images only, and on both.",
    "training_curves": "Privacy spent: each site's cumulative epsilon per round, from the "
    "signed privacy ledger in the manifest (losses are site-local and never part of a release).",
    "synthetic_samples": "Synthetic images, a few per label condition, titled with the labels "
    "they were generated for.",
}


@functools.cache
def _gray_levels() -> np.ndarray:
    """matplotlib's "gray" colormap as [256] uint8 grey levels (its R, G and B are equal)."""
    import matplotlib

    return matplotlib.colormaps["gray"](np.arange(256), bytes=True)[:, 0].copy()


def png_bytes(image01: np.ndarray) -> bytes:
    """A grey PNG of an image in [0, 1]: the grey levels matplotlib's imsave(cmap="gray") writes.

    One 8-bit grey channel where imsave writes RGBA with R = G = B: half the bytes, and Pillow
    encodes it about 5x faster (0.25 vs 1.3 ms for 64 x 64); it matters for a release writing one
    PNG per pair.
    """
    from PIL import Image

    index = np.clip((np.asarray(image01) * 256).astype(np.int64), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(_gray_levels()[index]).save(buf, format="png")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _sample_cards(release_dir: Path, rows: list[dict], resolution: int) -> str:
    shown: dict[str, int] = {}
    cards = []
    for row in rows:
        key = "+".join(row["labels"])
        if shown.get(key, 0) >= SAMPLES_PER_CONDITION:
            continue
        shown[key] = shown.get(key, 0) + 1
        pixels = decode_dicom(release_dir / row["dicom"], resolution).pixels
        uri = _data_uri(png_bytes((pixels + 1.0) / 2.0))
        cards.append(
            f'<figure><img src="{uri}" alt="synthetic image: {html.escape(key)}">'
            f"<figcaption><b>{html.escape(key)}</b><br>{html.escape(row['report'])}"
            f"<br><small>{html.escape(row['dicom'])}</small></figcaption></figure>"
        )
    return "\n".join(cards)


def _privacy_table(privacy: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s['epsilon']:.3f}</td><td>{s['delta']:.1e}</td>"
        f"<td>{s['budget']:.2f}</td><td>{len(s['history'])}</td>"
        f"<td>{html.escape(s['accountant'])}</td><td>{html.escape(s['privacy_unit'])}</td></tr>"
        for name, s in sorted(privacy["sites"].items())
    )
    return (
        f"<p>Release epsilon (maximum over sites): <b>{privacy['release_epsilon']:.3f}</b>, "
        f"delta &le; {privacy['delta']:.1e}. {html.escape(privacy['note'])}</p>"
        '<div class="wide"><table><tr><th>site</th><th>epsilon</th><th>delta</th>'
        "<th>budget</th><th>rounds</th><th>accountant</th><th>unit</th></tr>"
        f"{rows}</table></div>"
    )


def _evaluation_section(release_dir: Path) -> str:
    path = release_dir / "evaluation.json"
    if not path.is_file():
        return (
            "<p>No evaluation yet: run <code>emixer evaluate --release DIR --real SITE</code>.</p>"
        )
    order = list(FIGURE_CAPTIONS)
    figures = sorted(
        (release_dir / "figures").glob("*.png"),
        key=lambda f: (order.index(f.stem) if f.stem in order else len(order), f.stem),
    )
    images = "".join(
        f'<figure><img src="figures/{html.escape(f.name)}" alt="{html.escape(f.stem)}">'
        f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(f.stem, f.stem))}</figcaption></figure>"
        for f in figures
    )
    summary = json.loads(path.read_text()).get("summary", {})
    items = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in summary.items()
    )
    return f'<ul>{items}</ul><div class="figures">{images}</div>'


def write_index_html(release_dir: Path) -> Path:
    """(Re)write release_dir/index.html from the manifest, reports and any evaluation."""
    manifest = json.loads((release_dir / "manifest.json").read_text())
    rows = [json.loads(line) for line in (release_dir / "reports.jsonl").read_text().splitlines()]
    resolution = int(manifest["config"]["model"]["resolution"])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EMIXER-FL synthetic release</title>
<style>
body {{ font-family: sans-serif; margin: 0 auto; padding: 1em; max-width: 1200px;
        overflow-wrap: anywhere; }}
figure {{ margin: 0; min-width: 0; }}
figure img {{ display: block; width: 100%; height: auto; }}
figcaption {{ font-size: 0.85em; margin-top: 0.3em; }}
.figures {{ display: grid; gap: 1.5em;
            grid-template-columns: repeat(auto-fill, minmax(min(100%, 520px), 1fr)); }}
.samples {{ display: grid; gap: 1em;
            grid-template-columns: repeat(auto-fill, minmax(min(100%, 160px), 1fr)); }}
.samples img {{ image-rendering: pixelated; }}
.wide {{ overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #999; padding: 0.2em 0.4em; white-space: nowrap; }}
@media (max-width: 480px) {{ table {{ font-size: 0.75em; }} td, th {{ padding: 0.2em; }} }}
</style></head><body>
<h1>EMIXER-FL synthetic release</h1>
<p>{manifest["counts"]["total"]} synthetic image-report pairs. Every image and report here was
generated by the model; none depicts or describes a patient. Model checkpoint sha256
<code>{manifest["model"]["sha256"][:16]}…</code> (round {manifest["model"]["round"]}).</p>
<h2>Privacy</h2>
{_privacy_table(manifest["privacy"])}
<h2>Evaluation</h2>
<section id="evaluation">
{_evaluation_section(release_dir)}
</section>
<h2>Samples</h2>
<div class="samples" id="samples">
{_sample_cards(release_dir, rows, resolution)}
</div>
</body></html>
"""
    path = release_dir / "index.html"
    path.write_text(page)
    return path
