"""LN-tuning against the real `peft` (0.21.x) on tiny random-init GPT-2 (LayerNorm: weight and bias), Llama and
Gemma 3 (RMSNorm: weight only) models, fp32; then end to end through the command line.

peftsum trains the model's own norms where peft trains copies of them: the trainable set, the saved keys and the
logits with the same values must still be peft's, and adapter files must load both ways. Parity figures are printed
(`pytest -s tests/test_lntuning.py`).
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import TINY_COMPARE, tiny_model
from peft.utils import get_peft_model_state_dict
from test_lora_variants import DOCUMENT, _base_folder, _batch, _diff, _logits, load_in_peft
from transformers import AutoModelForCausalLM

from peftsum.cli import main
from peftsum.config import RunConfig, load_config
from peftsum.core.session import load_adapter, load_run
from peftsum.errors import UserError
from peftsum.methods import adapters
from peftsum.methods.base import adapt

KINDS = ["gpt2", "llama", "gemma3"]


def _cfg(**settings) -> RunConfig:
    cfg = RunConfig()
    cfg.model.precision = "fp32"  # exact parity: keep the frozen weights in fp32
    for key, value in settings.items():
        setattr(cfg.lntuning, key, value)
    return cfg


def _peft_model(base, **config):
    return peft.get_peft_model(base, peft.LNTuningConfig(task_type="CAUSAL_LM", **config)).eval()


def _peft_trained(peft_model) -> dict[str, torch.nn.Parameter]:
    """peft's trainable copies by the model parameter they stand for (`<module>.weight`)."""
    return {n.removeprefix("base_model.model.").replace(".ln_tuning_layers.default", ""): p
            for n, p in peft_model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _as_if_trained(adapted, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for param in adapted.trainable:
        param.add_(torch.randn(param.shape, generator=g) * 0.3)


def _report(what: str, kind: str, value: float) -> None:
    print(f"\n[lntuning parity] {what} ({kind}): max abs diff = {value:.3e}")


# ---------------------------------------------------------------- parity with peft

@pytest.mark.parametrize("kind", KINDS)
def test_trains_what_peft_trains_and_saves_it_under_peft_keys(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lntuning", _cfg())
    peft_model = _peft_model(copy.deepcopy(base))
    ours = adapted.named_trainable()
    assert ours.keys() == _peft_trained(peft_model).keys()
    assert adapted.parameter_counts()["trainable"] == sum(p.numel() for p in _peft_trained(peft_model).values())
    assert any(k.endswith(".bias") for k in ours) == (kind == "gpt2")  # LayerNorm has a bias, RMSNorm has none
    saved = adapted.method.saved_tensors(adapted)
    assert saved.keys() == get_peft_model_state_dict(peft_model).keys()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_same_values_give_peft_logits(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lntuning", _cfg())
    assert _diff(_logits(adapted.model, ids, mask), _logits(base, ids, mask), mask) == 0.0  # starts as the base
    _as_if_trained(adapted)
    peft_model = _peft_model(copy.deepcopy(base))
    ours = adapted.named_trainable()
    with torch.no_grad():
        for name, param in _peft_trained(peft_model).items():
            param.copy_(ours[name])
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    _report("LN-tuning forward, padded batch", kind, diff)
    assert diff < 1e-5
    assert _diff(_logits(adapted.model, ids, mask), _logits(base, ids, mask), mask) > 1e-2  # not vacuous


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_saved_by_peftsum_loads_in_peft(kind, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    cfg = _cfg()
    adapted = adapt(copy.deepcopy(base), tokenizer, "lntuning", cfg)
    _as_if_trained(adapted, seed=4)
    adapters.save(adapted, tmp_path / "adapter", f"tiny-{kind}", cfg)
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(config, peft.LNTuningConfig) and config.peft_type == "LN_TUNING"
    peft_model = load_in_peft(copy.deepcopy(base), tmp_path / "adapter")
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    _report("LN-tuning peftsum file -> peft", kind, diff)
    assert diff < 1e-5


def test_an_architecture_peft_does_not_list_trains_every_norm_and_peft_loads_it(tokenizer, tmp_path):
    base = tiny_model("gemma3", tokenizer, seed=0)
    base.config.model_type = "gemma3_mystery"  # not in peft's mapping: peft would need target_modules
    ids, mask = _batch(tokenizer)
    cfg = _cfg()
    adapted = adapt(copy.deepcopy(base), tokenizer, "lntuning", cfg)
    assert "q_norm, k_norm" in adapted.description
    assert "(19 normalisation layers)" in adapted.description  # 6 in each of 3 blocks, and the final norm
    _as_if_trained(adapted, seed=2)
    adapters.save(adapted, tmp_path / "adapter", "tiny-gemma3", cfg)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"input_layernorm", "q_norm", "k_norm", "post_attention_layernorm",
                                             "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"}
    peft_model = load_in_peft(copy.deepcopy(base), tmp_path / "adapter")
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    _report("LN-tuning on an unlisted architecture, peftsum file -> peft", "gemma3", diff)
    assert diff < 1e-5


@pytest.mark.parametrize("kind, targets", [("gpt2", None), ("llama", ["input_layernorm", "model.norm"])])
def test_peft_made_adapter_loads_in_peftsum(kind, targets, tokenizer, tmp_path, capsys):
    base_dir = _base_folder(kind, tokenizer, tmp_path / "base")
    peft_model = _peft_model(AutoModelForCausalLM.from_pretrained(base_dir), target_modules=targets)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for param in _peft_trained(peft_model).values():
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    cfg = _cfg()
    _, adapted = load_adapter(cfg, tmp_path / "adapter", progress=False)
    assert adapted.name == "lntuning" and adapted.named_trainable().keys() == _peft_trained(peft_model).keys()
    ids, mask = _batch(tokenizer)
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    assert diff < 1e-5
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    assert main(["summarize", "--adapter", str(tmp_path / "adapter"), "--precision", "fp32",
                 str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out.strip()
    _report("LN-tuning peft file -> peftsum", kind, diff)  # after the summary is read: capsys would swallow it

    # Exported, it is the model peft's merge_and_unload gives (the trained copies in the norms' place).
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    diff = _diff(_logits(exported, ids, mask), _logits(peft_model.merge_and_unload(), ids, mask), mask)
    _report("LN-tuning peft file exported vs peft merge_and_unload", kind, diff)
    assert diff < 1e-5


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("targets, message", [
    ([], "lntuning.targets is empty"),
    (["input layernorm"], "is not a module name"),
])
def test_bad_settings_are_refused_before_torch(targets, message):
    with pytest.raises(UserError, match=message) as caught:
        load_config(None, {"lntuning.targets": targets})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("targets, message", [
    (["c_attn"], "c_attn (Conv1D), which is not a normalisation layer"),
    (["no_such_norm"], "match no module of this gpt2; its normalisation layers include transformer.h.0.ln_1"),
])
def test_targets_that_are_not_norms_are_refused(targets, message, tokenizer):
    with pytest.raises(UserError) as caught:
        adapt(tiny_model("gpt2", tokenizer), tokenizer, "lntuning", _cfg(targets=targets))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("config, message", [
    ({"target_modules": ".*layernorm"}, "regular expression"),
    ({"exclude_modules": ["model.norm"]}, "LN-tuning options not supported by peftsum: exclude_modules"),
    ({"modules_to_save": ["lm_head"]}, "LN-tuning options not supported by peftsum: modules_to_save"),
])
def test_unsupported_peft_adapters_are_refused(config, message, tiny_model_dirs, tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    base = str(tiny_model_dirs["llama"])
    full = {"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "target_modules": ["input_layernorm"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    (folder / "adapter_model.safetensors").write_bytes(b"never read")
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    capsys.readouterr()
    assert main(["summarize", "--adapter", str(folder), "--random-init", str(tmp_path / "doc.txt")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- end to end

def test_compare_train_evaluate_summarize_export(tiny_model_dirs, tiny_data, tmp_path, capsys):
    model = str(tiny_model_dirs["gpt2"])
    assert main(["compare", "--dry-run", "--json", "--model", model, "--methods", "lntuning", *TINY_COMPARE]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["methods"]["lntuning"]["trainable"] == 2 * 2 * (32 + 32) + (32 + 32)  # ln_1, ln_2 per block; ln_f
    out = tmp_path / "cmp"
    assert main(["compare", "--model", model, "--data", str(tiny_data), "--methods", "lntuning", "--out", str(out),
                 *TINY_COMPARE]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["lntuning"]
    assert results["methods"]["lntuning"]["params"]["description"].startswith("LN-tuning: the weights and biases")
    assert "**lntuning**: LN-tuning: the weights and biases of ln_1, ln_2, ln_f (5 normalisation layers)" in (
        out / "report.md").read_text()
    config = json.loads((out / "lntuning" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and set(config["target_modules"]) == {"ln_1", "ln_2", "ln_f"}

    run = tmp_path / "run"
    assert main(["train", "--method", "lntuning", "--model", model, "--data", str(tiny_data), "--out", str(run),
                 *TINY_COMPARE]) == 0
    assert (run / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    assert main(["summarize", "--run", str(run), str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out.strip()

    # Export: the trained norms are the model's own weights, so the plain model scores like the run.
    assert main(["export", "--run", str(run), "--merged", str(tmp_path / "merged")]) == 0
    exported, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = load_config(run / "config.yaml")
    cfg.model.precision = "fp32"
    _, adapted = load_run(cfg, run, progress=False)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        diff = (exported.eval()(input_ids=x).logits - adapted.model(input_ids=x).logits).abs().max().item()
        torch.manual_seed(cfg.train.seed)
        base = AutoModelForCausalLM.from_config(copy.deepcopy(exported.config))(input_ids=x).logits
    _report("export of an LN-tuning run vs the run", "gpt2", diff)
    assert diff < 1e-5
    assert (exported(input_ids=x).logits - base).abs().max().item() > 1e-4  # training changed the norms
