"""`fedkd bench comm | compress | scale` at a tiny size: every output and sane ratios."""

import importlib.util
import json

import pytest

from common.cli import main
from conftest import tiny_sim_config


@pytest.fixture()
def bench_cfg(tmp_path):
    return tiny_sim_config(tmp_path, output={"run_dir": str(tmp_path / "bench"),
                                             "state_root": str(tmp_path / "state")},
                           bench={"rounds": 2, "target_dice": 0.01, "image_size": [32, 32],
                                  "volume_slices": 4, "repeats": 2, "scale_sites": [2, 8],
                                  "proxy_slices": 6, "engine_sites": [2]})


def _result(tmp_path, name):
    out = tmp_path / "bench"
    assert (out / f"bench_{name}.png").stat().st_size > 3000
    return json.loads((out / f"bench_{name}.json").read_text())


def test_bench_compress(bench_cfg, tmp_path, capsys):
    assert main(["bench", "compress", "--config", str(bench_cfg)]) == 0
    r = _result(tmp_path, "compress")
    t, s = r["models"]["teacher"], r["models"]["student"]
    assert t["parameters"] == 51777 and s["parameters"] == 10340
    assert r["ratios"]["parameters"] == pytest.approx(51777 / 10340)
    assert r["ratios"]["macs"] > 1 and t["size"] == [32, 32] and t["depth"] == 4
    for m in (t, s):
        assert 0 < m["slice_ms"] < m["volume_ms"] and m["export_volume_ms"] > 0
        assert m["peak_mb"] >= 0
        if importlib.util.find_spec("onnxruntime"):  # the onnx extra (make installs it)
            assert m["onnxruntime_volume_ms"] > 0, m["onnxruntime_note"]
        else:
            assert m["onnxruntime_note"] == "onnxruntime not installed"
    assert "| teacher / student |" in capsys.readouterr().out


def test_bench_scale(bench_cfg, tmp_path, capsys):
    assert main(["bench", "scale", "--config", str(bench_cfg)]) == 0
    r = _result(tmp_path, "scale")
    a2, a8 = r["aggregation"]
    assert (a2["sites"], a8["sites"]) == (2, 8)
    assert a8["memory_ratio"] <= 1.5 and r["memory_within_1_5x"]  # streaming: no growth
    assert a8["seconds"] > a2["seconds"] and a2["reply_mb"] > 0
    (e,) = r["engine"]
    assert e["sites"] == 2 and e["seconds"] > 0 and 0 <= e["dice_mean"] <= 1


def test_bench_comm(bench_cfg, tmp_path, capsys):
    assert main(["bench", "comm", "--config", str(bench_cfg)]) == 0
    r = _result(tmp_path, "comm")
    by = {m["method"]: m for m in r["methods"]}
    b = {k: v["bytes_per_site_round"] for k, v in by.items()}
    assert b["KD float32 + features"] > b["KD float16 + features"] > b["KD int8 + features"]
    # logits halve from float32 to float16; the affinity (4 bytes a proxy slice) stays float32
    affinity = 2 * b["KD float16"] - b["KD float32"]
    assert affinity > 0 and affinity % 4 == 0 and affinity < 0.001 * b["KD float16"]
    assert b["KD float16 + features"] > b["KD float16"]
    assert b["FedAvg student"] == 4 * 10340 and b["FedAvg teacher"] == 4 * 51777
    assert by["FedAvg student"]["rounds"] == 2 and by["KD int8"]["rounds"] == 1
    for m in by.values():
        assert 0 <= m["dice_final"] <= 1
        assert m["ratio_to_fedavg_student"] == pytest.approx(m["bytes_per_site_round"] / b["FedAvg student"])
    assert "x FedAvg student" in capsys.readouterr().out
