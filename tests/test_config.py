import copy
import dataclasses
import subprocess
import sys

import pytest

from peftsum.config import RunConfig, load_config, validate
from peftsum.errors import UserError
from peftsum.methods.registry import NAMES, settings_class


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 4\nlora:\n  rank: 16\nmethods: [lora, prompt]\n")
    cfg = load_config(path, {"train.epochs": "5", "lora.targets": "q_proj,v_proj"})
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 4
    assert cfg.lora.rank == 16 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.methods == ["lora", "prompt"]


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.to_dict()["lora"]["rank"] == cfg.lora.rank


@pytest.mark.parametrize("overrides, message", [
    ({"lora.rank": "0"}, "lora.rank must be >= 1"),
    ({"lora.lr": "-1"}, "lora.lr must be > 0"),
    ({"train.epochs": "two"}, "train.epochs: expected int"),
    ({"train.nope": "1"}, "unknown config key 'train.nope'"),
    ({"methods": "lora,adapterx"}, "unknown method 'adapterx'"),
    ({"data.template": "no placeholder"}, "must contain '{document}'"),
    ({"prompt.num_virtual_tokens": "250", "data.max_length": "256"}, "leaves no room for the document"),
])
def test_bad_values_are_refused_with_a_named_key(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_config(None, overrides)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    demo = load_config(root / "demo.yaml")
    study = load_config(root / "gpt2-cnndm.yaml")
    assert demo.model.name == "smollm2-135m"
    assert (study.train.epochs, study.train.batch_size, study.data.max_length) == (5, 10, 256)
    assert study.lora.lr == study.prompt.lr == study.finetune.lr == 5e-4
    assert (study.lora.rank, study.lora.alpha, study.prompt.num_virtual_tokens, study.prompt.init) == (8, 16, 10, "random")


def test_every_shipped_config_loads_and_names_its_output():
    # A config the README points users at must not break when a setting is renamed: load each one as shipped.
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = load_config(path)
        assert cfg.methods and cfg.out.startswith("runs/"), path.name


def test_generation_quantizes_to_int8_or_not_at_all():
    assert load_config(overrides={"eval.quantize": "int8"}).eval.quantize == "int8"
    with pytest.raises(UserError, match="eval.quantize must be none or int8, got 'int4'"):
        load_config(overrides={"eval.quantize": "int4"})


def test_each_method_brings_its_settings_section_from_the_registry():
    # The sections' order is what a saved config.yaml lists: the methods' sections sit between data and train.
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert fields == ["model", "data", "methods", "seeds", *NAMES, "train", "eval", "out"]
    cfg = RunConfig()
    assert all(type(getattr(cfg, name)) is settings_class(name) for name in NAMES)


def test_validation_checks_the_config_without_changing_it():
    cfg = load_config(None, {"train.compile": "TRUE", "methods": "all"})
    assert cfg.train.compile == "true"  # normalised where the value is read, not by validate
    before = copy.deepcopy(cfg)
    validate(cfg)
    assert cfg == before
    cfg.train.compile = "TRUE"  # set by code, past the reading: validate refuses it rather than mending it
    with pytest.raises(UserError, match="train.compile must be auto, true or false, got 'TRUE'"):
        validate(cfg)


def test_reading_and_checking_a_config_does_not_import_torch():
    code = ("import sys; from peftsum.config import load_config; load_config(None, {'methods': 'all'}); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
