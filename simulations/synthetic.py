"""Synthetic multi-site prostate T2 MRI, written in the Liu et al. layout.

The demo and the tests of a fresh clone need multi-site data that anyone may generate, so
``write_dataset`` writes ``K`` sites and a public proxy set::

    OUT/SiteA/Case00.nii.gz  OUT/SiteA/Case00_segmentation.nii.gz  ...
    OUT/PROXY/Case00.nii.gz  OUT/PROXY/Case00_segmentation.nii.gz  ...  (masks for evaluation only)
    OUT/synth.json  (version, seed, every site's scanner profile and the proxy's scanners)

The shift between sites is physical: what scanners and protocols do, never a change of tissue
contrast order. Every case keeps the order of real T2 (urine brightest; fat, peripheral zone and
seminal vesicles bright; periprostatic tissue a little darker; transition zone intermediate;
muscle and rectal wall dark). A site is a *scanner* (:class:`ScannerProfile`) of one of the
:data:`FAMILIES`: receiver gain and offset, contrast strength (a monotone T2-weighting exponent,
which keeps the order), SNR (Rician noise), a smooth bias field, an endorectal-coil hot spot,
in-plane resolution and field of view, slice thickness, blur, the stored orientation and data
type. A *patient* (:class:`Anatomy`) brings the variation within a site: gland size and shape,
transition-zone enlargement, bladder filling, rectal content (air, fluid or stool) and a small
jitter of every tissue's T2 signal. The proxy set is a public multi-vendor collection: its cases
come from one scanner of each family (jittered apart from the sites' own), so its scanners span
the sites' range.

Realism check (``tests/test_synthetic.py``): the median ratio of gland intensity to a 3-pixel
ring around it after preprocessing (:func:`common.metrics.gland_ring_ratio`) must lie in the
range of the real PROMISE12 centres. Generation is deterministic: a case depends only on (seed,
site index, case index).
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

GENERATOR_VERSION = 2  # bump when a seed's output changes: old datasets are then regenerated
FAMILIES = ("3t_phased_array", "3t_endorectal", "1.5t_low_snr", "thick_slices", "high_res",
            "strong_bias")
PROXY_SITE = "PROXY"


def site_names(n: int) -> list[str]:
    """``SiteA``, ``SiteB``, ... (``SiteAA`` after ``SiteZ``)."""
    letters = string.ascii_uppercase
    out = []
    for i in range(n):
        tag = letters[i % 26] if i < 26 else letters[i // 26 - 1] + letters[i % 26]
        out.append(f"Site{tag}")
    return out


@dataclass
class ScannerProfile:
    """How one scanner and protocol render a patient: acquisition, not anatomy."""

    family: str
    contrast: float         # T2-weighting strength: signal = tissue ** contrast (order kept)
    noise: float            # Rician noise sigma, relative to fat
    bias: float             # amplitude of the smooth multiplicative bias field
    coil: float             # endorectal-coil hot spot gain (0 = none)
    blur: float             # Gaussian PSF sigma in voxels (in-plane)
    matrix: int             # in-plane matrix size (voxels)
    fov: float              # in-plane field of view (mm)
    thickness: float        # slice thickness = slice spacing (mm)
    coverage: float         # z extent (mm)
    scale: float            # receiver gain: stored intensity = scale * signal + offset
    offset: float
    lps: bool               # stored with an LPS (x, y flipped) affine instead of RAS
    int16: bool             # stored as int16 (else float32)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.fov / self.matrix, self.fov / self.matrix, self.thickness)


def make_profile(rng: np.random.Generator, family: str) -> ScannerProfile:
    """A random scanner of the given family."""
    u = rng.uniform
    p = dict(
        family=family, contrast=u(0.9, 1.15), noise=u(0.02, 0.04), bias=u(0.05, 0.2), coil=0.0,
        blur=u(0.0, 0.5), matrix=int(rng.choice([192, 224, 256])), fov=u(140.0, 180.0),
        thickness=u(3.0, 3.6), coverage=u(65.0, 85.0), scale=u(200.0, 3000.0),
        offset=u(0.0, 150.0), lps=bool(rng.random() < 0.5), int16=bool(rng.random() < 0.7),
    )
    if family == "3t_endorectal":
        p.update(coil=u(1.5, 3.0), bias=u(0.0, 0.1), noise=u(0.015, 0.03), fov=u(120.0, 150.0))
    elif family == "1.5t_low_snr":
        p.update(noise=u(0.07, 0.1), contrast=u(0.75, 0.9), thickness=u(3.5, 4.0),
                 matrix=int(rng.choice([160, 192])))
    elif family == "thick_slices":
        p.update(thickness=u(4.0, 5.0), blur=u(1.2, 2.0), matrix=int(rng.choice([128, 160])),
                 fov=u(180.0, 220.0))
    elif family == "high_res":
        p.update(matrix=int(rng.choice([320, 384])), fov=u(120.0, 150.0), thickness=u(2.5, 3.0),
                 contrast=u(1.1, 1.3), noise=u(0.03, 0.05))
    elif family == "strong_bias":
        p.update(bias=u(0.3, 0.45), noise=u(0.03, 0.05))
    return ScannerProfile(**p)


@dataclass
class Tissue:
    """One patient's T2 signal per tissue, relative to fat (~1). The order is that of real T2."""

    fat: float
    muscle: float
    bone: float             # fatty marrow
    periprostatic: float    # fat and venous plexus around the gland
    pz: float               # peripheral zone
    tz: float               # transition zone
    bladder: float          # urine
    seminal: float
    rectum_wall: float
    rectum_lumen: float     # air (dark) to fluid / stool (bright)
    texture: float          # relative amplitude of smooth tissue texture


@dataclass
class Anatomy:
    """One patient's anatomy in millimetres (x: left-right, y: posterior->anterior, z: up)."""

    gland_center: tuple[float, float, float]
    gland_axes: tuple[float, float, float]
    gland_harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, 4
    taper: float
    tz_fraction: float      # transition zone radius / gland radius (enlarges with age)
    bladder_center: tuple[float, float, float]
    bladder_axes: tuple[float, float, float]
    rectum_center: tuple[float, float]
    rectum_axes: tuple[float, float]
    seminal_offset: float
    body_axes: tuple[float, float]
    muscle_x: float
    tissue: Tissue


def make_tissue(rng: np.random.Generator) -> Tissue:
    u = rng.uniform
    fat = u(0.9, 1.0)
    return Tissue(fat=fat, muscle=u(0.18, 0.28), bone=u(0.4, 0.55), periprostatic=u(0.55, 0.72),
                  pz=u(0.75, 0.95), tz=u(0.4, 0.55), bladder=u(1.25, 1.5), seminal=u(0.8, 1.0),
                  rectum_wall=u(0.18, 0.28), rectum_lumen=float(rng.choice(
                      [u(0.02, 0.1), u(0.3, 0.9)])), texture=u(0.05, 0.12))


def make_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    cx, cy, cz = rng.normal(0, 6), rng.normal(0, 6), rng.normal(0, 5)
    size = u(0.8, 1.25)      # gland volume varies several-fold between patients
    ax, ay, az = size * u(17, 25), size * u(13, 19), size * u(14, 22)
    harmonics = tuple((float(u(0.02, 0.1)), float(u(0, 2 * np.pi))) for _ in range(3))
    filling = u(0.6, 1.3)    # bladder filling
    return Anatomy(
        gland_center=(cx, cy, cz), gland_axes=(ax, ay, az), gland_harmonics=harmonics,
        taper=u(0.1, 0.3), tz_fraction=u(0.45, 0.8),
        bladder_center=(cx + rng.normal(0, 3), cy + ay * 0.4 + u(5, 15),
                        cz + az + filling * u(8, 18)),
        bladder_axes=(filling * u(25, 40), filling * u(20, 28), filling * u(18, 26)),
        rectum_center=(cx + rng.normal(0, 3), cy - ay - u(10, 16)),
        rectum_axes=(u(12, 18), u(9, 13)), seminal_offset=u(2, 8),
        body_axes=(u(150, 190), u(100, 130)), muscle_x=ax + u(18, 28), tissue=make_tissue(rng),
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: low-res Gaussian noise, trilinearly upsampled."""
    low = torch.from_numpy(rng.standard_normal((1, 1, cells, cells, max(2, cells // 2))))
    up = F.interpolate(low.float(), size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return (up - up.mean()) / (up.std() + 1e-8)


def _blur_inplane(vol: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along x and y (the PSF); sigma in voxels."""
    if sigma < 0.3:
        return vol
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = torch.from_numpy((k / k.sum()).astype(np.float32))
    t = torch.from_numpy(vol).permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return t[:, 0].permute(1, 2, 0).numpy()


def render_case(profile: ScannerProfile, anat: Anatomy, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one case. Returns ``(image (X, Y, Z) stored dtype, mask (X, Y, Z) uint8, affine)``."""
    sx, sy, sz = profile.spacing
    nx = ny = profile.matrix
    nz = max(8, int(round(profile.coverage / sz)))
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    z = (np.arange(nz) - (nz - 1) / 2) * sz + anat.gland_center[2] * 0.5
    X, Y, Z = np.meshgrid(x.astype(np.float32), y.astype(np.float32), z.astype(np.float32),
                          indexing="ij")

    def ellipsoid(c, a):
        return ((X - c[0]) / a[0]) ** 2 + ((Y - c[1]) / a[1]) ** 2 + ((Z - c[2]) / a[2]) ** 2

    # Gland: deformed, tapered ellipsoid (narrower towards the apex, flattened posteriorly).
    (cx, cy, cz), (ax, ay, az) = anat.gland_center, anat.gland_axes
    u, v, w = (X - cx) / ax, (Y - cy) / ay, (Z - cz) / az
    theta = np.arctan2(v, u)
    radius = 1.0 + sum(a * np.cos((k + 2) * theta + ph)
                       for k, (a, ph) in enumerate(anat.gland_harmonics))
    radius = radius * (1.0 + anat.taper * w) - 0.12 * np.clip(-v, 0, None) ** 2
    rho = np.sqrt(u ** 2 + v ** 2 + w ** 2)
    gland = rho < radius
    tz = np.sqrt(u ** 2 + ((v - 0.3) / 0.8) ** 2 + (w / 0.9) ** 2) < anat.tz_fraction * radius
    peri = (rho < radius * 1.35) & ~gland & (v > -0.6)

    bladder = ellipsoid(anat.bladder_center, anat.bladder_axes) < 1.0
    bladder_wall = (ellipsoid(anat.bladder_center, [a + 3 for a in anat.bladder_axes]) < 1.0) & ~bladder
    rx, ry = anat.rectum_center
    rect_r = ((X - rx) / anat.rectum_axes[0]) ** 2 + ((Y - ry) / anat.rectum_axes[1]) ** 2
    rectum_lumen = rect_r < 0.35
    rectum_wall = (rect_r < 1.0) & ~rectum_lumen
    sv = np.zeros_like(gland)
    for side in (-1, 1):
        c = (cx + side * ax * 0.55, cy - ay * 0.45, cz + az + anat.seminal_offset)
        sv |= ellipsoid(c, (ax * 0.45, 5.0, 7.0)) < 1.0
    bx, by = anat.body_axes
    body_r = (X / bx) ** 2 + ((Y + 10) / by) ** 2
    body = body_r < 1.0
    subcut = body & (body_r > 0.8)
    muscle = np.zeros_like(gland)
    bone = np.zeros_like(gland)
    for side in (-1, 1):
        muscle |= ((X - side * anat.muscle_x) / 11) ** 2 + ((Y - cy) / 30) ** 2 < 1.0
        bone |= ((X - side * (anat.muscle_x + 22)) / 12) ** 2 + ((Y - cy - 5) / 35) ** 2 < 1.0

    t, p = anat.tissue, profile
    sig = np.where(body, t.fat * 0.85, 0.0).astype(np.float32)  # pelvic fat / soft tissue
    for mask, level in ((subcut, t.fat), (muscle, t.muscle), (bone, t.bone),
                        (peri, t.periprostatic), (bladder_wall, t.muscle), (bladder, t.bladder),
                        (sv, t.seminal), (rectum_wall, t.rectum_wall),
                        (rectum_lumen, t.rectum_lumen), (gland, t.pz), (gland & tz, t.tz)):
        sig[mask] = level
    shape = sig.shape
    sig *= 1.0 + t.texture * _smooth_field(rng, shape, 24)
    sig = np.clip(sig, 0, None) ** p.contrast  # T2 weighting: monotone, the order is kept
    sig *= np.clip(1.0 + p.bias * _smooth_field(rng, shape, 3), 0.3, None)
    if p.coil > 0:  # endorectal coil: bright hot spot that decays away from the rectum
        dist = np.sqrt((X - rx) ** 2 + (Y - ry) ** 2)
        sig *= 1.0 + p.coil * np.exp(-dist / 18.0)
    sig = _blur_inplane(np.clip(sig, 0, None).astype(np.float32), p.blur)
    sigma = p.noise * t.fat
    sig = np.sqrt((sig + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    img = p.scale * sig + p.offset
    img = np.clip(np.round(img), -32768, 32767).astype(np.int16) if p.int16 else img.astype(np.float32)

    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    mask = gland.astype(np.uint8)
    if p.lps:  # same anatomy stored with flipped x and y axes (as DICOM-derived files often are)
        img, mask = img[::-1, ::-1].copy(), mask[::-1, ::-1].copy()
        affine = np.diag([-sx, -sy, sz, 1.0])
        affine[:3, 3] = [x[-1], y[-1], z[0]]
    return img, mask, affine


def _write_case(folder: Path, case_id: str, img: np.ndarray, mask: np.ndarray,
                affine: np.ndarray) -> None:
    img_nii = nib.Nifti1Image(img, affine)
    img_nii.header.set_xyzt_units("mm", "sec")
    nib.save(img_nii, folder / f"{case_id}.nii.gz")
    seg = nib.Nifti1Image(mask, affine)
    seg.header.set_xyzt_units("mm", "sec")
    nib.save(seg, folder / f"{case_id}_segmentation.nii.gz")


def site_profiles(n_sites: int, seed: int) -> list[ScannerProfile]:
    """The scanners of sites 0..n-1: families in turn, jittered by (seed, site index)."""
    return [make_profile(np.random.default_rng([seed, i, 0]), FAMILIES[i % len(FAMILIES)])
            for i in range(n_sites)]


def proxy_profiles(seed: int) -> list[ScannerProfile]:
    """The public proxy set's scanners: one of each family, jittered apart from the sites'."""
    return [make_profile(np.random.default_rng([seed, 10_000, i]), f)
            for i, f in enumerate(FAMILIES)]


def write_dataset(out: str | Path, n_sites: int = 6, n_cases: int = 20, n_proxy: int = 20,
                  seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Generate ``n_sites`` sites of ``n_cases`` cases and a proxy set of ``n_proxy`` cases
    (case ``c`` of the proxy set comes from proxy scanner ``c mod len(FAMILIES)``).

    Returns the manifest written to ``OUT/synth.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = site_names(n_sites)
    profiles = site_profiles(n_sites, seed)
    t0 = time.perf_counter()
    manifest = {"version": GENERATOR_VERSION, "seed": seed, "cases": n_cases,
                "proxy_cases": n_proxy, "sites": {}}
    for i, (name, prof) in enumerate(zip(names, profiles)):
        folder = out / name
        folder.mkdir(exist_ok=True)
        for c in range(n_cases):
            rng = np.random.default_rng([seed, i, c + 1])
            img, mask, aff = render_case(prof, make_anatomy(rng), rng)
            _write_case(folder, f"Case{c:02d}", img, mask, aff)
        manifest["sites"][name] = asdict(prof)
        log(f"[synth] {name:8s} scanner={prof.family:15s} spacing="
            f"{'x'.join(f'{s:.2f}' for s in prof.spacing)} mm  {n_cases} cases  "
            f"({time.perf_counter() - t0:.1f}s)")
    if n_proxy:
        folder = out / PROXY_SITE
        folder.mkdir(exist_ok=True)
        scanners = proxy_profiles(seed)
        for c in range(n_proxy):
            rng = np.random.default_rng([seed, 10_000, 100 + c])
            img, mask, aff = render_case(scanners[c % len(scanners)], make_anatomy(rng), rng)
            _write_case(folder, f"Case{c:02d}", img, mask, aff)
        manifest["proxy_scanners"] = [asdict(p) for p in scanners]
        log(f"[synth] {PROXY_SITE:8s} {len(scanners)} scanners (one per family), {n_proxy} cases "
            f"({time.perf_counter() - t0:.1f}s)")
    (out / "synth.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def existing_matches(out: str | Path, n_sites: int, n_cases: int, n_proxy: int, seed: int) -> bool:
    """True if ``out/synth.json`` records a dataset generated with exactly these settings."""
    path = Path(out) / "synth.json"
    if not path.is_file():
        return False
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (m.get("version") == GENERATOR_VERSION and m.get("seed") == seed
            and m.get("cases") == n_cases
            and m.get("proxy_cases") == n_proxy and list(m.get("sites", {})) == site_names(n_sites))
