"""Run configs: YAML + --set overrides with typed values, defaults, and errors that name the key."""
import pytest
import yaml

from tur_ext.train.config import ConfigError, apply_overrides, dump_config, load_config, parse_value, parse_override

MINIMAL = {"train": {"steps": 10}}


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("-2", -2), ("1e-4", 1e-4), ("2.5", 2.5), ("-1.5E3", -1500.0), (".5", 0.5),
    ("true", True), ("False", False), ("null", None), ("None", None), ("~", None),
    ("[1, 2e-3, a]", [1, 2e-3, "a"]), ("{x: 1e-3}", {"x": 1e-3}),
    ("auto", "auto"), ("runs/a.b", "runs/a.b"), ("'007'", "007"), ('"true"', "true"),
])
def test_parse_value_types(text, expected):
    v = parse_value(text)
    assert v == expected and type(v) is type(expected)


def test_parse_override_errors_name_the_item():
    assert parse_override("train.steps=5") == (["train", "steps"], 5)
    assert parse_override("data.root=/a=b") == (["data", "root"], "/a=b")  # only the first '=' splits
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="bad key"):
        parse_override("train..steps=3")


def test_yaml_file_with_overrides_and_defaults(tmp_path):
    p = tmp_path / "my_run.yaml"
    # PyYAML reads "2e-4" as a string (YAML 1.1); the loader must still give a float.
    p.write_text("tasks: 3task\noptim:\n  lr: 2e-4\ntrain:\n  steps: 100\nmodel:\n  name: nafnet-tiny\n  width: 8\n")
    cfg = load_config(p, ["train.steps=7", "optim.weight_decay=0", "model.width=12", "data.patch_size=32",
                          "train.grad_clip=1"])
    assert cfg["name"] == "my_run" and cfg["output_dir"].endswith("my_run")
    assert cfg["optim"]["lr"] == 2e-4 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["train"]["steps"] == 7
    assert cfg["optim"]["weight_decay"] == 0.0 and isinstance(cfg["optim"]["weight_decay"], float)
    assert cfg["train"]["grad_clip"] == 1.0 and isinstance(cfg["train"]["grad_clip"], float)
    assert cfg["model"]["width"] == 12  # open section: passed on to the model builder
    assert cfg["data"]["patch_size"] == 32
    # defaults filled in
    assert cfg["train"]["amp"] == "none" and cfg["train"]["keep_last"] == 3 and cfg["loss"]["name"] == "tur"


@pytest.mark.parametrize("overrides, key", [
    (["train.stepz=3"], "train.stepz"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.steps=2.5"], "train.steps"),
    (["train.steps=-1"], "train.steps"),
    (["train.amp=fp8"], "train.amp"),
    (["loss.name=mse"], "loss.name"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["train.channels_last=1"], "train.channels_last"),
    (["device=tpu"], "device"),
    (["tasks=9task"], "tasks"),
    (["train.resume=3"], "train.resume"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(raw=MINIMAL, overrides=overrides)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean 'train\.steps'"):
        load_config(raw={"train": {"step": 3}})


def test_steps_xor_epochs_and_tur_needs_the_head():
    with pytest.raises(ConfigError, match="train.steps.*train.epochs"):
        load_config(raw={})
    with pytest.raises(ConfigError, match="train.steps.*train.epochs"):
        load_config(raw={"train": {"steps": 3, "epochs": 2}})
    with pytest.raises(ConfigError, match="model.uncertainty"):
        load_config(raw=MINIMAL, overrides=["model.uncertainty=false"])
    cfg = load_config(raw=MINIMAL, overrides=["model.uncertainty=false", "loss.name=l1"])
    assert cfg["model"]["uncertainty"] is False


def test_set_indexes_lists():
    raw = {"train": {"steps": 3}, "data": {"type": "combined", "datasets": [{"type": "gopro"}, {"type": "lol"}]}}
    out = apply_overrides(raw, ["data.datasets.1.root=/x/LOL"])
    assert out["data"]["datasets"][1] == {"type": "lol", "root": "/x/LOL"}
    assert raw["data"]["datasets"][1] == {"type": "lol"}  # the input is not modified
    with pytest.raises(ConfigError, match="list index below 2"):
        apply_overrides(raw, ["data.datasets.2.root=/x"])


def test_set_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(raw=MINIMAL, overrides=["optim.lr=3e-4", "data.patch_size=48", "tasks=[derain, dehaze]"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(raw=yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)
