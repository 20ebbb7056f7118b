"""index.html: the page a researcher opens first: sample images with their labels and reports,
and the privacy summary. Only release content: an evaluation holds statistics of a site's real
data and goes to the site's own folder (`emixer evaluate --out`), never onto this page.

The sample images are embedded as data URIs, so the page shows them wherever it is copied. The
layout is a responsive grid in which every image is at most as wide as its own cell, so no image
can cover another, and the page fits a 390 px phone screen without sideways scrolling
(tests/test_release_page.py checks both in Chromium).
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


# Where the privacy figures come from: what the page says under the release epsilon.
PRIVACY_NOTE = (
    "Each site's (epsilon, delta) is recomputed with Opacus from the accountant history it signed "
    "(ECDSA P-256, SHA-256, over the canonical JSON of each entry); the release's epsilon is the "
    "maximum over sites. `emixer verify-release DIR --site-keys KEYS` re-checks all of it "
    "offline, this table included. Training losses are site-local and never part of a release."
)


def privacy_section_html(privacy: dict) -> str:
    """The page's privacy figures, all from the manifest's verified privacy section:
    `verify_release` checks the page holds exactly this."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s['epsilon']:.3f}</td>"
        f"<td>{'never trained' if s['delta'] is None else format(s['delta'], '.1e')}</td>"
        f"<td>{s['budget']:.2f}</td><td>{len(s['history'])}</td>"
        f"<td>{html.escape(s['accountant'])}</td>"
        f"<td>{html.escape(s['privacy_unit'] or '-')}</td>"
        f"<td>{'-' if s['max_grad_norm'] is None else format(s['max_grad_norm'], 'g')}</td></tr>"
        for name, s in sorted(privacy["sites"].items())
    )
    return (
        f"<p>Release epsilon (maximum over sites): <b>{privacy['release_epsilon']:.3f}</b>, "
        f"delta &le; {privacy['delta']:.1e}. {html.escape(PRIVACY_NOTE)}</p>"
        '<div class="wide"><table><tr><th>site</th><th>epsilon</th><th>delta</th>'
        "<th>budget</th><th>rounds</th><th>accountant</th><th>unit</th><th>clip norm</th></tr>"
        f"{rows}</table></div>"
    )


def model_html(model: dict) -> str:
    """The released model as the sites signed it: `verify_release` checks the page holds this
    line for the model hash and round it verified."""
    return (
        f"<p>Model: arrays sha256 <code>{html.escape(model['arrays_sha256'][:16])}…</code> after "
        f"round {int(model['round'])}, which every site that trained signed for.</p>"
    )


def _unsigned_html(manifest: dict) -> str:
    """The coordinator's own statements on the page, marked as such."""
    model, public = manifest["model"], manifest.get("public_pretraining")
    pretraining = (
        f"the public pretraining's name {html.escape(str(public.get('name')))} and "
        f"{public.get('steps')} steps (the sites signed its model as round 1's start)"
        if public
        else "that there was no public pretraining"
    )
    return (
        "<p><small>Unsigned (the coordinator's statement, no site signed it): that the images "
        f"were sampled from that model; the checkpoint file's sha256 "
        f"<code>{model['sha256'][:16]}…</code>; {pretraining}. "
        f"{html.escape(manifest['unsigned']['note'])}</small></p>"
    )


def write_index_html(release_dir: Path) -> Path:
    """(Re)write release_dir/index.html from the manifest and the reports."""
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
generated by the model; none depicts or describes a patient.</p>
<h2>Privacy</h2>
{privacy_section_html(manifest["privacy"])}
{model_html(manifest["model"])}
{_unsigned_html(manifest)}
<p>Each site can measure this release against its own patients (<code>emixer evaluate</code>);
those figures are statistics of real data and stay at the site unless it publishes them.</p>
<h2>Samples</h2>
<div class="samples" id="samples">
{_sample_cards(release_dir, rows, resolution)}
</div>
</body></html>
"""
    path = release_dir / "index.html"
    path.write_text(page)
    return path
