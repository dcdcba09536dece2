"""`fedkd experiment`: a tiny grid (2 sites, 2 methods, 1 seed) through the Simulation Engine."""

import json

import pytest
import yaml

from simulations.cli import main
from common.config import ConfigError, load_config
from simulations.synthetic import write_dataset
from conftest import tiny_sim_config
from common.provenance import code_version, data_fingerprint, run_folders
from simulations.experiment import method_configs


def tiny(tmp_path, methods, seeds=(0,)):
    return tiny_sim_config(tmp_path, output={"run_dir": str(tmp_path / "exp")},
                           experiment={"methods": methods, "seeds": list(seeds)})


def test_grid_configs_are_validated_before_anything_runs(tmp_path):
    path = tiny(tmp_path, {"a": [], "m": ["aggregation.method=mean"]}, seeds=(0, 3))
    runs = method_configs(load_config(path))
    assert [(m, s) for m, s, _ in runs] == [("a", 0), ("m", 0), ("a", 3), ("m", 3)]
    cfg = runs[3][2]
    assert cfg.aggregation.method == "mean" and cfg.runtime.seed == 3
    assert cfg.output.run_dir.endswith("exp/m/seed_3")
    assert cfg.output.state_root.endswith("exp/state/seed_3")  # teachers kept per seed
    assert cfg.data.seed == runs[0][2].data.seed  # same splits for every run
    # k-fold: folds outer, methods inner (a fold's teachers serve all its methods)
    folded = method_configs(load_config(path, ["experiment.folds=3"]))
    assert [(m, s, c.data.fold) for m, s, c in folded[:4]] == [
        ("a", 0, 0), ("m", 0, 0), ("a", 0, 1), ("m", 0, 1)]
    assert len(folded) == 2 * 2 * 3 and all(c.data.folds == 3 for _, _, c in folded)
    assert folded[2][2].output.run_dir.endswith("exp/a/seed_0/fold_1")
    assert folded[2][2].output.state_root.endswith("exp/state/seed_0_fold_1")
    with pytest.raises(ConfigError, match="experiment.folds: expected 0"):
        load_config(path, ["experiment.folds=1"])
    bad = tiny(tmp_path, {"x": ["aggregation.method=median"]})
    with pytest.raises(ConfigError, match="experiment.methods.x: aggregation.method: expected one of"):
        method_configs(load_config(bad))
    with pytest.raises(ConfigError, match="is not a key.path=value override"):
        load_config(tiny(tmp_path, {"x": ["output.run_dir=/elsewhere"]}))


def stamp_runs(folder, stamp):
    """Give every run report under ``folder`` the provenance ``stamp``."""
    for p in folder.rglob("report.json"):
        report = json.loads(p.read_text())
        report["provenance"] = stamp
        p.write_text(json.dumps(report))


def test_tiny_grid_runs_every_kind_of_method_end_to_end(tmp_path, capsys):
    """KD and FedAvg through the Simulation Engine, the pooled-data baselines in process; two
    sites in the federation and a third one unseen."""
    methods = {"adaptive-kd": [], "dp": ["privacy.noise_multiplier=0.01"],
               "dp-sgd-kd": ["privacy.dp_sgd_epsilon=8", "reply.calibrate=false"],
               "dp-sgd-fedavg": ["privacy.dp_sgd_epsilon=8", "federation.strategy=fedavg",
                                 "federation.rounds=2"],
               "fedavg": ["federation.strategy=fedavg", "federation.rounds=2"],
               "fedavg-ft": ["federation.strategy=fedavg", "federation.rounds=2",
                             "adapt.enabled=true", "adapt.epochs=1"],
               "feddf": ["federation.strategy=feddf", "federation.rounds=2"],
               "local": ["federation.strategy=local"], "central": ["federation.strategy=central"],
               "central-kd": ["federation.strategy=central-kd"],
               # fails at run time (no such site): recorded, and the grid goes on
               "broken": ["aggregation.method=single", "aggregation.single_site=SiteZ"]}
    path = tiny_sim_config(tmp_path, output={"run_dir": str(tmp_path / "exp")},
                           experiment={"methods": methods, "seeds": [0],
                                       "unseen_sites": ["other/SiteC"]},
                           synth={"sites": 3, "cases": 5, "proxy_cases": 2, "seed": 1})
    # the unseen site lives in a subfolder of the data root (as real-prostate/PROMISE12 does)
    write_dataset(tmp_path / "data", 3, 5, 2, seed=1, log=lambda s: None)
    (tmp_path / "data" / "other").mkdir()
    (tmp_path / "data" / "SiteC").rename(tmp_path / "data" / "other" / "SiteC")
    for extra in (tmp_path / "data" / "other" / "SiteC").glob("Case0[1-9]*"):
        extra.unlink()  # a single case, too few to split: it is only tested
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["sites"] = ["SiteA", "SiteB"]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["experiment", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[experiment] (10/11) central-kd seed 0" in out and "min left" in out
    assert "(11/11) broken seed 0: FAILED: FederationError: aggregation.single_site" in out
    exp = tmp_path / "exp"
    results = json.loads((exp / "results.json").read_text())
    assert "| Dice, sites' validation |" in (exp / "report.md").read_text()
    runs = results["runs"]
    assert [r["method"] for r in runs] == [m for m in methods if m != "broken"]
    assert [f["run"] for f in results["failed"]] == ["broken"]
    for r in runs:
        assert 0.0 <= r["dice_mean"] <= 1.0 and set(r["site_dice"]) == {"SiteA", "SiteB"}
        assert set(r["unseen_dice"]) == {"SiteC"} and 0.0 <= r["unseen_dice"]["SiteC"] <= 1.0
        assert r["unseen_cases"] == {"SiteC": 1}
        assert r["curve"].get("points") or r["method"] in ("local", "dp-sgd-fedavg")
        assert 0.0 <= r["val_dice"] <= 1.0 and r["n_test_cases"] == sum(r["site_cases"].values())
    by = {r["method"]: r for r in runs}
    student_bytes = 4 * results["models"]["student"]["parameters"]
    assert by["fedavg"]["bytes_per_site_round"] == student_bytes
    assert by["fedavg"]["bytes_to_server"] == student_bytes * 2 * 2  # 2 sites x 2 rounds
    # down and up x 2 rounds, each round's model down for evaluation, the final one for the test
    assert by["fedavg"]["site_bytes_moved"] == student_bytes * (2 * 2 + 2 + 1)
    # KD: a site's reply, and the distilled student it receives once
    assert by["adaptive-kd"]["site_bytes_moved"] == pytest.approx(
        by["adaptive-kd"]["bytes_to_server"] / 2 + student_bytes)
    assert by["local"]["site_bytes_moved"] is None
    # FedAvg + site adaptation: the sites' figures are their adapted students'; the FedAvg
    # student's own figures stay in the record (global_dice_mean)
    ft = by["fedavg-ft"]
    assert ft["model"] == "adapted student" and ft["strategy"] == "fedavg"
    last = json.loads((exp / "fedavg-ft" / "seed_0" / "report.json").read_text()
                      )["state"]["rounds"]["2"]
    assert ft["global_dice_mean"] == last["evaluate"]["dice_mean"]
    assert ft["site_dice"] == {s: last["adapt"]["sites"][s]["dice_mean_after"]
                               for s in ("SiteA", "SiteB")}
    assert ft["dice_mean"] == last["adapt"]["dice_mean"]
    assert ft["val_dice"] >= last["evaluate"]["val_dice_mean"] - 1e-9   # epoch 0 is a candidate
    # feddf: the FedAvg rounds' uploads plus one proxy reply per site; its final model is the
    # refined student of round 3 (tested on the unseen site like every other)
    assert by["feddf"]["bytes_to_server"] > by["fedavg"]["bytes_to_server"]
    assert by["feddf"]["student_steps"] > by["fedavg"]["student_steps"]
    assert by["adaptive-kd"]["bytes_to_server"] > 0 and 0.0 <= by["adaptive-kd"]["target_dice"] <= 1
    assert by["dp"]["epsilon"] > 0 and by["adaptive-kd"]["epsilon"] is None
    # DP-SGD: the teachers' (kd) or the local rounds' (fedavg) epsilon, spent in full
    assert by["dp-sgd-kd"]["epsilon"] == pytest.approx(8.0, abs=0.05)
    assert by["dp-sgd-fedavg"]["epsilon"] == pytest.approx(8.0, abs=0.05)
    dp_report = json.loads((exp / "dp-sgd-kd" / "seed_0" / "report.json").read_text())
    assert all("val_dice" not in t and t["dp_steps"] > 0
               for t in dp_report["state"]["teachers"].values())
    # the membership-inference audit of the released models (loss attack, 2 shadow models);
    # the teachers of every setting are still there (kd's, the DP-SGD ones, local's = kd's)
    assert main(["mia", "--config", str(path), "--only", "adaptive-kd", "local", "fedavg",
                 "dp-sgd-kd", "--shadows", "2", "--bootstrap", "50"]) == 0
    mia = json.loads((exp / "mia.json").read_text())
    assert [r["method"] for r in mia["rows"]] == ["adaptive-kd", "dp-sgd-kd", "fedavg", "local"]
    assert "replies" in mia["rows"][1]
    assert main(["mia", "--config", str(path), "--only", "local", "--shadows", "2",
                 "--bootstrap", "50"]) == 0   # the same shadows, reused; the other rows kept
    assert "[mia] reusing the 2 shadows" in capsys.readouterr().out
    again = json.loads((exp / "mia.json").read_text())["rows"]
    assert [r["method"] for r in again] == ["adaptive-kd", "dp-sgd-kd", "fedavg", "local"]
    assert again[3]["lira"] == mia["rows"][3]["lira"]
    mia["rows"] = again[:1] + again[2:]   # (as before: adaptive-kd, fedavg, local)
    for r in mia["rows"]:
        assert r["loss"]["members"] > 0 and r["loss"]["non_members"] > 0
        assert r["lira"]["shadows"] == 2 and r["lira"]["members"] == r["loss"]["members"]
    assert "| local | 1 |" in (exp / "mia.md").read_text()
    assert "replies" in mia["rows"][0] and "replies" not in mia["rows"][1]   # kd: its teachers
    (exp / "mia.json").write_text(json.dumps(mia))
    assert by["local"]["bytes_to_server"] is None and by["local"]["model"] == "teacher"
    # the local baseline's headline figure is each site's own teacher on its own test split
    assert by["local"]["site_dice"] == {s: by["local"]["local_matrix"][s][s] for s in ("SiteA", "SiteB")}
    t, s = results["models"]["teacher"], results["models"]["student"]
    assert t["parameters"] > s["parameters"] and t["macs_per_slice"] > s["macs_per_slice"] > 0
    assert s["slice_ms"] > 0 and s["volume_ms"] > s["slice_ms"]
    report = (exp / "report.md").read_text()
    for m in methods:
        if m != "broken":
            assert f"| {m} | 1 |" in report
    assert "**Failed runs**" in report and "* `broken` seed 0: FederationError" in report
    assert "Dice, unseen SiteC" in report and "MMACs per slice" in report
    for png in ("per_site_dice", "dice_vs_bytes", "learning_curves", "montage", "dice_vs_epsilon"):
        assert (exp / f"{png}.png").stat().st_size > 5000, png
    # the report and plots can be rewritten from results.json alone
    (exp / "report.md").unlink()
    (exp / "montage.png").unlink()
    assert main(["experiment", "--config", str(path), "--report-only"]) == 0
    assert (exp / "report.md").read_text() == report and (exp / "montage.png").is_file()
    # every run is stamped with the code and data that made it
    stamps = {r["method"]: r["provenance"] for r in runs}
    data = data_fingerprint(run_folders(load_config(path)))
    assert all(st["data"] == data and st["commit"] == code_version()["commit"]
               for st in stamps.values())
    # --collect rebuilds results.json from the finished runs' own reports, running nothing, and
    # publishes the table; runs of no committed version (this checkout may be dirty) are refused
    stamp_runs(exp, {"commit": "a" * 40, "dirty": False, "data": data})
    # no rows left; the profiles the grid measured stay (a collect does not re-time them)
    (exp / "results.json").write_text(json.dumps({"models": results["models"]}))
    # the audit joins the published table only for its own runs audited at the table's commit
    for r in mia["rows"]:
        r["provenance"] = r["run_provenance"] = {"commit": "a" * 40, "dirty": False}
    mia["rows"][1]["provenance"] = {"commit": "c" * 40, "dirty": False}   # fedavg: not shown
    (exp / "mia.json").write_text(json.dumps(mia))
    capsys.readouterr()
    published = tmp_path / "published"
    assert main(["experiment", "--config", str(path), "--collect", "--only", "fedavg-ft",
                 "local", "broken", "--publish-dir", str(published)]) == 0
    collected = json.loads((exp / "results.json").read_text())
    assert collected["models"] == results["models"]
    collected = collected["runs"]
    assert [r["method"] for r in collected] == ["fedavg-ft", "local"]
    assert [r["dice_mean"] for r in collected] == [by["fedavg-ft"]["dice_mean"],
                                                    by["local"]["dice_mean"]]
    assert "left out, not finished with these settings" in capsys.readouterr().out   # broken
    doc = (published / f"{load_config(path).name}.md").read_text()
    assert f"commit `{'a' * 40}`; data fingerprint `{data}`" in doc
    assert "`fedavg-ft` fedavg 2 rounds x 1 local epoch(s)" in doc and "| local | 1 |" in doc
    assert "--collect --only fedavg-ft local broken" in doc
    audit = doc.split("Membership inference (`fedkd mia`, 2 shadow models")[1]
    assert "| local | 1 |" in audit and "adaptive-kd" not in audit and "Left out" not in audit
    assert [r["method"] for r in json.loads((published / f"{load_config(path).name}.json")
                                             .read_text())["mia"]] == ["local"]
    view = (published / f"{load_config(path).name}.summary.md").read_text()   # for a README
    assert f"commit `aaaaaaa`, data `{data}`" in view
    header = next(x for x in view.splitlines() if x.startswith("| method |"))
    assert all(f"| {s} ({n}) |" in header   # each site's test cases over the row's runs
               for s, n in by["fedavg-ft"]["site_cases"].items())
    loc = mia["rows"][2]["loss"]   # local: its AUC, and whether its interval holds 0.5
    holds = int(loc["auc_ci"][0] <= 0.5 <= loc["auc_ci"][1])
    line = next(x for x in view.splitlines() if x.startswith("| local |"))
    assert line.startswith(f"| local | {by['local']['dice_mean']:.3f} +- 0.000 (")
    # no DP; the loss attack's AUC (folds holding 0.5) and TPR at 1 % FPR; no replies to audit
    assert f"| - | {loc['auc']:.2f} ({holds}/1); {loc['tpr_at_1pct_fpr']:.2f} | " in line
    assert line.endswith("| - |")
    assert view.count("\n| ") == 3   # the header, fedavg-ft and local
    mia["rows"][2]["run_digest"] = "0" * 16   # an audit of a run with other settings
    (exp / "mia.json").write_text(json.dumps(mia))
    main(["experiment", "--config", str(path), "--collect", "--only", "fedavg-ft", "local",
          "--publish-dir", str(published)])
    doc = (published / f"{load_config(path).name}.md").read_text()
    assert "No membership-inference audit of these runs at this commit (left out: local seed 0" \
        in doc
    # one run of another commit: the table is refused, each version named with its runs
    stamp_runs(exp / "local", {"commit": "b" * 40, "dirty": False, "data": data})
    with pytest.raises(SystemExit, match=r"(?s)refusing to put runs of different code.*"
                       r"code aaaaaaa, data .*`fedavg-ft` seed 0.*code bbbbbbb.*`local` seed 0"):
        main(["experiment", "--config", str(path), "--collect", "--only", "fedavg-ft",
              "local", "--publish-dir", str(published)])
    stamp_runs(exp / "local", {"commit": "a" * 40, "dirty": True, "data": data})
    with pytest.raises(SystemExit, match="different code"):
        main(["experiment", "--config", str(path), "--collect", "--only", "fedavg-ft",
              "local", "--publish-dir", str(published)])
    with pytest.raises(SystemExit, match="no finished run"):   # other settings: not these runs
        main(["experiment", "--config", str(path), "--collect", "--only", "local",
              "--set", "train.epochs=3"])
    # the KD run reused the teachers that the local baseline (same seed) trained, or vice versa
    kd = json.loads((exp / "adaptive-kd" / "seed_0" / "report.json").read_text())
    loc = json.loads((exp / "local" / "seed_0" / "report.json").read_text())
    assert all(t["reused"] == 1 for t in loc["state"]["teachers"].values())
    assert kd["state"]["teachers"]["SiteA"]["val_dice"] == loc["state"]["teachers"]["SiteA"]["val_dice"]
    # central-kd distilled from the checkpoint that central trained
    assert json.loads((exp / "central-kd" / "seed_0" / "report.json").read_text())[
        "state"]["teachers"]["central"]["reused"] == 1


def test_report_names_runs_that_finished_without_a_site(capsys):
    """A run that excluded a site (e.g. one killed mid-run) still finishes; the report must say
    so, since its figures cover fewer sites than the other runs."""
    from simulations.tables import excluded_markdown

    clean = {"method": "kd", "run": "kd", "seed": 0, "fold": 0, "excluded": {}}
    broken = {"method": "kd", "run": "kd-adapt", "seed": 0, "fold": 2,
              "excluded": {"adapt_r1/SiteB": "no reply before the timeout"}}
    assert excluded_markdown([clean]) == ""
    text = excluded_markdown([clean, broken])
    assert "`kd-adapt` seed 0 fold 2, `adapt_r1/SiteB`: no reply before the timeout" in text
    assert "fold 0" not in text   # the clean run is not listed
    assert "WARNING: 1 site exclusion" in capsys.readouterr().out
