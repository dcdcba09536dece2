import json
import subprocess
import sys
from pathlib import Path


from simulations.cli import main


def test_synth_writes_and_reuses(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--sites", "2", "--cases", "3", "--proxy-cases", "1",
                 "--seed", "5"]) == 0
    assert json.loads((out / "synth.json").read_text())["seed"] == 5
    assert len(list((out / "SiteB").glob("*_segmentation.nii.gz"))) == 3
    capsys.readouterr()
    assert main(["synth", "--out", str(out), "--sites", "2", "--cases", "3", "--proxy-cases", "1",
                 "--seed", "5", "--if-missing"]) == 0
    assert "reusing" in capsys.readouterr().out


def test_config_errors_exit_2_with_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: -3\n")
    assert main(["check-data", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}: train.epochs: expected a value >= 1" in err
    assert main(["synth", "--set", "synth.sites=zero"]) == 2
    assert "synth.sites: expected an integer, got 'zero'" in capsys.readouterr().err


def test_check_data_reports_each_bad_case_and_fails(tiny_synth, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_synth, root)
    assert main(["check-data", "--set", f"data.root={root}"]) == 0
    assert "SiteA: 5 cases" in capsys.readouterr().out
    victim = root / "SiteB" / "Case01.nii.gz"
    victim.write_bytes(victim.read_bytes()[:2000])
    assert main(["check-data", "--set", f"data.root={root}"]) == 1
    out = capsys.readouterr().out
    assert "Case01.nii.gz: unreadable or truncated" in out and "1 problem(s)" in out
    assert main(["check-data", "--set", f"data.root={tmp_path / 'none'}"]) == 2


def test_montage_png(tiny_synth, tmp_path):
    png = tmp_path / "m.png"
    assert main(["montage", "--data", str(tiny_synth), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cross_site_writes_matrix(tiny_synth, tmp_path):
    run = tmp_path / "run"
    assert main(["cross-site", "--set", f"data.root={tiny_synth}", "--set", f"output.run_dir={run}",
                 "--set", "train.epochs=1", "--set", "data.size=[64,64]", "--set",
                 "data.spacing=[2.0,2.0]", "--set", "model.teacher.channels=[4,8,16]",
                 "--set", "model.teacher.strides=[2,2]", "--set", "model.teacher.features=[enc1]",
                 "--train-sites", "SiteB"]) == 0
    result = json.loads((run / "cross_site.json").read_text())
    assert list(result["matrix"]) == ["SiteB"]
    assert set(result["matrix"]["SiteB"]) == {"SiteA", "SiteB"}
    assert all(0.0 <= v <= 1.0 for v in result["matrix"]["SiteB"].values())
    assert "| SiteB | " in (run / "cross_site.md").read_text()
    assert (run / "config.yaml").is_file()
    assert main(["cross-site", "--set", f"data.root={tiny_synth}", "--train-sites", "SiteZ"]) == 2


def test_console_script_is_installed():
    fedkd = Path(sys.executable).parent / "fedkd"
    assert fedkd.is_file(), "the fedkd console script is not installed beside the interpreter"
    exe = subprocess.run([str(fedkd), "--help"], capture_output=True, text=True)
    assert exe.returncode == 0 and "synth" in exe.stdout and "cross-site" in exe.stdout
