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
D being the number of axial slices. :class:`SliceDataset` serves 2D (or 2.5D) slices and keeps
every slice's site, case id and index.

Every problem with the files raises :class:`DataError` naming the file and the cause.
"""

from __future__ import annotations

import csv
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import nibabel as nib
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from common.config import DataConfig

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


def proxy_dir(cfg: DataConfig) -> Path:
    p = Path(cfg.proxy)
    return p if p.is_absolute() else Path(cfg.root) / p


def site_folders(cfg: DataConfig) -> list[Path]:
    """The Liu-layout site folders in partition order: ``data.sites`` (paths relative to
    ``data.root``, e.g. ``promise12/BIDMC``; a site is named after its folder), or every folder of
    the root except the proxy set's and hidden ones."""
    root = Path(cfg.root)
    if cfg.sites:
        return [root / s for s in cfg.sites]
    proxy = proxy_dir(cfg).resolve()
    return sorted(p for p in root.iterdir() if p.is_dir() and p.resolve() != proxy
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
def preprocess_transform(cfg: DataConfig, with_label: bool = True):
    """The MONAI dictionary pipeline applied to a channel-less (X, Y, Z) volume (+ label)."""
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
        ResizeWithPadOrCropd(keys, spatial_size=(cfg.size[0], cfg.size[1], -1)),
    ])


def preprocess(img: np.ndarray, lab: Optional[np.ndarray], affine: np.ndarray, cfg: DataConfig,
               source: Path = Path("<array>")) -> tuple[np.ndarray, Optional[np.ndarray], tuple]:
    """Apply :func:`preprocess_transform`. Returns (image (D,H,W), label (D,H,W), spacing)."""
    from monai.data import MetaTensor

    data = {"image": MetaTensor(torch.from_numpy(img), affine=torch.from_numpy(affine))}
    if lab is not None:
        data["label"] = MetaTensor(torch.from_numpy(lab.astype(np.float32)),
                                   affine=torch.from_numpy(affine))
    try:
        out = preprocess_transform(cfg, lab is not None)(data)
    except Exception as exc:  # MONAI wraps errors in RuntimeError with the transform name
        raise DataError(f"{source}: preprocessing failed ({type(exc).__name__}: {exc})") from None
    image = out["image"][0].permute(2, 0, 1).contiguous().numpy().astype(np.float32)
    label = None
    if lab is not None:
        label = (out["label"][0].permute(2, 0, 1).numpy() > 0.5).astype(np.uint8)
    aff = np.asarray(out["image"].affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    return image, label, spacing


def load_case(rec: CaseRecord, cfg: DataConfig, require_label: bool = True) -> CaseVolume:
    img, lab, affine = read_case(rec, cfg, require_label)
    image, label, spacing = preprocess(img, lab, affine, cfg, rec.image)
    return CaseVolume(rec.site, rec.case_id, image, label, spacing, rec.image)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def _group_of(case_id: str, pattern: Optional[str]) -> str:
    if not pattern:
        return case_id
    m = re.match(pattern, case_id)
    return m.group(1) if m and m.groups() else case_id


def split_cases(records: list[CaseRecord], cfg: DataConfig, group_pattern: Optional[str] = None
                ) -> dict[str, list[CaseRecord]]:
    """Deterministic train/val/test split *by case* (or by patient via ``group_pattern``, a regex
    whose first group is the patient id; default ``cfg.group_pattern``). Depends only on the
    seed, the site and the case ids. With ``cfg.folds`` = k >= 2, fold ``cfg.fold`` of a k-fold
    partition is the test split (:func:`_fold_split`)."""
    group_pattern = group_pattern or cfg.group_pattern
    if not records:
        raise DataError("empty site: no cases to split")
    site = records[0].site
    groups = sorted({_group_of(r.case_id, group_pattern) for r in records})
    rng = np.random.default_rng([cfg.seed, zlib.crc32(site.encode())])
    order = [groups[i] for i in rng.permutation(len(groups))]
    n = len(order)
    frac = cfg.split
    if cfg.folds:
        return _fold_split(records, order, cfg, group_pattern)
    n_test = int(round(n * frac.test))
    n_val = int(round(n * frac.val))
    if frac.test > 0:
        n_test = max(1, n_test)
    if frac.val > 0:
        n_val = max(1, n_val)
    if n - n_test - n_val < 1:
        raise DataError(f"site {site}: {n} case(s) are too few for split train/val/test = "
                        f"{frac.train}/{frac.val}/{frac.test} (each non-zero split needs >= 1)")
    which = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train"
             for i, g in enumerate(order)}
    out: dict[str, list[CaseRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        out[which[_group_of(r.case_id, group_pattern)]].append(r)
    return out


def _fold_split(records: list[CaseRecord], order: list[str], cfg: DataConfig,
                group_pattern: Optional[str]) -> dict[str, list[CaseRecord]]:
    """k-fold split: the permuted groups ``order`` in ``cfg.folds`` near-equal folds; fold
    ``cfg.fold`` is the test split, the others are divided into val and train by the ratio of
    ``split.val`` to ``split.train`` (val first in permuted order)."""
    site, k, n = records[0].site, cfg.folds, len(order)
    frac = cfg.split
    if n < k + 1 + (frac.val > 0):
        raise DataError(f"site {site}: {n} case(s) are too few for data.folds={k} (each fold "
                        f"needs >= 1 case, and train{'/val' if frac.val > 0 else ''} too)")
    folds = np.array_split(np.arange(n), k)
    test = {order[i] for i in folds[cfg.fold]}
    rest = [g for g in order if g not in test]
    n_val = 0
    if frac.val > 0:
        n_val = min(len(rest) - 1, max(1, int(round(len(rest) * frac.val
                                                    / (frac.train + frac.val)))))
    val = set(rest[:n_val])
    out: dict[str, list[CaseRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        g = _group_of(r.case_id, group_pattern)
        out["test" if g in test else "val" if g in val else "train"].append(r)
    return out


@dataclass
class SiteData:
    """A site's preprocessed private data, split by case."""

    name: str
    train: list[CaseVolume]
    val: list[CaseVolume]
    test: list[CaseVolume]

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "test")}


def load_site(cfg: DataConfig, records: list[CaseRecord], group_pattern: Optional[str] = None,
              log: Callable[[str], None] = lambda s: None) -> SiteData:
    """Validate, preprocess and split one site's cases."""
    if not records:
        raise DataError("empty site: no cases")
    parts = split_cases(records, cfg, group_pattern)
    vols = {k: [load_case(r, cfg) for r in v] for k, v in parts.items()}
    site = SiteData(records[0].site, vols["train"], vols["val"], vols["test"])
    log(f"[data] {site.name}: {site.counts()} cases, "
        f"{sum(c.num_slices for c in site.train)} train slices")
    return site


def load_unsplit(cfg: DataConfig, records: list[CaseRecord],
                 log: Callable[[str], None] = lambda s: None) -> list[CaseVolume]:
    """Validate and preprocess every case of a site that is only tested (an unseen site): no
    split, so a site of any number of cases, one included, can be tested."""
    if not records:
        raise DataError("empty site: no cases")
    cases = [load_case(r, cfg) for r in records]
    log(f"[data] {records[0].site}: {len(cases)} cases (all tested)")
    return cases


def load_proxy(cfg: DataConfig, with_labels: bool = False) -> list[CaseVolume]:
    """The public proxy set (Liu layout folder ``data.proxy``), labels only when asked for."""
    folder = proxy_dir(cfg)
    records = discover_liu_site(folder, require_labels=False)
    if with_labels:
        missing = [r for r in records if r.label is None]
        if missing:
            raise DataError(f"{missing[0].image}: proxy image without label (needed for "
                            f"evaluation)")
    else:
        records = [CaseRecord(r.site, r.case_id, r.image, None) for r in records]
    return [load_case(r, cfg, require_label=with_labels) for r in records]


# --------------------------------------------------------------------------------------------
# 2D / 2.5D slices
# --------------------------------------------------------------------------------------------
def slice_stack(vol: np.ndarray, z: int, context: int) -> np.ndarray:
    """Slice ``z`` of ``vol`` (D, H, W) with ``context`` neighbours per side as channels:
    returns (2*context+1, H, W); neighbours beyond the ends repeat the edge slice."""
    idx = np.clip(np.arange(z - context, z + context + 1), 0, vol.shape[0] - 1)
    return vol[idx]


class SliceDataset(Dataset):
    """2D/2.5D slices of preprocessed cases.

    Item: ``{"image": (C, H, W) float32, "label": (1, H, W) int64 (absent if unlabeled),
    "id": "site/case/z"}`` with C = 2*context+1. ``slices`` optionally restricts the items to
    ``(case_index, z)`` pairs; ``transform`` is a MONAI dictionary transform (augmentation).
    """

    def __init__(self, cases: list[CaseVolume], context: int = 0,
                 slices: Optional[Iterable[tuple[int, int]]] = None, transform=None):
        self.cases = cases
        self.context = context
        self.items = list(slices) if slices is not None else [
            (ci, z) for ci, c in enumerate(cases) for z in range(c.num_slices)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def slice_id(self, i: int) -> str:
        ci, z = self.items[i]
        return f"{self.cases[ci].site}/{self.cases[ci].case_id}/{z}"

    def __getitem__(self, i: int) -> dict:
        ci, z = self.items[i]
        case = self.cases[ci]
        item = {"image": torch.from_numpy(slice_stack(case.image, z, self.context).copy()),
                "id": self.slice_id(i)}
        if case.label is not None:
            item["label"] = torch.from_numpy(case.label[z][None].astype(np.int64))
        if self.transform is not None:
            item = self.transform(item)
        return item


def foreground_slices(cases: list[CaseVolume]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(with_gland, without_gland)`` lists of ``(case_index, z)``."""
    fg, bg = [], []
    for ci, c in enumerate(cases):
        assert c.label is not None
        has = c.label.reshape(c.num_slices, -1).any(axis=1)
        for z in range(c.num_slices):
            (fg if has[z] else bg).append((ci, z))
    return fg, bg


def proxy_slice_ids(proxy: dict[str, CaseVolume], step: int = 1) -> list[str]:
    """The slice ids of a proxy set that the server queries, ``CASE/z`` in case order: every
    ``step``-th slice of each volume (z = 0, step, 2 step, ...)."""
    return [f"{cid}/{z}" for cid, vol in sorted(proxy.items())
            for z in range(0, vol.num_slices, step)]
