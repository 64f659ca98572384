"""IA3 against the real `peft` (0.21.x) on tiny random-init GPT-2 (Conv1D, fused c_attn) and Llama models, fp32.

Same vectors -> same logits; a fresh IA3 is the base model; peftsum's files load in peft and peft's in peftsum
(greedy tokens); merge / unmerge are exact (weights and biases); export writes a plain model that scores like the run;
every method runs in one comparison (`--methods all`), in the dry-run plan and in a sweep. Parity figures are printed
(`pytest -s tests/test_ia3.py`).
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import tiny_model
from test_lora_variants import DOCUMENT, _base_folder, _batch, _diff, _logits, load_in_peft
from transformers import AutoModelForCausalLM

from peftsum.cli import main
from peftsum.config import METHODS, RunConfig, load_config
from peftsum.core.prompts import encode_prompt, prompt_budget
from peftsum.core.session import load_run
from peftsum.errors import UserError
from peftsum.methods import adapters
from peftsum.methods.base import adapt
from peftsum.methods.ia3 import method as ia3

KINDS = ["gpt2", "llama"]
# peft's defaults: (targets, feed-forward targets), and the trainable numbers on the tiny models (2 blocks).
PEFT_DEFAULTS = {"gpt2": ({"c_attn", "mlp.c_proj"}, {"mlp.c_proj"}, 2 * (96 + 128)),
                 "llama": ({"k_proj", "v_proj", "down_proj"}, {"down_proj"}, 2 * (16 + 16 + 64))}


def _cfg() -> RunConfig:
    cfg = RunConfig()
    cfg.model.precision = "fp32"
    return cfg


@torch.no_grad()
def _as_if_trained(adapted, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for vector in ia3.modules(adapted.model).values():
        vector.ia3_l.add_(torch.randn(vector.ia3_l.shape, generator=g) * 0.3)


def _peft_vectors(peft_model) -> dict[str, torch.nn.Parameter]:
    base = peft_model.base_model.model
    return {n: m.ia3_l["default"] for n, m in base.named_modules() if "default" in getattr(m, "ia3_l", {})}


def _report(what: str, kind: str, value: float) -> None:
    print(f"\n[ia3 parity] {what} ({kind}): max abs diff = {value:.3e}")


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_matches_peft(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    adapted = adapt(copy.deepcopy(base), tokenizer, "ia3", _cfg())
    targets, feedforward, count = PEFT_DEFAULTS[kind]
    assert adapted.parameter_counts()["trainable"] == count
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM")).eval()
    assert set(peft_model.peft_config["default"].target_modules) == targets
    assert set(peft_model.peft_config["default"].feedforward_modules) == feedforward
    ours, theirs = ia3.modules(adapted.model), _peft_vectors(peft_model)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n].ia3_l, theirs[n]) for n in ours)  # the same shapes, all ones
    assert _diff(_logits(adapted.model, ids, mask), _logits(base, ids, mask), mask) == 0.0  # starts as the base

    _as_if_trained(adapted)
    with torch.no_grad():
        for name, vector in theirs.items():
            vector.copy_(ours[name].ia3_l)
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    _report("IA3 forward, padded batch", kind, diff)
    assert diff < 1e-5
    assert _diff(_logits(adapted.model, ids, mask), _logits(base, ids, mask), mask) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_saved_by_peftsum_loads_in_peft(kind, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    cfg = _cfg()
    adapted = adapt(copy.deepcopy(base), tokenizer, "ia3", cfg)
    _as_if_trained(adapted, seed=4)
    adapters.save(adapted, tmp_path / "adapter", f"tiny-{kind}", cfg)
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(config, peft.IA3Config) and config.fan_in_fan_out == (kind == "gpt2")
    assert (set(config.target_modules), set(config.feedforward_modules)) == PEFT_DEFAULTS[kind][:2]
    peft_model = load_in_peft(copy.deepcopy(base), tmp_path / "adapter")
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    _report("IA3 peftsum file -> peft", kind, diff)
    assert diff < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_peft_made_ia3_adapter_generates_like_peft(kind, tokenizer, tmp_path, capsys):
    base_dir = _base_folder(kind, tokenizer, tmp_path / "base")
    # Non-default targets: attention output and the feed-forward input of one architecture each.
    targets = {"gpt2": (["c_attn", "attn.c_proj", "mlp.c_proj"], ["mlp.c_proj"]),
               "llama": (["v_proj", "o_proj", "up_proj"], ["o_proj", "up_proj"])}[kind]
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                peft.IA3Config(target_modules=targets[0], feedforward_modules=targets[1],
                                               task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for vector in _peft_vectors(model).values():
            vector.add_(torch.randn(vector.shape, generator=g) * 0.5)
    model.save_pretrained(str(tmp_path / "adapter"))
    cfg = load_config(None, {"eval.no_repeat_ngram_size": 0, "eval.max_new_tokens": 10})
    ids = torch.tensor([encode_prompt(tokenizer, DOCUMENT, cfg.data.template, prompt_budget(cfg.data))])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        plain = AutoModelForCausalLM.from_pretrained(base_dir).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    capsys.readouterr()
    assert main(["summarize", "--adapter", str(tmp_path / "adapter"), "--precision", "fp32",
                 "--eval.no_repeat_ngram_size", "0", "--eval.max_new_tokens", "10", str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() + "\n"
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_merge_and_unmerge_are_exact(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    with torch.no_grad():  # GPT-2 starts with zero biases, which scaling would leave unchanged
        for module in base.modules():
            if getattr(module, "bias", None) is not None and module.bias.dim() == 1:
                module.bias.normal_(0, 0.1)
    ids, mask = _batch(tokenizer)
    adapted = adapt(base, tokenizer, "ia3", _cfg())
    _as_if_trained(adapted, seed=6)
    before = {k: v.clone() for k, v in adapted.model.state_dict().items() if ".ia3." not in k}
    hooked = _logits(adapted.model, ids, mask)
    with adapted.for_generation():
        merged = _logits(adapted.model, ids, mask)
        changed = [k for k, v in adapted.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    # Every target's weight changes; GPT-2's c_attn bias too (its output is scaled, bias included).
    assert len(changed) == len(ia3.modules(adapted.model)) + (2 if kind == "gpt2" else 0)
    assert all(torch.equal(v, before[k]) for k, v in adapted.model.state_dict().items() if k in before)
    assert torch.equal(_logits(adapted.model, ids, mask), hooked)
    ia3.remove(adapted.model)
    assert not any("ia3" in k for k in adapted.model.state_dict())
    diff = max(_diff(merged, hooked, mask), _diff(_logits(adapted.model, ids, mask), hooked, mask))
    _report("IA3 merged (and exported) vs hooked logits", kind, diff)
    assert diff < 1e-5


def test_ia3_needs_targets_where_the_architecture_has_no_default(tokenizer):
    model = tiny_model("llama", tokenizer)
    model.config.model_type = "unknown-arch"
    with pytest.raises(UserError, match="ia3 has no default targets for model type 'unknown-arch'"):
        adapt(model, tokenizer, "ia3", _cfg())
    cfg = _cfg()
    cfg.ia3.targets = ["v_proj", "down_proj"]
    cfg.ia3.feedforward = ["down_proj"]
    assert "down_proj scaled on the input" in adapt(model, tokenizer, "ia3", cfg).description


# ---------------------------------------------------------------- every method, end to end

FAST = ["--random-init", "--precision", "fp32", "--train.max_steps", "3", "--train.batch_size", "4",
        "--data.train_eval_size", "2", "--eval-size", "3", "--eval.max_new_tokens", "6", "--eval.bootstrap_samples",
        "10", "--data.max_length", "64", "--data.max_summary_tokens", "12", "--prompt.num_virtual_tokens", "4"]


def test_compare_all_methods_then_export_and_sweep(tiny_model_dirs, tiny_data, tmp_path, capsys):
    model = str(tiny_model_dirs["gpt2"])
    assert main(["compare", "--dry-run", "--json", "--model", model, "--methods", "all", *FAST]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert list(plan["methods"]) == list(METHODS)
    assert plan["methods"]["ia3"]["trainable"] == PEFT_DEFAULTS["gpt2"][2]

    out = tmp_path / "all"
    assert main(["compare", "--model", model, "--data", str(tiny_data), "--methods", "all", "--out", str(out),
                 "--lora.variant", "dora", "--lora.lr_ratio", "4", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)
    assert results["methods"]["lora"]["params"]["description"].startswith("DoRA r=8")
    report = (out / "report.md").read_text()
    assert "IA3 vectors on c_attn, mlp.c_proj" in report and "DoRA" in report

    # Export: the merged model scores like the run (IA3 folded into weights and biases).
    assert main(["export", "--run", str(out / "ia3"), "--merged", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    cfg = load_config(out / "ia3" / "config.yaml")
    _, adapted = load_run(cfg, out / "ia3", progress=False)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        diff = (exported(input_ids=x).logits - adapted.model(input_ids=x).logits).abs().max().item()
    _report("export of an IA3 run vs the run", "gpt2", diff)
    assert diff < 1e-5

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--model", model, "--data", str(tiny_data), "--methods", "lora", "--vary",
                 "lora.variant=lora,dora,rslora", "--out", str(sweep), *FAST]) == 0
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert sorted(p["value"] for p in points if p["method"] == "lora") == ["dora", "lora", "rslora"]


def test_budgets_and_seeds_take_the_new_methods(tiny_model_dirs, tiny_data, tmp_path):
    out = tmp_path / "budget"
    i = FAST.index("--train.max_steps")
    args = FAST[:i] + FAST[i + 2:]  # the budget decides
    assert main(["compare", "--model", str(tiny_model_dirs["llama"]), "--data", str(tiny_data), "--methods", "ia3,lora",
                 "--lora.variant", "dora", "--lora.lr_ratio", "4", "--budget-tokens", "1500", "--seeds", "2",
                 "--eval.before", "false", "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    for method in ("ia3", "lora"):
        seed_runs = results["methods"][method]["seed_runs"]
        assert [r["seed"] for r in seed_runs] == [0, 1] and "across_seeds" in results["methods"][method]
        assert all(r["training"]["tokens"] >= 1500 and r["training"]["budget"]["kind"] == "tokens" for r in seed_runs)
    assert "2 seeds" in (out / "report.md").read_text()
