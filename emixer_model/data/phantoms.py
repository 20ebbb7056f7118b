"""Deterministic phantom hospitals: chest-like DICOM scans with grammar reports and known labels.

No real chest X-ray can ship with the project, yet the demo, the tests and the benchmarks need
site folders that look like a hospital's: DICOM files of mixed modality, photometry, bit depth
and size, fake patient tags, free-text reports, CheXpert-style labels and unlabeled scans. Each
finding is drawn so it is visible and label-specific, which gives a ground truth for checking
whether synthetic images and reports carry their label (docs/DESIGN.md section 5).

Every patient identifier written (DICOM tags and the `patient` column) contains CANARY, so a
test can search anything that leaves a site for it.

The sites know things the public collection does not (SITE_KNOWLEDGE, docs/PHANTOM_WORLD.md):
sites 1 and 2 see a site-only finding (SITE_ONLY_FINDING), site 2 writes cardiomegaly in its own
words (grammar.SITE_PHRASING), site 3 draws pleural effusions its own way (a loculated lateral
lens instead of the public basal meniscus). `write_pseudo_sites` writes the control: the same
sites drawn and written as the public world can, without any of that.

`write_public_collection` writes the stand-in for a public chest X-ray collection that the
coordinator pretrains on (issue 11): the same anatomy and shared findings, but another scanner
look (PUBLIC_LOOK), other label prevalences, PNG beside DICOM, reports in the public grammar or
missing, and nothing any site knows beyond it. It carries no CANARY: it is not site data.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from emixer_model.config import FINDINGS
from emixer_model.data.dicom import write_dicom
from emixer_model.text.grammar import (
    PUBLIC_GRAMMAR,
    SITE_GRAMMAR,
    SITE_ONLY_FINDING,
    SITE_PHRASING_PARTS,
    Grammar,
    write_report,
)
from emixer_model.text.labeler import label_report

CANARY = "ZZCANARY"
# Bump when what the phantom writers draw or write changes (findings, knowledge, grammar, looks):
# the demo's and the bench's cached phantom folders carry it in their names, so a stale cache is
# never reused.
PHANTOM_VERSION = 2

# Typical prevalence of each finding (other than "No Finding") before a site's own skew.
BASE_PREVALENCE: dict[str, float] = {
    "Cardiomegaly": 0.22,
    "Pleural Effusion": 0.22,
    "Consolidation": 0.15,
    "Pneumothorax": 0.12,
    "Lung Lesion": 0.14,
    "Edema": 0.18,
    "Support Devices": 0.25,
}
UNCERTAIN_RATE = 0.3  # share of a finding's draws that come out uncertain (-1) instead of positive
MIN_POSITIVES = 3  # each finding a site sees is positive at least this often (per_site >= 60)

# The public collection: an archive-like mix (effusions and nodules common, devices and edema
# rare), few hedged labels, 40% of studies without a report, 60% of images as PNG.
PUBLIC_PREVALENCE: dict[str, float] = {
    "Cardiomegaly": 0.1,
    "Pleural Effusion": 0.35,
    "Consolidation": 0.08,
    "Pneumothorax": 0.06,
    "Lung Lesion": 0.28,
    "Edema": 0.06,
    "Support Devices": 0.08,
}
PUBLIC_UNCERTAIN_RATE = 0.1
PUBLIC_REPORT_SHARE = 0.6
PUBLIC_PNG_SHARE = 0.6
PUBLIC_STREAM = 0  # the public collection's seed words are [seed, 0]: sites count from 1
PUBLIC_PATIENT = "PUBLIC"  # patient ids PUBLIC-00001...; no CANARY, this is not site data

F32 = np.float32


@dataclass(frozen=True)
class Look:
    """How a collection's scanners and protocol render the same chest: ranges drawn per image.

    gamma, gain, offset and noise (Gaussian std) shape the intensities; zoom and shift set the
    field of view in the renderer's [-1, 1] coordinates (zoom < 1 crops closer to the chest, a
    shift moves the chest off centre). Gamma, noise and field of view survive the fixed
    normalisation of the loaders; gain and offset alone would be undone by its stretch.
    """

    gamma: tuple[float, float] = (0.85, 1.2)
    gain: tuple[float, float] = (0.9, 1.05)
    offset: tuple[float, float] = (-0.03, 0.03)
    noise: tuple[float, float] = (0.004, 0.015)
    zoom: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0


SITE_LOOK = Look()
# A washed-out, noisier, tighter-cropped look: roughly a screen-film archive digitised to PNG.
PUBLIC_LOOK = Look(
    gamma=(0.5, 0.7),
    gain=(0.8, 0.95),
    offset=(0.02, 0.08),
    noise=(0.03, 0.05),
    zoom=(0.8, 0.9),
    shift=0.06,
)


@dataclass(frozen=True)
class SiteKnowledge:
    """What a phantom site knows that the public collection does not (docs/PHANTOM_WORLD.md).

    site_only_prevalence: share of the site's studies drawn with SITE_ONLY_FINDING (0: the site
    never sees it, and its reports never name it). own_phrasing: its reports state the findings
    of grammar.SITE_PHRASING in its own words (grammar.SITE_PHRASING_PARTS). loculated_effusion:
    it draws SITE_APPEARANCE_FINDING as a lens against the lateral chest wall, where the public
    renderer draws a basal meniscus. The default knows nothing more than the public collection.
    """

    site_only_prevalence: float = 0.0
    own_phrasing: bool = False
    loculated_effusion: bool = False

    @property
    def grammar(self) -> Grammar:
        """The site's report grammar: the public one plus the site-only parts it uses."""
        grammar = SITE_GRAMMAR if self.site_only_prevalence > 0 else PUBLIC_GRAMMAR
        return grammar.plus(SITE_PHRASING_PARTS) if self.own_phrasing else grammar


# Site number (from 1) -> what it knows; a site not listed knows nothing more than the public
# collection (its scanner look and label mix still differ).
SITE_KNOWLEDGE: dict[int, SiteKnowledge] = {
    1: SiteKnowledge(site_only_prevalence=0.25),
    2: SiteKnowledge(site_only_prevalence=0.2, own_phrasing=True),
    3: SiteKnowledge(loculated_effusion=True),
}
SITE_APPEARANCE_FINDING = "Pleural Effusion"  # the shared finding a site may draw its own way


def site_knowledge(site: int) -> SiteKnowledge:
    """What phantom site number `site` (from 1) knows beyond the public collection."""
    return SITE_KNOWLEDGE.get(site, SiteKnowledge())


@dataclass
class _Anatomy:
    """Patient-specific body shape, so one patient's studies look alike (privacy unit = patient)."""

    dx: float
    dy: float
    scale: float
    angle: float
    lung_w: float
    lung_h: float
    heart_w: float
    dome: float
    rib_phase: float
    soft: float
    lung_dark: float


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    return _Anatomy(
        dx=u(-0.05, 0.05),
        dy=u(-0.05, 0.05),
        scale=u(0.92, 1.06),
        angle=u(-0.06, 0.06),
        lung_w=u(0.27, 0.32),
        lung_h=u(0.55, 0.65),
        heart_w=u(0.26, 0.3),
        dome=u(0.38, 0.48),
        rib_phase=u(0.0, 1.0),
        soft=u(0.45, 0.55),
        lung_dark=u(0.32, 0.4),
    )


def _ramp(signed: np.ndarray, edge: float) -> np.ndarray:
    """Soft step: 0 where signed < -edge/2, 1 where signed > edge/2, linear between."""
    return np.clip(signed / edge + 0.5, 0.0, 1.0)


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside."""
    return np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)


def _polyline(
    x: np.ndarray, y: np.ndarray, points: list[tuple[float, float]], width: float
) -> np.ndarray:
    """Soft mask of a thick polyline (tubes, lines, leads)."""
    dist = np.full(x.shape, np.inf, dtype=F32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(x - x0 - t * vx, y - y0 - t * vy))
    return _ramp(width - dist, width * 0.6)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled coarse Gaussian noise: cheap cloudy texture."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(F32)
    fy, fx = np.linspace(0, cells, h, dtype=F32), np.linspace(0, cells, w, dtype=F32)
    iy, ix = np.minimum(fy.astype(int), cells - 1), np.minimum(fx.astype(int), cells - 1)
    ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
    rows = grid[iy] * (1 - ty) + grid[iy + 1] * ty
    return rows[:, ix] * (1 - tx) + rows[:, ix + 1] * tx


def _render(
    labels: dict[str, int],
    body: _Anatomy,
    rng: np.random.Generator,
    height: int,
    width: int,
    look: Look = SITE_LOOK,
    loculated_effusion: bool = False,
) -> np.ndarray:
    """Draw one study: anatomy from `body`, findings and noise from `rng`; float32 [H, W].

    Findings, texture/noise and field of view draw from separate child streams, so the same rng
    state with and without a finding renders the same image apart from the finding (a paired
    comparison), and the field of view's draws never move the others (the site look's fixed
    field of view renders the pixels it rendered before the look was a parameter).
    loculated_effusion draws a pleural effusion as site 3 does (SiteKnowledge).
    """
    rng, texture, view = rng.spawn(3)
    zoom = view.uniform(*look.zoom)
    sx, sy = view.uniform(-look.shift, look.shift, 2)
    yy, xx = np.meshgrid(
        np.linspace(-zoom, zoom, height, dtype=F32) + F32(sy),
        np.linspace(-zoom, zoom, width, dtype=F32) + F32(sx),
        indexing="ij",
    )
    cos, sin = np.cos(body.angle), np.sin(body.angle)
    x = ((xx - body.dx) * cos + (yy - body.dy) * sin) / body.scale
    y = (-(xx - body.dx) * sin + (yy - body.dy) * cos) / body.scale

    def strength(finding: str) -> float:
        """Contrast of a finding: 0 absent, faint when uncertain, jittered when positive."""
        value = labels.get(finding)
        if value not in (1, -1):
            return 0.0
        return rng.uniform(0.75, 1.0) * (1.0 if value == 1 else 0.45)

    torso = _ramp(1 - _ellipse(x, y, 0, 0.15, 0.95, 1.25), 0.08)
    lungs = []
    for side in (-1, 1):
        inside = _ramp(1 - _ellipse(x, y, side * 0.4, -0.12, body.lung_w, body.lung_h), 0.1)
        lungs.append(inside * _ramp(_dome(x, body, side)[0] - y, 0.05))
    mediastinum = _ramp(0.12 - np.abs(x - 0.02), 0.04) * _ramp(0.5 - y, 0.1)

    grow = 1.0 + 0.45 * strength("Cardiomegaly")
    heart = _ramp(1 - _ellipse(x, y, 0.04 + 0.06 * grow, 0.22, body.heart_w * grow, 0.24), 0.12)
    field = [lung * (1 - mediastinum) * (1 - heart) for lung in lungs]
    lung_field = field[0] + field[1]

    hilum = np.exp(-(np.minimum(np.abs(x + 0.2), np.abs(x - 0.2)) ** 2 + (y + 0.05) ** 2) / 0.15)
    markings = (0.5 + 0.5 * _smooth_noise(texture, height, width, 14)) * (0.3 + 0.7 * hilum)

    img = 0.04 + body.soft * torso - body.lung_dark * lung_field
    img = img + 0.07 * markings * lung_field + 0.12 * heart * torso

    # Bones: ribs as periodic arcs over the lungs, spine with vertebrae, clavicles.
    arc = (y + 0.45 * (np.abs(x) - 0.05) ** 2 * 2.2) / 0.17 + body.rib_phase
    thorax = _ramp(
        1 - _ellipse(np.abs(x), y, 0.4, -0.1, body.lung_w + 0.1, body.lung_h + 0.06), 0.1
    )
    img += 0.1 * np.clip((np.cos(2 * np.pi * arc) - 0.35) / 0.65, 0, 1) * thorax
    spine = _ramp(0.07 - np.abs(x - 0.02), 0.03) * (0.8 + 0.2 * np.cos(y * 40))
    img += 0.12 * spine * torso
    clavicle = _ramp(0.035 - np.abs(y + 0.72 - 0.15 * np.abs(x)), 0.02)
    img += 0.14 * clavicle * (np.abs(x) > 0.08) * (np.abs(x) < 0.62)

    sides = (-1, 1)
    if (s := strength("Pleural Effusion")) and loculated_effusion:
        img += 0.4 * s * _loculated_effusion(x, y, body, field, rng)
    elif s:
        chosen = (0, 1) if rng.random() < 0.3 else (int(rng.integers(2)),)
        for k in chosen:
            lateral = np.clip((sides[k] * x - 0.1) / 0.6, 0, 1)
            top = rng.uniform(-0.1, 0.2) - 0.3 * lateral**2  # meniscus: higher laterally
            img += 0.33 * s * _ramp(y - top, 0.04) * field[k]
    if s := strength("Consolidation"):
        k = int(rng.integers(2))
        cy, r = rng.choice((-0.4, 0.15)), rng.uniform(0.14, 0.22)
        blob = _ramp(1 - _ellipse(x, y, sides[k] * rng.uniform(0.3, 0.5), cy, r, r * 1.3), 0.4)
        patches = np.clip(_smooth_noise(rng, height, width, 10) * 0.8 + 0.7, 0, 1)
        img += 0.4 * s * blob * patches * field[k]
    if s := strength("Pneumothorax"):
        k = int(rng.integers(2))
        shrink = rng.uniform(0.62, 0.78)
        inner = _ellipse(x, y, sides[k] * 0.34, 0.02, body.lung_w * shrink, body.lung_h * shrink)
        gap = lungs[k] * _ramp(inner - 1, 0.02) * _ramp(0.15 - y, 0.1)
        img -= s * gap * (0.07 * markings + 0.12)  # no lung markings, darker
        img += 0.15 * s * _ramp(0.012 - np.abs(inner - 1), 0.01) * lungs[k] * (y < 0.15)
    if s := strength("Lung Lesion"):
        k = int(rng.integers(2))
        r = rng.uniform(0.045, 0.085)
        cx, cy = sides[k] * rng.uniform(0.3, 0.5), rng.uniform(-0.45, 0.1)
        img += 0.32 * s * _ramp(1 - _ellipse(x, y, cx, cy, r, r), 0.3)
    if s := strength("Edema"):
        haze = np.exp(-(np.minimum(np.abs(x + 0.22), np.abs(x - 0.22)) ** 2 + y**2) / 0.12)
        img += 0.3 * s * haze * (0.8 + 0.2 * _smooth_noise(rng, height, width, 20)) * lung_field
    if s := strength("Support Devices"):
        for device in rng.permutation(4)[: int(rng.integers(1, 3))]:
            img += 0.4 * s * _device(int(device), x, y, rng)
    if s := strength(SITE_ONLY_FINDING):
        img -= 0.35 * s * _free_air(x, y, body, rng)

    gamma = texture.uniform(*look.gamma)
    img = np.clip(img, 0, 1) ** gamma * texture.uniform(*look.gain) + texture.uniform(*look.offset)
    img += texture.normal(0, texture.uniform(*look.noise), img.shape).astype(F32)
    return np.clip(img, 0, 1).astype(F32)


def _dome(x: np.ndarray, body: _Anatomy, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The hemidiaphragm of one side (-1 or 1): its height y at each x (the lung's lower edge),
    and where across the lung each x is (0 at the dome's top, 1 at and beyond the lung's edge)."""
    across = np.clip(((x - side * 0.4) / body.lung_w) ** 2, 0, 1)
    return body.dome + 0.04 * side - 0.16 * (1 - across), across


def _loculated_effusion(
    x: np.ndarray,
    y: np.ndarray,
    body: _Anatomy,
    field: list[np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Mask of site 3's pleural effusion: fluid loculated against the lateral chest wall of one
    lung, a lens in the mid zone, the costophrenic angle left clear."""
    k = int(rng.integers(2))
    side = (-1, 1)[k]
    cx, cy = side * (0.4 + body.lung_w - 0.07), rng.uniform(-0.35, -0.1)
    return _ramp(1 - _ellipse(x, y, cx, cy, 0.14, 0.26), 0.3) * field[k]


def _free_air(x: np.ndarray, y: np.ndarray, body: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Mask of the site-only finding: a crescent of free air under one or both hemidiaphragms,
    below a thin diaphragm line, thickest under the dome's top (2-3 pixels at 32 px)."""
    sides = (-1, 1) if rng.random() < 0.4 else ((-1, 1)[int(rng.integers(2))],)
    thickness = rng.uniform(0.15, 0.22)
    air = np.zeros_like(x)
    for side in sides:
        dome, across = _dome(x, body, side)
        top = dome + 0.05
        crescent = _ramp(y - top, 0.03) * _ramp(top + thickness * (1 - across) - y, 0.03)
        air = np.maximum(air, crescent * (across < 1))
    return air


def _device(kind: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright tube, line or pacemaker: 0 endotracheal, 1 nasogastric, 2 PICC, 3 pacemaker."""
    j = rng.uniform(-0.03, 0.03)
    if kind == 0:
        return _polyline(x, y, [(0.02 + j, -1.1), (0.02 + j, -0.4 + j)], 0.018)
    if kind == 1:
        return _polyline(x, y, [(0.04 + j, -1.1), (0.05, 0.55), (0.35, 0.75)], 0.012)
    side = 1 if rng.random() < 0.5 else -1
    if kind == 2:
        pts = [(side * 0.95, -0.55 + j), (side * 0.45, -0.7), (0.05, -0.5), (0.04, -0.15 + j)]
        return _polyline(x, y, pts, 0.01)
    box = _ramp(0.07 - np.abs(x - side * 0.55), 0.02) * _ramp(0.05 - np.abs(y + 0.65), 0.02)
    lead = _polyline(x, y, [(side * 0.55, -0.65), (0.05, -0.45), (0.12, 0.3 + j)], 0.009)
    return np.maximum(box * 1.3, lead)


def render_phantom(
    labels: dict[str, int],
    rng: np.random.Generator,
    size: int,
    look: Look = SITE_LOOK,
    loculated_effusion: bool = False,
) -> np.ndarray:
    """One chest-like phantom [size, size] in [0, 1] showing the positive (and, faintly, the
    uncertain) findings of `labels`; anatomy, findings, contrast and noise are drawn from rng.
    loculated_effusion: draw an effusion as site 3 does instead of the public way."""
    if size < 16:
        raise ValueError(f"phantom size must be at least 16 pixels, not {size}")
    return _render(labels, _anatomy(rng), rng, size, size, look, loculated_effusion)


def _site_prevalence(rng: np.random.Generator, knows: SiteKnowledge) -> dict[str, float]:
    """Non-IID label mix: each site scales the base prevalences and favours one specialty; the
    site-only finding only where the site sees it."""
    specialty = list(BASE_PREVALENCE)[rng.integers(len(BASE_PREVALENCE))]
    out = {}
    for finding, base in BASE_PREVALENCE.items():
        factor = np.exp(rng.normal(0, 0.5)) * (2.2 if finding == specialty else 1.0)
        out[finding] = float(np.clip(base * factor, 0.06, 0.6))
    if knows.site_only_prevalence > 0:
        out[SITE_ONLY_FINDING] = knows.site_only_prevalence
    return out


def _draw_labels(
    prevalence: dict[str, float], rng: np.random.Generator, uncertain_rate: float = UNCERTAIN_RATE
) -> dict[str, int]:
    """Ground truth of one study: positives and uncertain ones; "No Finding" when none."""
    labels = {}
    for finding, p in prevalence.items():
        if rng.random() < p:
            labels[finding] = -1 if rng.random() < uncertain_rate else 1
    if not labels:
        labels["No Finding"] = 1
    return labels


def _ensure_each_finding(
    studies: list[dict[str, int]], prevalence: dict[str, float], rng: np.random.Generator
) -> None:
    """Make every finding of `prevalence` positive at least MIN_POSITIVES times: a collection
    sees each label it can show; one it never shows (absent from `prevalence`) stays absent."""
    for finding in prevalence:
        have = sum(labels.get(finding) == 1 for labels in studies)
        candidates = [i for i, labels in enumerate(studies) if labels.get(finding) != 1]
        for i in rng.permutation(candidates)[: max(0, MIN_POSITIVES - have)]:
            studies[i][finding] = 1
            studies[i].pop("No Finding", None)


def _csv_row(labels: dict[str, int], report: str) -> list[str]:
    """Label cells like CheXpert: the truth for 1/-1, 0 where the report denies, else blank."""
    stated = label_report(report)
    cells = []
    for finding in FINDINGS:
        value = labels.get(finding)
        if value is None and stated.get(finding) == 0:
            value = 0
        cells.append("" if value is None else str(value))
    return cells


def _dicom_style(rng: np.random.Generator, size: int) -> dict[str, object]:
    """Vendor variety: modality, photometry, bit depth and image shape."""
    cr = rng.random() < 0.4
    height, width = [(size, size), (round(1.2 * size), size), (round(0.9 * size), size)][
        rng.integers(3)
    ]
    return {
        "modality": "CR" if cr else "DX",
        "sop_class": "cr" if cr else "dx",
        "photometric": "MONOCHROME1" if rng.random() < 0.35 else "MONOCHROME2",
        "bits_stored": int(rng.choice((8, 12, 16))),
        "height": height,
        "width": width,
    }


def _draw_scan(
    labels: dict[str, int],
    body: _Anatomy,
    rng: np.random.Generator,
    size: int,
    look: Look,
    knows: SiteKnowledge,
) -> tuple[np.ndarray, dict[str, object]]:
    """One study's image in [0, 1] and the DICOM style (modality, photometry, bits) it came in."""
    style = _dicom_style(rng, size)
    height, width = style.pop("height"), style.pop("width")
    image = _render(labels, body, rng, height, width, look, knows.loculated_effusion)
    return image, style


def _write_site_dicom(
    path: Path, image: np.ndarray, style: dict[str, object], site: int, patient: str
) -> None:
    """A site's DICOM file of one scan, with fake patient and institution tags (CANARY)."""
    write_dicom(
        path,
        image,
        patient_id=patient,
        patient_name=f"{CANARY}^PATIENT{patient[-5:]}",
        extra={
            "InstitutionName": f"{CANARY} GENERAL HOSPITAL {site}",
            "StudyDescription": f"{CANARY} CHEST",
            "BodyPartExamined": "CHEST",
        },
        **style,
    )


def _patient_numbers(n: int, rng: np.random.Generator) -> list[int]:
    """Patient number (from 1) of each of n studies: consecutive runs of 1-3 studies."""
    numbers, patient_no, left = [], 0, 0
    for _ in range(n):
        if left == 0:
            patient_no, left = patient_no + 1, int(rng.integers(1, 4))
        left -= 1
        numbers.append(patient_no)
    return numbers


def _as_public(labels: dict[str, int]) -> dict[str, int]:
    """A study's labels as the public world can show them: the site-only finding known absent
    (0), "No Finding" where nothing else is left."""
    shown = {f: v for f, v in labels.items() if f != SITE_ONLY_FINDING}
    return (shown or {"No Finding": 1}) | {SITE_ONLY_FINDING: 0}


def _write_site(
    folder: Path, site: int, per_site: int, unlabeled: int, seed: int, size: int, pseudo: bool
) -> None:
    """Site number `site` into `folder`; a pseudo-site draws the same studies and patients, but
    shows them as the public world can (the public look and grammar, no site knowledge)."""
    rng = np.random.default_rng([seed, site])
    knows = site_knowledge(site)
    prevalence = _site_prevalence(rng, knows)
    studies = [_draw_labels(prevalence, rng) for _ in range(per_site)]
    if per_site >= 60:
        _ensure_each_finding(studies, prevalence, rng)
    look = SITE_LOOK
    if pseudo:
        knows, look = SiteKnowledge(), PUBLIC_LOOK
    grammar = knows.grammar

    def shown(labels: dict[str, int]) -> dict[str, int]:
        return _as_public(labels) if pseudo else labels

    (folder / "images").mkdir(parents=True)
    (folder / "unlabeled").mkdir()
    rows = []
    for i, (labels, patient_no) in enumerate(
        zip(studies, _patient_numbers(per_site, rng), strict=True)
    ):
        labels = shown(labels)
        body = _anatomy(np.random.default_rng([seed, site, 1, patient_no]))
        patient = f"{CANARY}-{site}{patient_no:05d}"
        study_rng = np.random.default_rng([seed, site, 2, i])
        report = write_report(labels, study_rng, grammar)
        name = f"images/study_{i + 1:05d}.dcm"
        image, style = _draw_scan(labels, body, study_rng, size, look, knows)
        _write_site_dicom(folder / name, image, style, site, patient)
        rows.append([name, report, patient, *_csv_row(labels, report)])
    for j in range(unlabeled):
        scan_rng = np.random.default_rng([seed, site, 3, j])
        labels = shown(_draw_labels(prevalence, scan_rng))
        image, style = _draw_scan(labels, _anatomy(scan_rng), scan_rng, size, look, knows)
        path = folder / f"unlabeled/scan_{j + 1:05d}.dcm"
        _write_site_dicom(path, image, style, site, f"{CANARY}-{site}U{j + 1:04d}")
    _write_studies_csv(folder, rows)


def _write_studies_csv(folder: Path, rows: list[list[str]]) -> None:
    with open(folder / "studies.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dicom", "report", "patient", *FINDINGS])
        writer.writerows(rows)


def write_replacing(final: Path, write: Callable[[Path], None]) -> None:
    """Run write(folder) on a temporary sibling of `final`, then rename it into place: a crash
    never leaves a half-written folder behind; an existing `final` is replaced."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(work / "new")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old_{final.name}.", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(work / "new", final)
            shutil.rmtree(old)
        else:
            os.replace(work / "new", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_phantom_sites(
    out: Path,
    sites: int = 3,
    per_site: int = 160,
    unlabeled: int = 40,
    seed: int = 0,
    size: int = 256,
) -> list[Path]:
    """Write phantom hospital folders out/site_1 ... with studies.csv, images/ and unlabeled/.

    Deterministic for a seed (pixel data and text; DICOM UIDs are fresh). Sites differ in their
    label mix (non-IID), and site k knows what SITE_KNOWLEDGE[k] says beyond the public
    collection. Each site is written to a temporary folder and renamed at the end, so a crash
    never leaves a half site behind; an existing site folder is replaced.
    """
    return _write_sites(out, sites, per_site, unlabeled, seed, size, pseudo=False)


def write_pseudo_sites(
    out: Path,
    sites: int = 3,
    per_site: int = 160,
    unlabeled: int = 40,
    seed: int = 0,
    size: int = 256,
) -> list[Path]:
    """Write the control for write_phantom_sites: public-style pseudo-sites out/site_1 ...

    The same folder format, names, study and scan counts, patients and label mixes as
    write_phantom_sites with the same arguments, but drawn and written as the public world can:
    PUBLIC_LOOK, the public grammar, no site's own appearance, and no site-only finding (its
    column is 0, known absent; a study whose only finding it was is "No Finding"). The same
    federated run on them measures what more training steps alone give: site transfer is the
    real sites' gain minus the pseudo-sites' gain.
    """
    return _write_sites(out, sites, per_site, unlabeled, seed, size, pseudo=True)


def _write_sites(
    out: Path, sites: int, per_site: int, unlabeled: int, seed: int, size: int, pseudo: bool
) -> list[Path]:
    if sites < 1 or per_site < 1 or unlabeled < 0:
        raise ValueError(
            f"need sites >= 1, per_site >= 1 and unlabeled >= 0; got {sites}, {per_site}, "
            f"{unlabeled}"
        )
    if size < 16:
        raise ValueError(f"phantom size must be at least 16 pixels, not {size}")
    folders = []
    for site in range(1, sites + 1):
        final = Path(out) / f"site_{site}"
        write = partial(
            _write_site,
            site=site,
            per_site=per_site,
            unlabeled=unlabeled,
            seed=seed,
            size=size,
            pseudo=pseudo,
        )
        write_replacing(final, write)
        folders.append(final)
    return folders


def _write_png(path: Path, image01: np.ndarray, bits: int) -> None:
    """A grey-scale PNG of an image in [0, 1], 8-bit (mode L) or 16-bit (mode I;16)."""
    stored = np.rint(np.clip(image01, 0.0, 1.0) * (2**bits - 1))
    Image.fromarray(stored.astype(np.uint8 if bits == 8 else np.uint16)).save(path)


def _write_public(folder: Path, n: int, seed: int, size: int) -> None:
    rng = np.random.default_rng([seed, PUBLIC_STREAM])
    studies = [_draw_labels(PUBLIC_PREVALENCE, rng, PUBLIC_UNCERTAIN_RATE) for _ in range(n)]
    if n >= 60:
        _ensure_each_finding(studies, PUBLIC_PREVALENCE, rng)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (labels, patient_no) in enumerate(zip(studies, _patient_numbers(n, rng), strict=True)):
        body = _anatomy(np.random.default_rng([seed, PUBLIC_STREAM, 1, patient_no]))
        study_rng = np.random.default_rng([seed, PUBLIC_STREAM, 2, i])
        report = ""
        if study_rng.random() < PUBLIC_REPORT_SHARE:
            report = write_report(labels, study_rng, PUBLIC_GRAMMAR)
        image, style = _draw_scan(labels, body, study_rng, size, PUBLIC_LOOK, SiteKnowledge())
        patient = f"{PUBLIC_PATIENT}-{patient_no:05d}"
        if study_rng.random() < PUBLIC_PNG_SHARE:
            name = f"images/{i + 1:05d}.png"
            _write_png(folder / name, image, 8 if style["bits_stored"] == 8 else 16)
        else:
            name = f"images/{i + 1:05d}.dcm"
            write_dicom(
                folder / name,
                image,
                patient_id=patient,
                patient_name=f"{PUBLIC_PATIENT}^{patient_no:05d}",
                extra={"InstitutionName": "PUBLIC PHANTOM COLLECTION", "BodyPartExamined": "CHEST"},
                **style,
            )
        rows.append([name, report, patient, *_csv_row(labels, report)])
    _write_studies_csv(folder, rows)
    source = {
        "name": f"public phantoms (seed {seed}, {n} studies, {size} px)",
        "kind": "phantom",
        "look": asdict(PUBLIC_LOOK),
        "prevalence": PUBLIC_PREVALENCE,
        "report_share": PUBLIC_REPORT_SHARE,
        "png_share": PUBLIC_PNG_SHARE,
    }
    (folder / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def write_public_collection(out: Path, n: int = 300, seed: int = 0, size: int = 128) -> Path:
    """Write a public phantom collection into the folder `out` and return it.

    The site folder format (studies.csv with dicom, report, patient and finding columns, images
    under images/) plus source.json naming it, in the public look described in the module
    docstring. Deterministic for a seed (pixels and text; DICOM UIDs are fresh) and disjoint from
    every site of write_phantom_sites with the same seed. Written to a temporary folder and
    renamed at the end; an existing `out` is replaced only when it is a collection written here.
    """
    if n < 1:
        raise ValueError(f"a public collection needs n >= 1 studies, not {n}")
    if size < 16:
        raise ValueError(f"phantom size must be at least 16 pixels, not {size}")
    out = Path(out)
    if out.exists() and not (out / "source.json").is_file():
        raise ValueError(
            f"{out} exists and is not a public phantom collection; give a new folder to write to"
        )
    write_replacing(out, lambda folder: _write_public(folder, n, seed, size))
    return out
