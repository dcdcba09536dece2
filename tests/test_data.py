import gzip

import nibabel as nib
import numpy as np
import pytest

from common.config import DataConfig, SplitConfig
from common.data import CaseRecord, DataError, discover_sites, load_case, load_proxy, read_case
from common.slices import SliceDataset, foreground_slices
from common.splits import load_site, split_cases


def save(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def box_case(shape=(64, 64, 6), lo=(20, 24, 1), hi=(44, 40, 5), value=1):
    img = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    img[lab > 0] += 80
    return img, lab


def liu_site(root, site="S1", n=5):
    for i in range(n):
        img, lab = box_case()
        save(root / site / f"Case{i:02d}.nii.gz", img)
        save(root / site / f"Case{i:02d}_segmentation.nii.gz", lab)
    return root


def small_cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), size=[64, 64], **kw)


# ------------------------------------------------------------------------------ layouts
def test_liu_layout_on_synthetic_sites(tiny_synth):
    cfg = DataConfig(root=str(tiny_synth))
    sites = discover_sites(cfg)
    assert list(sites) == ["SiteA", "SiteB"]  # PROXY is not a site
    site = load_site(cfg, sites["SiteA"])
    assert site.counts() == {"train": 3, "val": 1, "test": 1}
    vol = site.train[0]
    assert vol.image.shape[1:] == (128, 128) and vol.label.shape == vol.image.shape
    assert vol.image.dtype == np.float32 and 0.0 <= vol.image.min() and vol.image.max() <= 1.0
    assert vol.spacing[:2] == pytest.approx((1.0, 1.0))
    assert set(np.unique(vol.label)) == {0, 1}
    proxy = load_proxy(cfg)
    assert list(proxy) == ["Case00", "Case01", "Case02"]
    assert len(proxy) == 3 and all(p.label is None for p in proxy.values())
    assert all(p.label is not None for p in load_proxy(cfg, with_labels=True).values())


def test_msd_layout_4d_channel_and_multiclass_labels(tmp_path):
    root = tmp_path / "Task05_Prostate"
    for i in range(3):
        img, lab = box_case(value=2)
        lab[20:30, 24:30, 1:5] = 1  # two zones: 1 = PZ, 2 = TZ
        four_d = np.stack([img, -img], axis=-1)  # channel 0 = T2, channel 1 = ADC stand-in
        save(root / "imagesTr" / f"prostate_{i:02d}.nii.gz", four_d)
        save(root / "labelsTr" / f"prostate_{i:02d}.nii.gz", lab)
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS junk")
    cfg = small_cfg(root, layout="msd", split=SplitConfig(1.0, 0.0, 0.0))
    sites = discover_sites(cfg)
    assert list(sites) == ["Task05_Prostate"] and len(sites["Task05_Prostate"]) == 3
    vol = load_case(sites["Task05_Prostate"][0], cfg)
    assert vol.label.sum() == 24 * 16 * 4  # label > 0 is gland
    img0, _, _ = read_case(sites["Task05_Prostate"][0], cfg)
    img1, _, _ = read_case(sites["Task05_Prostate"][0], small_cfg(root, layout="msd", msd_channel=1))
    assert np.allclose(img0, -img1)
    with pytest.raises(DataError, match="msd_channel=5 is out of range"):
        read_case(sites["Task05_Prostate"][0], small_cfg(root, layout="msd", msd_channel=5))


@pytest.mark.parametrize("kind", ["yaml", "csv"])
def test_manifest_layout(tmp_path, kind):
    liu_site(tmp_path / "d", "A", 3)
    liu_site(tmp_path / "d", "B", 3)
    rows = [(s, f"d/{s}/Case{i:02d}.nii.gz", f"d/{s}/Case{i:02d}_segmentation.nii.gz")
            for s in "AB" for i in range(3)]
    if kind == "csv":
        man = tmp_path / "m.csv"
        man.write_text("site,image,label\n" + "\n".join(",".join(r) for r in rows))
    else:
        man = tmp_path / "m.yaml"
        man.write_text("cases:\n" + "".join(f"  - {{site: {s}, image: {i}, label: {l}}}\n"
                                            for s, i, l in rows))
    cfg = small_cfg(tmp_path, layout="manifest", manifest=str(man))
    sites = discover_sites(cfg)
    assert {k: len(v) for k, v in sites.items()} == {"A": 3, "B": 3}
    assert sites["A"][1].image == (tmp_path / "d/A/Case01.nii.gz").resolve()
    with pytest.raises(DataError, match="site 'C' not in the manifest"):
        discover_sites(small_cfg(tmp_path, layout="manifest", manifest=str(man), sites=["C"]))


# ------------------------------------------------------------------------------ splits
def test_split_is_by_case_deterministic_and_seeded(tmp_path):
    recs = [CaseRecord("S", f"Case{i:02d}", tmp_path / "x", None) for i in range(20)]
    cfg = DataConfig()
    a, b = split_cases(recs, cfg), split_cases(recs, cfg)
    assert {k: len(v) for k, v in a.items()} == {"train": 12, "val": 4, "test": 4}
    assert a == b
    ids = [set(r.case_id for r in a[k]) for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set.union(*ids) == {r.case_id for r in recs}
    other = split_cases(recs, DataConfig(seed=1))
    assert {r.case_id for r in other["test"]} != ids[2]
    # each site is shuffled by its own name: the same ids at another site split differently
    recs_b = [CaseRecord("T", r.case_id, r.image, None) for r in recs]
    assert [r.case_id for r in split_cases(recs_b, cfg)["test"]] != [r.case_id for r in a["test"]]


def test_split_groups_slices_of_one_patient(tmp_path):
    recs = [CaseRecord("P", f"Case{p}_{z}", tmp_path / "x", None) for p in range(10) for z in (3, 9)]
    parts = split_cases(recs, DataConfig(), group_pattern=r"^(Case\d+)_\d+$")
    patients = {k: {r.case_id.split("_")[0] for r in v} for k, v in parts.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
    assert sum(len(v) for v in parts.values()) == 20


def test_k_fold_tests_every_case_once_and_keeps_patients_together(tmp_path):
    recs = [CaseRecord("P", f"Case{p}_{z}", tmp_path / "x", None) for p in range(13) for z in (3, 9)]
    recs += [CaseRecord("P", f"Case{p}", tmp_path / "x", None) for p in range(20, 24)]
    pattern = r"^(Case\d+)_\d+$"
    tested: list[str] = []
    for fold in range(3):
        cfg = DataConfig(folds=3, fold=fold, group_pattern=pattern)
        parts = split_cases(recs, cfg)
        assert parts == split_cases(recs, cfg)  # deterministic
        ids = {k: {r.case_id for r in v} for k, v in parts.items()}
        assert not (ids["train"] & ids["val"]) and not (ids["train"] | ids["val"]) & ids["test"]
        assert set.union(*ids.values()) == {r.case_id for r in recs}
        pats = {k: {i.split("_")[0] for i in v} for k, v in ids.items()}
        assert not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
        assert 5 <= len(pats["test"]) <= 6  # 17 patients in 3 near-equal folds
        # the rest is divided by split.train : split.val = 0.6 : 0.2
        assert len(pats["val"]) == round((17 - len(pats["test"])) / 4)
        tested += sorted(ids["test"])
    assert sorted(tested) == sorted(r.case_id for r in recs)  # every case tested exactly once
    with pytest.raises(DataError, match="site P: 3 case\\(s\\) are too few for data.folds=3"):
        split_cases(recs[-3:], DataConfig(folds=3))


def test_an_unseen_site_of_one_case_is_tested_without_a_split(tmp_path):
    from common.splits import load_unsplit

    liu_site(tmp_path, "One", n=1)
    cfg = small_cfg(tmp_path, sites=["One"])
    recs = discover_sites(cfg)["One"]
    with pytest.raises(DataError, match="too few"):
        load_site(cfg, recs)
    (case,) = load_unsplit(cfg, recs)
    assert case.case_id == "Case00" and case.label.sum() > 0


def test_sites_and_proxy_may_sit_in_subfolders_of_the_root(tmp_path):
    liu_site(tmp_path / "centres", "A", n=3)
    liu_site(tmp_path / "other", "B", n=3)
    liu_site(tmp_path / "centres", "PUBLIC", n=2)
    cfg = small_cfg(tmp_path, sites=["centres/A", "other/B"], proxy="centres/PUBLIC")
    assert list(discover_sites(cfg)) == ["A", "B"]
    assert len(load_proxy(cfg)) == 2
    liu_site(tmp_path / "other", "A", n=3)
    with pytest.raises(DataError, match="two site folders are named 'A'"):
        discover_sites(small_cfg(tmp_path, sites=["centres/A", "other/A"]))


def test_too_few_cases_for_the_split_is_an_error(tmp_path):
    recs = [CaseRecord("Tiny", f"Case{i}", tmp_path / "x", None) for i in range(2)]
    with pytest.raises(DataError, match="site Tiny: 2 case\\(s\\) are too few"):
        split_cases(recs, DataConfig())


# ------------------------------------------------------------------------------ validation
def test_bad_files_name_the_file_and_cause(tmp_path):
    root = liu_site(tmp_path / "data", "S1", 3)
    site = root / "S1"
    cfg = small_cfg(root)
    rec = lambda i: discover_sites(cfg)["S1"][i]  # noqa: E731

    # truncated gzip
    raw = (site / "Case00.nii.gz").read_bytes()
    (site / "Case00.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: unreadable or truncated"):
        load_case(rec(0), cfg)
    # not a NIfTI at all
    (site / "Case00.nii.gz").write_bytes(gzip.compress(b"hello"))
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: unreadable NIfTI header"):
        load_case(rec(0), cfg)
    # shape mismatch
    img, lab = box_case()
    save(site / "Case00.nii.gz", img)
    save(site / "Case00_segmentation.nii.gz", lab[:, :, :5])
    with pytest.raises(DataError, match=r"Case00_segmentation\.nii\.gz: label shape \(64, 64, 5\) "
                                        r"does not match image Case00\.nii\.gz"):
        load_case(rec(0), cfg)
    # affine mismatch
    save(site / "Case00_segmentation.nii.gz", lab, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(DataError, match="label affine differs"):
        load_case(rec(0), cfg)
    # non-binary label
    save(site / "Case00_segmentation.nii.gz", lab * 255)
    with pytest.raises(DataError, match=r"non-binary label \(values 0, 255\)"):
        load_case(rec(0), cfg)
    assert load_case(rec(0), small_cfg(root, label_mode="positive")).label.max() == 1
    # NaN voxels
    img[3, 3, 3] = np.nan
    save(site / "Case00.nii.gz", img)
    save(site / "Case00_segmentation.nii.gz", lab)
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: 1 NaN/inf voxels"):
        load_case(rec(0), cfg)
    # image without label
    (site / "Case00.nii.gz").unlink()
    save(site / "Case07.nii.gz", box_case()[0])
    with pytest.raises(DataError, match=r"Case07\.nii\.gz: image without label"):
        discover_sites(cfg)
    # label without image
    (site / "Case07.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Case00_segmentation\.nii\.gz: label without image"):
        discover_sites(cfg)


def test_empty_site_and_missing_root(tmp_path):
    (tmp_path / "d" / "Empty").mkdir(parents=True)
    with pytest.raises(DataError, match=r"Empty: empty site"):
        discover_sites(small_cfg(tmp_path / "d"))
    with pytest.raises(DataError, match="data root not found"):
        discover_sites(small_cfg(tmp_path / "missing"))
    with pytest.raises(DataError, match="site folder not found"):
        discover_sites(small_cfg(tmp_path / "d", sites=["Nope"]))


# ------------------------------------------------------------------------------ preprocessing
def test_orientation_makes_ras_and_lps_storage_identical(tmp_path):
    img, lab = box_case()
    img[5, 40, 2] = 1000.0  # an asymmetric marker
    ras = np.diag([1.0, 1.0, 3.0, 1.0])
    lps = np.diag([-1.0, -1.0, 3.0, 1.0])
    lps[:2, 3] = 63.0  # same physical positions, voxel axes x and y reversed
    save(tmp_path / "S/Case00.nii.gz", img, ras)
    save(tmp_path / "S/Case00_segmentation.nii.gz", lab, ras)
    save(tmp_path / "S/Case01.nii.gz", img[::-1, ::-1].copy(), lps)
    save(tmp_path / "S/Case01_segmentation.nii.gz", lab[::-1, ::-1].copy(), lps)
    cfg = small_cfg(tmp_path, clip_percentiles=[0.0, 100.0])
    a, b = (load_case(r, cfg) for r in discover_sites(cfg)["S"])
    assert np.allclose(a.image, b.image, atol=1e-5) and np.array_equal(a.label, b.label)


def test_inplane_resampling_keeps_physical_size_and_slice_spacing(tmp_path):
    shape = (128, 128, 4)
    img, lab = box_case(shape, lo=(40, 40, 0), hi=(80, 72, 4))  # 20 x 16 mm at 0.5 mm
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    save(tmp_path / "S/Case00.nii.gz", img, aff)
    save(tmp_path / "S/Case00_segmentation.nii.gz", lab, aff)
    vol = load_case(discover_sites(small_cfg(tmp_path))["S"][0], small_cfg(tmp_path))
    assert vol.image.shape == (4, 64, 64)
    assert vol.spacing == pytest.approx((1.0, 1.0, 3.0))
    area_mm2 = vol.label[1].sum() * 1.0
    assert area_mm2 == pytest.approx(20 * 16, rel=0.12)


def test_slices_keep_ids_and_25d_context(tiny_synth):
    cfg = DataConfig(root=str(tiny_synth), context_slices=1)
    site = load_site(cfg, discover_sites(cfg)["SiteA"])
    ds = SliceDataset(site.train, context=1)
    assert len(ds) == sum(c.num_slices for c in site.train)
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["label"].shape == (1, 128, 128)
    case = site.train[0]
    assert item["id"] == f"SiteA/{case.case_id}/0"
    assert np.allclose(item["image"][0], case.image[0])  # edge slice repeated below z = 0
    assert np.allclose(ds[1]["image"][0], case.image[0]) and np.allclose(ds[1]["image"][2], case.image[2])
    fg, bg = foreground_slices(site.train)
    assert fg and bg and len(fg) + len(bg) == len(ds)


# ------------------------------------------------------------------------------ real data
def test_real_promise12_case_loads(real_data):
    cfg = DataConfig(root=str(real_data), sites=["PROMISE12"], split=SplitConfig(1.0, 0.0, 0.0))
    site = load_site(cfg, discover_sites(cfg)["PROMISE12"])
    vol = site.train[0]
    assert vol.image.shape == (64, 128, 128)
    assert vol.spacing[2] == pytest.approx(1.616, abs=1e-3)
    assert int(vol.label.reshape(64, -1).any(axis=1).sum()) == 34  # as the data README says
    # the LPS affine was reoriented: the file's voxel order is not RAS
    codes = nib.aff2axcodes(nib.load(site.train[0].source).affine)
    assert codes != ("R", "A", "S")


def test_real_prostate158_slices_load_and_split_by_patient(real_data):
    cfg = DataConfig(root=str(real_data), sites=["P158"], spacing=[4.0, 4.0])
    recs = discover_sites(cfg)["P158"]
    assert len(recs) == 36
    parts = split_cases(recs, cfg, group_pattern=r"^(Case\d+)_\d+$")
    pid = {k: {r.case_id.split("_")[0] for r in v} for k, v in parts.items()}
    assert not (pid["train"] & pid["test"]) and not (pid["train"] & pid["val"])
    vol = load_case(recs[0], cfg)
    assert vol.image.shape == (1, 128, 128) and vol.label.any()


def test_group_pattern_from_the_config(tmp_path):
    recs = [CaseRecord("P", f"Case{p}_{z}", tmp_path / "x", None) for p in range(10) for z in (3, 9)]
    parts = split_cases(recs, DataConfig(group_pattern=r"^(Case\d+)_\d+$"))
    patients = {k: {r.case_id.split("_")[0] for r in v} for k, v in parts.items()}
    assert not (patients["train"] & patients["test"]) and len(parts["test"]) % 2 == 0


def test_proxy_slice_step_queries_every_kth_slice():
    from common.data import CaseVolume
    from common.slices import proxy_slice_ids

    vols = {c: CaseVolume("PROXY", c, np.zeros((n, 4, 4), np.float32), None, (1, 1, 1))
            for c, n in (("Case01", 5), ("Case00", 3))}
    assert proxy_slice_ids(vols) == ["Case00/0", "Case00/1", "Case00/2", "Case01/0", "Case01/1",
                                     "Case01/2", "Case01/3", "Case01/4"]
    assert proxy_slice_ids(vols, 2) == ["Case00/0", "Case00/2", "Case01/0", "Case01/2", "Case01/4"]
    vols["POOL/Case00"] = CaseVolume("POOL", "Case00", np.zeros((5, 4, 4), np.float32), None,
                                     (1, 1, 1))
    assert proxy_slice_ids(vols, {"POOL": 2})[-3:] == ["POOL/Case00/0", "POOL/Case00/2",
                                                       "POOL/Case00/4"]
    assert len(proxy_slice_ids(vols, {"POOL": 2})) == 8 + 3
