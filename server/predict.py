"""``fedkd predict``: segment NIfTI volumes with an exported student.

Each input is read and validated like training data, preprocessed with the training pipeline
(MONAI: RAS, in-plane resampling, intensity scaling, crop/pad), segmented slice by slice, and the
mask is mapped back to the input's grid with MONAI's inverse of the same transforms (then
thresholded at 0.5). The written mask has the input's shape, affine and header (datatype uint8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch

from common.config import RunConfig
from common.data import CaseRecord, nifti_stem, preprocess_transform, read_case
from common.slices import slice_stack
from common.models import FeatureNet


@torch.no_grad()
def predict_file(model: FeatureNet, cfg: RunConfig, path: Path) -> np.ndarray:
    """The gland mask of ``path`` on its own voxel grid: (X, Y, Z) uint8 (4D input: X, Y, Z)."""
    from monai.data import MetaTensor

    img, _, affine = read_case(CaseRecord("predict", nifti_stem(path), path, None), cfg.data,
                               require_label=False)
    transform = preprocess_transform(cfg.data, with_label=False)
    data = transform({"image": MetaTensor(torch.from_numpy(img), affine=torch.from_numpy(affine))})
    vol = data["image"][0].permute(2, 0, 1).numpy()                       # (D, H, W)
    model.eval()
    masks = []
    for start in range(0, vol.shape[0], 32):
        zs = range(start, min(vol.shape[0], start + 32))
        x = torch.from_numpy(np.stack([slice_stack(vol, z, cfg.data.context_slices) for z in zs]))
        masks.append(model(x.float())[0].argmax(dim=1).to(torch.float32))
    pred = torch.cat(masks).permute(1, 2, 0)[None]                         # (1, H, W, D)
    pred_mt = MetaTensor(pred, affine=data["image"].affine,
                         applied_operations=data["image"].applied_operations)
    # invert the geometric transforms (resampling is bilinear), then threshold at 0.5
    with torch.no_grad():
        inverted = transform.inverse({"image": pred_mt})["image"]
    out = (np.asarray(inverted[0]) > 0.5).astype(np.uint8)
    if out.shape != img.shape:
        raise RuntimeError(f"{path}: inverse mapping gave shape {out.shape}, expected {img.shape}")
    return out


def predict_files(model: FeatureNet, cfg: RunConfig, inputs: list[Path], out_dir: Path,
                  log: Callable[[str], None] = print) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in inputs:
        mask = predict_file(model, cfg, path)
        src = nib.load(str(path))
        header = src.header.copy()
        if mask.ndim != len(src.shape):  # a 4D input (MSD): the mask is 3D
            header.set_data_shape(mask.shape)
        header.set_data_dtype(np.uint8)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        target = out_dir / f"{nifti_stem(path)}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask, src.affine, header), str(target))
        log(f"[predict] {path} -> {target} ({int(mask.sum())} gland voxels)")
        written.append(target)
    return written
