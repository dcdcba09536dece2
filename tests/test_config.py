from pathlib import Path

import pytest
import yaml

from common.config import CATALOGUE, ConfigError, RunConfig, dump_config, load_config, read_catalogue
from common.typedconfig import parse_override

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_and_every_shipped_config_load():
    cfg = load_config(None)
    assert cfg.data.size == [128, 128] and cfg.model.teacher.channels == [16, 32, 64, 128, 256]
    shipped = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != CATALOGUE)
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


def grid(tmp_path, methods, entries=None, **experiment):
    if entries is not None:
        (tmp_path / CATALOGUE).write_text(yaml.safe_dump(entries))
    return write(tmp_path, {"data": {"proxy": ["RUNMC", "public-pool"]},
                            "distill": {"steps_per_epoch": 10},
                            "experiment": {"methods": methods, **experiment}})


def test_grid_rows_name_catalogue_entries_that_expand_in_order(tmp_path):
    cat = {"fedavg-30": ["federation.strategy=fedavg", "federation.rounds=30"],
           "half": ['distill.set_weights={public-pool: 0.5, "*": 0.5}'], "kd": []}
    cfg = load_config(grid(tmp_path, {"a": ["fedavg-30", "half", "federation.rounds=60"],
                                      "b": ["kd"]}, cat))
    assert cfg.experiment.methods == {"a": cat["fedavg-30"] + cat["half"] + ["federation.rounds=60"],
                                      "b": []}
    # a list of names: each row is named after its entry
    cfg = load_config(grid(tmp_path, ["kd", "fedavg-30"], cat))
    assert cfg.experiment.methods == {"kd": [], "fedavg-30": cat["fedavg-30"]}
    with pytest.raises(ConfigError, match=r"experiment.methods.c: 'fedprox' is neither a "
                       r"key.path=value override nor an entry of .*methods.yaml"):
        load_config(grid(tmp_path, {"c": ["fedprox"]}, cat))
    (tmp_path / CATALOGUE).write_text(yaml.safe_dump({"kd": ["kd"]}))
    with pytest.raises(ConfigError, match="entry 'kd': expected a list of key.path=value"):
        load_config(grid(tmp_path, {"c": ["kd"]}))
    with pytest.raises(ConfigError, match="other.yaml: file not found"):
        load_config(grid(tmp_path, {"c": ["kd"]}, catalogue="other.yaml"))


def test_a_star_share_goes_to_every_public_set_not_named(tmp_path):
    cfg = load_config(write(tmp_path, {
        "data": {"proxy": ["RUNMC", "ucl", "public-pool"]},
        "distill": {"steps_per_epoch": 10, "set_weights": {"public-pool": 0.5, "*": 0.25}}}))
    assert cfg.distill.set_weights == {"RUNMC": 0.25, "ucl": 0.25, "public-pool": 0.5}
    explicit = load_config(write(tmp_path, {
        "data": {"proxy": ["RUNMC", "ucl", "public-pool"]},
        "distill": {"steps_per_epoch": 10, "set_weights": {"RUNMC": 0.25, "ucl": 0.25,
                                                           "public-pool": 0.5}}}))
    assert explicit == cfg          # the same run, so the same digest


def test_shipped_grids_take_methods_from_the_catalogue_and_set_only_data(tmp_path):
    """Every row of every grid in configs/ is catalogue entries plus data.* overrides: a method
    is defined once (configs/methods.yaml), a benchmark config sets only data and budgets."""
    catalogue = read_catalogue(REPO / "configs" / CATALOGUE)
    used = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == CATALOGUE:
            continue
        methods = (yaml.safe_load(path.read_text()).get("experiment") or {}).get("methods", {})
        for name, items in (methods.items() if isinstance(methods, dict) else []):
            for item in items:
                assert item in catalogue or item.startswith("data."), \
                    f"{path.name}: experiment.methods.{name}: {item!r} is not a catalogue entry"
                used.add(item)
    assert not set(catalogue) - used, f"catalogue entries no grid runs: {set(catalogue) - used}"
