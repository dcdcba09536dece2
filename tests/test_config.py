from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, RunConfig, dump_config, load_config
from common.typedconfig import parse_override

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_and_every_shipped_config_load():
    cfg = load_config(None)
    assert cfg.data.size == [128, 128] and cfg.model.teacher.channels == [16, 32, 64, 128, 256]
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert shipped, "configs/ has no YAML files"
    for path in shipped:
        assert isinstance(load_config(path), RunConfig)


def test_yaml_values_override_defaults_and_keep_the_rest(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"epochs": 3}, "data": {"size": [96, 96]}}))
    assert cfg.train.epochs == 3 and cfg.data.size == [96, 96]
    assert cfg.train.lr == RunConfig().train.lr


@pytest.mark.parametrize("data,needle", [
    ({"trian": {"epochs": 3}}, "trian: unknown key"),
    ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
    ({"train": {"epochs": "many"}}, "train.epochs: expected an integer, got 'many'"),
    ({"train": {"epochs": 0}}, "train.epochs: expected a value >= 1, got 0"),
    ({"train": {"augment": "yes"}}, "train.augment: expected true or false"),
    ({"distill": {"temperature": -1}}, "distill.temperature: expected a value >= 0.01"),
    ({"aggregation": {"method": "median"}}, "aggregation.method: expected one of 'affinity'"),
    ({"data": {"size": [128]}}, "data.size: expected a list of 2 values"),
    ({"data": {"spacing": [1.0, "a"]}}, "data.spacing[1]: expected a number"),
    ({"data": {"split": {"train": 0.5, "val": 0.2, "test": 0.2}}}, "train + val + test must be 1"),
    ({"data": {"layout": "manifest"}}, "data.manifest: required"),
    ({"model": {"teacher": {"strides": [2, 2]}}}, "model.teacher.strides: expected 4 values"),
    ({"model": {"student": {"features": ["enc9"]}}}, "model.student.features: unknown feature map 'enc9'"),
    ({"model": {"site_teachers": {"SiteA": {"arch": "vit"}}}}, "model.site_teachers.SiteA.arch"),
    ([1, 2], "expected a mapping at the top level"),
])
def test_bad_values_name_file_key_and_expectation(tmp_path, data, needle):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed"))


def test_set_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "data.size=[64, 64]", "aggregation.method=adaptive",
                             "aggregation.use_agreement=true",
                             "model.site_teachers.SiteB.channels=[8,16,32,64,128]"])
    assert cfg.train.epochs == 7 and cfg.data.size == [64, 64] and cfg.aggregation.use_agreement
    assert cfg.teacher_spec("SiteB").channels == [8, 16, 32, 64, 128]
    assert cfg.teacher_spec("SiteA").channels == [16, 32, 64, 128, 256]
    with pytest.raises(ConfigError, match=r"train\.lr: expected a value >= 1e-07"):
        load_config(None, ["train.lr=0"])
    with pytest.raises(ConfigError, match=r"use_agreement: applies to aggregation.method "
                                          r"'adaptive' \(or auto .*\), not 'affinity'"):
        load_config(None, ["aggregation.use_agreement=true", "aggregation.method=affinity"])
    with pytest.raises(ConfigError, match=r"use_agreement: .*not 'auto'"):
        load_config(None, ["aggregation.use_agreement=true", "aggregation.auto_candidates=[mean]"])
    assert load_config(None, ["aggregation.use_agreement=true"]).aggregation.uses("adaptive")
    with pytest.raises(ConfigError, match=r"select_round: applies to the FedAvg rounds .*not "
                                          r"federation.strategy 'kd'"):
        load_config(None, ["federation.select_round=true"])
    assert load_config(None, ["federation.select_round=true", "federation.strategy=feddf"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs.x=1"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "model.site_teachers.SiteA.arch=basicunet",
                             "model.site_teachers.SiteA.channels=[8,8,16,32,64,8]",
                             "model.site_teachers.SiteA.features=[enc2]"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_default_yaml_documents_exactly_the_builtin_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == RunConfig()


def test_a_partial_section_keeps_its_own_defaults(tmp_path):
    cfg = load_config(write(tmp_path, {"model": {"student": {"channels": [4, 8, 16, 32]}}}))
    assert cfg.model.student.strides == [2, 2, 2]  # the student's default, not the teacher's
    assert cfg.model.student.num_res_units == 1 and cfg.model.teacher == RunConfig().model.teacher


def test_unseen_sites_must_stay_out_of_the_federation(tmp_path):
    with pytest.raises(ConfigError, match="data.sites must list the federation's sites"):
        load_config(None, ["experiment.unseen_sites=[SiteF]"])
    with pytest.raises(ConfigError, match="'SiteF' is also in data.sites"):
        load_config(None, ["experiment.unseen_sites=[SiteF]", "data.sites=[SiteA,SiteF]"])
    with pytest.raises(ConfigError, match="federation.strategy: expected one of"):
        load_config(None, ["federation.strategy=fedsgd"])
    cfg = load_config(None, ["experiment.unseen_sites=[SiteF]", "data.sites=[SiteA,SiteB]"])
    assert cfg.experiment.unseen_sites == ["SiteF"]
