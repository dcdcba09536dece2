"""NIfTI data layer: discover sites, validate files, preprocess volumes, split by case, slice.

Supported layouts (``data.layout``):

* ``liu`` - Liu et al. multi-site prostate: ``ROOT/SITE/CaseXX.nii.gz`` beside
  ``ROOT/SITE/CaseXX_segmentation.nii.gz`` (``_Segmentation`` accepted). Each folder is a site.
* ``msd`` - Medical Segmentation Decathlon (Task05_Prostate): ``ROOT/imagesTr/*.nii.gz`` and
  ``ROOT/labelsTr/*.nii.gz`` of the same name; the whole set is one site named after ROOT.
  Images may be 4D (``data.msd_channel`` selects the modality); label > 0 is gland.
* ``manifest`` - a YAML list (or ``cases:`` list) of ``{site, image, label[, case]}`` or a CSV
  with the header ``site,image,label[,case]``; relative paths are relative to the manifest.

Preprocessing (MONAI dictionary transforms, after a validating nibabel read): channel-first,
orientation RAS, in-plane resampling to ``data.spacing`` (slice spacing kept), percentile
clipping and scaling to [0, 1], centre crop/pad to ``data.size``. A volume becomes
:class:`CaseVolume` with ``image`` of shape (D, H, W) float32 and ``label`` (D, H, W) uint8,
D being the number of axial slices. Splits by case are :mod:`common.splits`; 2D / 2.5D slices
:mod:`common.slices`.

Every problem with the files raises :class:`DataError` naming the file and the cause.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import nibabel as nib
import numpy as np
import torch
import yaml

from common.config import DataConfig, proxy_set_paths

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEG_RE = re.compile(r"_segmentation$", re.IGNORECASE)


class DataError(ValueError):
    """A data file or folder is unusable. The message names the file (or site) and the cause."""


@dataclass(frozen=True)
class CaseRecord:
    """One image/label pair on disk."""

    site: str
    case_id: str
    image: Path
    label: Optional[Path]


@dataclass
class CaseVolume:
    """One preprocessed case. ``image``: (D, H, W) float32 in [0, 1]; ``label``: (D, H, W) uint8
    (or None for unlabeled data); ``spacing``: (sx, sy, sz) mm of the preprocessed grid."""

    site: str
    case_id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: tuple[float, float, float]
    source: Path = field(default_factory=Path)

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


def nifti_stem(path: Path) -> str:
    """File name without .nii / .nii.gz (the case id)."""
    name = path.name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------
def discover_liu_site(folder: Path, require_labels: bool = True) -> list[CaseRecord]:
    """Cases of one Liu-layout site folder, sorted by case id."""
    if not folder.is_dir():
        raise DataError(f"{folder}: site folder not found")
    files = sorted(p for p in folder.iterdir() if _is_nifti(p))
    labels = {_SEG_RE.sub("", nifti_stem(p)): p for p in files if _SEG_RE.search(nifti_stem(p))}
    images = [p for p in files if not _SEG_RE.search(nifti_stem(p))]
    cases = []
    for img in images:
        cid = nifti_stem(img)
        lab = labels.pop(cid, None)
        if lab is None and require_labels:
            raise DataError(f"{img}: image without label (expected {cid}_segmentation.nii.gz "
                            f"beside it)")
        cases.append(CaseRecord(folder.name, cid, img, lab))
    if labels:
        orphan = next(iter(labels.values()))
        stem = _SEG_RE.sub("", nifti_stem(orphan))
        raise DataError(f"{orphan}: label without image (expected {stem}"
                        f".nii.gz beside it)")
    if not cases:
        raise DataError(f"{folder}: empty site: no NIfTI images (*.nii, *.nii.gz) found")
    return cases


def discover_msd(root: Path) -> list[CaseRecord]:
    """Cases of a Decathlon task folder (imagesTr/ + labelsTr/); hidden ``._*`` files ignored."""
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found (MSD layout needs imagesTr/ and labelsTr/)")
    cases = []
    for img in sorted(p for p in img_dir.iterdir() if _is_nifti(p)):
        lab = lab_dir / img.name
        if not lab.is_file():
            raise DataError(f"{img}: image without label (expected {lab})")
        cases.append(CaseRecord(root.name, nifti_stem(img), img, lab))
    if not cases:
        raise DataError(f"{img_dir}: empty site: no NIfTI images found")
    return cases


def discover_manifest(path: Path) -> list[CaseRecord]:
    """Cases listed in a YAML or CSV manifest (columns/keys: site, image, label[, case])."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            loaded = yaml.safe_load(path.read_text())
            rows = loaded.get("cases") if isinstance(loaded, dict) else loaded
    except (yaml.YAMLError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: manifest lists no cases (expected a list of site/image/label)")
    cases = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("image") or not row.get("site"):
            raise DataError(f"{path}: entry {i}: needs 'site' and 'image' (and 'label')")
        img = (path.parent / str(row["image"])).resolve()
        lab = (path.parent / str(row["label"])).resolve() if row.get("label") else None
        cid = str(row.get("case") or nifti_stem(img))
        cases.append(CaseRecord(str(row["site"]), cid, img, lab))
    return cases


def discover_sites(cfg: DataConfig) -> dict[str, list[CaseRecord]]:
    """All labeled sites of a dataset, ``{site: [CaseRecord]}``, restricted to ``cfg.sites``."""
    root = Path(cfg.root)
    if cfg.layout == "liu":
        if not root.is_dir():
            raise DataError(f"{root}: data root not found (run `fedkd synth --out {root}` for "
                            f"synthetic data)")
        folders = site_folders(cfg)
        if not folders:
            raise DataError(f"{root}: no site folders found")
        names = [f.name for f in folders]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"data.sites: two site folders are named {twice[0]!r} (a site's "
                            f"name is its folder's name)")
        return {f.name: discover_liu_site(f) for f in folders}
    if cfg.layout == "msd":
        cases = discover_msd(root)
        return {cases[0].site: cases}
    assert cfg.manifest is not None  # checked by the config
    by_site: dict[str, list[CaseRecord]] = {}
    for rec in discover_manifest(Path(cfg.manifest)):
        by_site.setdefault(rec.site, []).append(rec)
    if cfg.sites:
        missing = [s for s in cfg.sites if s not in by_site]
        if missing:
            raise DataError(f"{cfg.manifest}: site {missing[0]!r} not in the manifest "
                            f"(sites: {', '.join(sorted(by_site))})")
        by_site = {s: by_site[s] for s in cfg.sites}
    return by_site


def site_folders(cfg: DataConfig) -> list[Path]:
    """The Liu-layout site folders in partition order: ``data.sites`` (paths relative to
    ``data.root``, e.g. ``promise12/BIDMC``; a site is named after its folder), or every folder of
    the root except the proxy set's and hidden ones."""
    root = Path(cfg.root)
    if cfg.sites:
        return [root / s for s in cfg.sites]
    proxy = {p.resolve() for p in proxy_set_paths(cfg)}
    return sorted(p for p in root.iterdir() if p.is_dir() and p.resolve() not in proxy
                  and not p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------
def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers
        raise DataError(f"{path}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    return img


def _read_array(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on truncated data
        raise DataError(f"{path}: unreadable or truncated image data "
                        f"({type(exc).__name__}: {exc})") from None


def read_case(rec: CaseRecord, cfg: DataConfig, require_label: bool = True
              ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Read and validate one case: ``(image (X, Y, Z) float32, label (X, Y, Z) uint8, affine)``.

    Raises DataError for a missing/unreadable/truncated file, NaN/inf voxels, a bad dimension,
    an image/label shape or affine mismatch, a non-binary label, or a missing label.
    """
    img_nii = _load_nifti(rec.image)
    img = _read_array(img_nii, rec.image)
    if img.ndim == 4:
        if cfg.msd_channel >= img.shape[3]:
            raise DataError(f"{rec.image}: 4D image has {img.shape[3]} channels; "
                            f"data.msd_channel={cfg.msd_channel} is out of range")
        img = img[..., cfg.msd_channel]
    elif img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise DataError(f"{rec.image}: expected a 3D volume (or 2D / 4D), got shape {img.shape}")
    if not np.isfinite(img).all():
        bad = int((~np.isfinite(img)).sum())
        raise DataError(f"{rec.image}: {bad} NaN/inf voxels")
    affine = np.asarray(img_nii.affine, dtype=np.float64)
    if rec.label is None:
        if require_label:
            raise DataError(f"{rec.image}: image without label")
        return img, None, affine
    lab_nii = _load_nifti(rec.label)
    lab = _read_array(lab_nii, rec.label)
    if lab.ndim == 2:
        lab = lab[..., None]
    if lab.shape != img.shape:
        raise DataError(f"{rec.label}: label shape {lab.shape} does not match image "
                        f"{rec.image.name} shape {img.shape}")
    if not np.allclose(lab_nii.affine, affine, atol=1e-3, rtol=1e-4):
        raise DataError(f"{rec.label}: label affine differs from image {rec.image.name} affine "
                        f"(max difference {np.abs(lab_nii.affine - affine).max():.4g})")
    if not np.isfinite(lab).all():
        raise DataError(f"{rec.label}: NaN/inf voxels in label")
    mode = cfg.label_mode if cfg.label_mode != "auto" else (
        "positive" if cfg.layout == "msd" else "binary")
    if mode == "binary":
        values = np.unique(lab)
        if not np.isin(values, (0.0, 1.0)).all():
            shown = ", ".join(f"{v:g}" for v in values[:6])
            raise DataError(f"{rec.label}: non-binary label (values {shown}); set "
                            f"data.label_mode=positive to treat label > 0 as gland")
    return img, (lab > 0).astype(np.uint8), affine


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
PAD_MODES = {"zero": "constant", "edge": "edge", "reflect": "reflect"}   # data.proxy_pad -> numpy


def preprocess_transform(cfg: DataConfig, with_label: bool = True, pad: str = "zero"):
    """The MONAI dictionary pipeline applied to a channel-less (X, Y, Z) volume (+ label);
    ``pad``: how a volume smaller than ``data.size`` is padded (:data:`PAD_MODES`)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    lo, hi = cfg.clip_percentiles
    return Compose([
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=(cfg.spacing[0], cfg.spacing[1], -1.0), mode=modes),
        ScaleIntensityRangePercentilesd("image", lower=lo, upper=hi, b_min=0.0, b_max=1.0,
                                        clip=True),
        ResizeWithPadOrCropd(keys, spatial_size=(cfg.size[0], cfg.size[1], -1),
                             mode=PAD_MODES[pad]),
    ])


def preprocess(img: np.ndarray, lab: Optional[np.ndarray], affine: np.ndarray, cfg: DataConfig,
               source: Path = Path("<array>"), pad: str = "zero"
               ) -> tuple[np.ndarray, Optional[np.ndarray], tuple]:
    """Apply :func:`preprocess_transform`. Returns (image (D,H,W), label (D,H,W), spacing)."""
    from monai.data import MetaTensor

    data = {"image": MetaTensor(torch.from_numpy(img), affine=torch.from_numpy(affine))}
    if lab is not None:
        data["label"] = MetaTensor(torch.from_numpy(lab.astype(np.float32)),
                                   affine=torch.from_numpy(affine))
    try:
        out = preprocess_transform(cfg, lab is not None, pad)(data)
    except Exception as exc:  # MONAI wraps errors in RuntimeError with the transform name
        raise DataError(f"{source}: preprocessing failed ({type(exc).__name__}: {exc})") from None
    image = out["image"][0].permute(2, 0, 1).contiguous().numpy().astype(np.float32)
    label = None
    if lab is not None:
        label = (out["label"][0].permute(2, 0, 1).numpy() > 0.5).astype(np.uint8)
    aff = np.asarray(out["image"].affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    return image, label, spacing


def load_case(rec: CaseRecord, cfg: DataConfig, require_label: bool = True,
              pad: str = "zero") -> CaseVolume:
    img, lab, affine = read_case(rec, cfg, require_label)
    image, label, spacing = preprocess(img, lab, affine, cfg, rec.image, pad)
    return CaseVolume(rec.site, rec.case_id, image, label, spacing, rec.image)


def proxy_key(set_name: str, case_id: str, n_sets: int) -> str:
    """A proxy case's key in slice ids (``KEY/z``): its case id when the proxy is one set, else
    ``SET/case id`` (a set is named after its folder), so cases of two sets never collide."""
    return case_id if n_sets == 1 else f"{set_name}/{case_id}"


def iter_proxy(cfg: DataConfig, with_labels: bool = False,
               folders: Optional[list[Path]] = None, labelled_only: bool = False
               ) -> Iterator[tuple[str, CaseVolume]]:
    """The public proxy set one volume at a time, ``(key, volume)`` in set order then case
    order (keys: :func:`proxy_key`), from the Liu-layout folders ``folders`` (default
    ``data.proxy``: one or several). ``with_labels``: a case's mask is read where its folder
    has one (an unlabelled set is never an error; an unreadable mask is); else no masks are
    read. ``labelled_only``: cases without a mask are skipped unread. Padded as
    ``data.proxy_pad`` says."""
    folders = proxy_set_paths(cfg) if folders is None else folders
    for folder in folders:
        for rec in discover_liu_site(folder, require_labels=False):
            if labelled_only and rec.label is None:
                continue
            if not with_labels:
                rec = CaseRecord(rec.site, rec.case_id, rec.image, None)
            yield proxy_key(folder.name, rec.case_id, len(folders)), load_case(
                rec, cfg, require_label=False, pad=cfg.proxy_pad)


def load_proxy(cfg: DataConfig, with_labels: bool = False,
               folders: Optional[list[Path]] = None) -> dict[str, CaseVolume]:
    """:func:`iter_proxy` held in memory: ``{key: volume}``."""
    return dict(iter_proxy(cfg, with_labels, folders))
