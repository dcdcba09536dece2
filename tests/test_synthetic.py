import json
import time

import nibabel as nib
import numpy as np

from common.synthetic import (FAMILIES, existing_matches, make_anatomy, render_case, site_names,
                              site_profiles, write_dataset)


def test_layout_and_manifest(tiny_synth):
    for site in ("SiteA", "SiteB", "PROXY"):
        n = 3 if site == "PROXY" else 5
        for c in range(n):
            assert (tiny_synth / site / f"Case{c:02d}.nii.gz").is_file()
            assert (tiny_synth / site / f"Case{c:02d}_segmentation.nii.gz").is_file()
    manifest = json.loads((tiny_synth / "synth.json").read_text())
    assert list(manifest["sites"]) == ["SiteA", "SiteB"] and manifest["seed"] == 0
    assert existing_matches(tiny_synth, 2, 5, 3, 0)
    assert not existing_matches(tiny_synth, 2, 5, 3, 1)
    assert not existing_matches(tiny_synth, 3, 5, 3, 0)


def test_masks_are_binary_gland_sized_and_match_image_geometry(tiny_synth):
    for site in ("SiteA", "SiteB"):
        img = nib.load(tiny_synth / site / "Case00.nii.gz")
        seg = nib.load(tiny_synth / site / "Case00_segmentation.nii.gz")
        m = np.asarray(seg.dataobj)
        assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)
        assert set(np.unique(m)) == {0, 1}
        voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000.0
        volume_ml = m.sum() * voxel_ml
        assert 10 < volume_ml < 120, volume_ml  # adult prostate volumes are roughly 20-80 ml


def test_deterministic_by_seed(tmp_path):
    a = write_dataset(tmp_path / "a", 1, 2, 0, seed=3, log=lambda s: None)
    b = write_dataset(tmp_path / "b", 1, 2, 0, seed=3, log=lambda s: None)
    write_dataset(tmp_path / "c", 1, 2, 0, seed=4, log=lambda s: None)
    assert a == b
    for name in ("Case00.nii.gz", "Case01_segmentation.nii.gz"):
        x = np.asarray(nib.load(tmp_path / "a/SiteA" / name).dataobj)
        y = np.asarray(nib.load(tmp_path / "b/SiteA" / name).dataobj)
        assert np.array_equal(x, y)
    x = np.asarray(nib.load(tmp_path / "a/SiteA/Case00.nii.gz").dataobj)
    z = np.asarray(nib.load(tmp_path / "c/SiteA/Case00.nii.gz").dataobj)
    assert x.shape != z.shape or not np.array_equal(x, z)


def test_sites_differ_in_tissue_contrast_not_only_scale():
    profiles = site_profiles(6, seed=0)
    assert [p.family for p in profiles] == list(FAMILIES)
    # gland (peripheral zone) relative to periprostatic tissue: the sign of the contrast differs
    ratio = {p.family: p.pz / p.periprostatic for p in profiles}
    assert ratio["bright_gland"] > 2.5 and ratio["low_contrast"] < 1.35
    assert profiles[1].coil > 0 and all(p.coil == 0 for i, p in enumerate(profiles) if i != 1)
    assert profiles[4].thickness >= 4.0 and profiles[5].noise > 2 * profiles[0].noise


def test_gland_is_not_the_only_similar_structure():
    rng = np.random.default_rng(0)
    prof = site_profiles(1, 0)[0]
    img, mask, _ = render_case(prof, make_anatomy(rng), rng)
    img = img.astype(np.float32)
    gland_mean = img[mask == 1].mean()
    # a sizeable non-gland region (bladder, seminal vesicles, fat) is as bright as the gland
    similar = (np.abs(img - gland_mean) < 0.1 * gland_mean) & (mask == 0)
    assert similar.sum() > mask.sum()


def test_six_sites_of_twenty_cases_fit_in_a_minute(tmp_path):
    t0 = time.perf_counter()
    write_dataset(tmp_path, 1, 3, 0, seed=0, log=lambda s: None)
    per_case = (time.perf_counter() - t0) / 3
    assert per_case * (6 * 20 + 20) < 60, f"{per_case:.2f} s per case"


def test_site_names():
    assert site_names(3) == ["SiteA", "SiteB", "SiteC"]
    assert site_names(28)[26:] == ["SiteAA", "SiteAB"]
