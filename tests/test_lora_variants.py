"""The LoRA options against the real `peft` (0.21.x): DoRA, rsLoRA, PiSSA / OLoRA initialisation, LoRA+.

Tiny random-init GPT-2 (Conv1D, fused c_attn) and Llama (nn.Linear) models, fp32 on CPU, offline. Each parity
check prints its max abs difference (`pytest -s tests/test_lora_variants.py`).

  * Same weights -> same logits (and, for DoRA with dropout in training mode, same gradients) as peft.
  * Same initialisation as peft: DoRA's magnitudes; PiSSA's and OLoRA's A, B and residual base weights.
  * A peftsum-saved adapter loads with PeftModel.from_pretrained on the ORIGINAL base model (PiSSA/OLoRA saved as
    peft's converted rank-2r LoRA) with the same logits; a peft-made one (DoRA, rsLoRA, PiSSA/OLoRA converted by
    peft) summarizes in peftsum with peft's greedy tokens.
  * Merge / unmerge are exact; LoRA+ makes peft's parameter groups; interrupted runs resume to identical weights.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import warnings
from pathlib import Path

import peft
import pytest
import torch
from conftest import max_diff, step_losses, tiny_model, trained_weights
from peft.optimizers import create_loraplus_optimizer
from transformers import AutoModelForCausalLM

from peftsum.cli import main
from peftsum.config import METHODS, RunConfig, load_config
from peftsum.core.prompts import encode_prompt, prompt_budget
from peftsum.core.session import fresh_adapted, load_run, open_session
from peftsum.errors import UserError
from peftsum.methods import adapters
from peftsum.methods.base import adapt
from peftsum.methods.lora import method as lora
from peftsum.methods.lora.config import LoraConfig
from peftsum.methods.registry import all_methods
from peftsum.training import train as train_module

KINDS = ["gpt2", "llama"]
RANK, ALPHA = 4, 8.0
TEXTS = ["the council said on monday that new rules for city buses will start next year",
         "drivers asked for cheaper fares"]
DOCUMENT = "the council said on monday that new rules for city buses will start next year after long talks"
PEFT_OPTIONS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


# ---------------------------------------------------------------- helpers

def _cfg(**options) -> RunConfig:
    cfg = RunConfig()
    cfg.model.precision = "fp32"  # exact parity: keep the frozen weights in fp32
    cfg.lora = LoraConfig(**{"rank": RANK, "alpha": ALPHA, **options})
    cfg.train.seed = 3
    return cfg


def _peft_config(kind: str, targets, **options) -> peft.LoraConfig:
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), fan_in_fan_out=(kind == "gpt2"),
                           task_type="CAUSAL_LM", **options)


def _peft_layers(peft_model) -> dict:
    base = peft_model.base_model.model
    return {n: m for n, m in base.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = torch.tensor(r), 1
    return ids, mask


def _diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def _as_if_trained(adapted, seed: int = 1) -> None:
    """Move A, B (and DoRA's magnitudes) away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    for module in lora.modules(adapted.model).values():
        module.lora_A.add_(torch.randn(module.lora_A.shape, generator=g) * 0.1)
        module.lora_B.add_(torch.randn(module.lora_B.shape, generator=g) * 0.2)
        if module.magnitude is not None:
            module.magnitude.mul_(1 + 0.1 * torch.randn(module.magnitude.shape, generator=g))


@torch.no_grad()
def _copy_into_peft(peft_model, adapted) -> None:
    ours = lora.modules(adapted.model)
    theirs = _peft_layers(peft_model)
    assert sorted(theirs) == sorted(ours)
    for name, layer in theirs.items():
        layer.lora_A["default"].weight.copy_(ours[name].lora_A)
        layer.lora_B["default"].weight.copy_(ours[name].lora_B)
        if ours[name].magnitude is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(ours[name].magnitude)


def load_in_peft(base, folder):
    """PeftModel.from_pretrained, asserting that peft warned about no missing or unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert [str(w.message) for w in caught if "missing" in str(w.message).lower()
            or "unexpected" in str(w.message).lower()] == []
    return peft_model


def _report(what: str, kind: str, value: float) -> None:
    print(f"\n[lora variants parity] {what} ({kind}): max abs diff = {value:.3e}")


# ---------------------------------------------------------------- 1. forward and gradients (DoRA, rsLoRA)

@pytest.mark.parametrize("variant", ["dora", "rslora"])
@pytest.mark.parametrize("kind", KINDS)
def test_variant_forward_and_gradients_match_peft(kind, variant, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    cfg = _cfg(variant=variant, dropout=0.2)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lora", cfg)
    targets = lora.chosen_targets(base, None)
    peft_model = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind, targets, lora_dropout=0.2,
                                                                       **PEFT_OPTIONS[variant]))
    ours, theirs = lora.modules(adapted.model), _peft_layers(peft_model)
    for name, layer in theirs.items():
        assert layer.scaling["default"] == pytest.approx(ours[name].scale)
    assert ours[next(iter(ours))].scale == pytest.approx(ALPHA / (math.sqrt(RANK) if variant == "rslora" else RANK))
    if variant == "dora":  # the same initial magnitudes, the rows' norms: the model starts as the base
        init = max(_diff(ours[n].magnitude, layer.lora_magnitude_vector["default"].weight)
                   for n, layer in theirs.items())
        _report("DoRA initial magnitudes vs peft", kind, init)
        assert init < 1e-5
        adapted.model.eval()
        assert _diff(_logits(adapted.model, ids, mask), _logits(base, ids, mask), mask) < 1e-5

    _as_if_trained(adapted)
    _copy_into_peft(peft_model, adapted)
    adapted.model.eval(), peft_model.eval()
    ours_logits, peft_logits = _logits(adapted.model, ids, mask), _logits(peft_model, ids, mask)
    diff = _diff(ours_logits, peft_logits, mask)
    _report(f"{variant} forward, padded batch", kind, diff)
    assert diff < 1e-5
    assert _diff(ours_logits, _logits(base, ids, mask), mask) > 1e-2  # not vacuous: the update matters

    # Training mode: the same dropout masks (same seed, same draws in the same order), the same gradients; for
    # DoRA this checks the dropout path and that the weight norm is a constant to the gradient, as in peft.
    adapted.model.train(), peft_model.train()
    grads = []
    for model in (adapted.model, peft_model):
        torch.manual_seed(7)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()] ** 2).mean().backward()
        grads.append(logits.detach())
    train_diff = _diff(grads[0], grads[1], mask)
    grad_diff = 0.0
    for name, layer in theirs.items():
        pairs = [(ours[name].lora_A, layer.lora_A["default"].weight),
                 (ours[name].lora_B, layer.lora_B["default"].weight)]
        if variant == "dora":
            pairs.append((ours[name].magnitude, layer.lora_magnitude_vector["default"].weight))
        for a, b in pairs:
            grad_diff = max(grad_diff, _diff(a.grad, b.grad) / max(1e-12, b.grad.abs().max().item()))
    _report(f"{variant} training-mode logits (dropout 0.2)", kind, train_diff)
    _report(f"{variant} gradients of A, B{', m' if variant == 'dora' else ''} (relative)", kind, grad_diff)
    assert train_diff < 1e-5 and grad_diff < 1e-4


# ---------------------------------------------------------------- 2. PiSSA / OLoRA initialisation

@pytest.mark.parametrize("init, kind", [("pissa", "gpt2"), ("pissa", "llama"), ("olora", "llama")])
def test_init_from_weights_matches_peft(kind, init, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lora", _cfg(init=init))
    targets = lora.chosen_targets(base, None)
    peft_model = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind, targets, init_lora_weights=init)).eval()
    ours, theirs = lora.modules(adapted.model), _peft_layers(peft_model)
    weights = max(max(_diff(ours[n].lora_A, t.lora_A["default"].weight),
                      _diff(ours[n].lora_B, t.lora_B["default"].weight),
                      _diff(adapted.model.get_submodule(n).weight, t.get_base_layer().weight))
                  for n, t in theirs.items())
    changed = max(_diff(adapted.model.get_submodule(n).weight, base.get_submodule(n).weight) for n in ours)
    logits = _logits(adapted.model, ids, mask)
    _report(f"{init} initial A, B and residual weights vs peft", kind, weights)
    _report(f"{init} initial logits vs peft", kind, _diff(logits, _logits(peft_model, ids, mask), mask))
    assert weights < 1e-5
    assert changed > 1e-2  # the frozen weights really lost B A * scale
    assert _diff(logits, _logits(peft_model, ids, mask), mask) < 1e-5
    assert _diff(logits, _logits(base, ids, mask), mask) < 1e-4  # ... and the model starts unchanged


def test_olora_on_conv1d_starts_unchanged(tokenizer):
    """peft's OLoRA decomposes Conv1D's transposed storage (a shape error on GPT-2's c_attn); ours decomposes the
    weight in nn.Linear layout, and the model starts as the base."""
    base = tiny_model("gpt2", tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lora", _cfg(init="olora"))
    for name, module in lora.modules(adapted.model).items():
        q = module.lora_B  # OLoRA's B: orthonormal columns
        assert _diff(q.T @ q, torch.eye(RANK)) < 1e-5
    assert _diff(_logits(adapted.model, ids, mask), _logits(base, ids, mask), mask) < 1e-4
    with pytest.raises(RuntimeError):
        peft.get_peft_model(copy.deepcopy(base), _peft_config("gpt2", ["c_attn"], init_lora_weights="olora"))(
            input_ids=ids)


def test_pissa_niter_approximates_the_exact_svd(tokenizer):
    base = tiny_model("llama", tokenizer, seed=0)
    exact = lora.modules(adapt(copy.deepcopy(base), tokenizer, "lora", _cfg(init="pissa")).model)
    torch.manual_seed(0)
    ids, mask = _batch(tokenizer)
    fast = adapt(copy.deepcopy(base), tokenizer, "lora", _cfg(init="pissa_niter_16"))
    assert _diff(_logits(fast.model, ids, mask), _logits(base, ids, mask), mask) < 1e-4
    # A random weight's spectrum is flat, so the subspaces differ; the energy they capture must be nearly optimal.
    worst = min(f.delta().norm().item() ** 2 / exact[n].delta().norm().item() ** 2
                for n, f in lora.modules(fast.model).items())
    print(f"\n[lora variants] pissa_niter_16: worst share of the exact top-r energy captured = {worst:.3f}")
    assert 0.9 < worst <= 1 + 1e-5


# ---------------------------------------------------------------- 3. peftsum file -> peft (original base)

OPTIONS = {"dora": {"variant": "dora"}, "rslora": {"variant": "rslora"}, "pissa": {"init": "pissa"},
           "olora": {"init": "olora"}, "pissa-rslora": {"init": "pissa", "variant": "rslora"}}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_saved_by_peftsum_loads_in_peft_on_the_original_base(kind, option, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    cfg = _cfg(**OPTIONS[option])
    adapted = adapt(copy.deepcopy(base), tokenizer, "lora", cfg)
    adapted.model.eval()
    _as_if_trained(adapted, seed=5)
    folder = tmp_path / "adapter"
    adapters.save(adapted, folder, f"tiny-{kind}", cfg)

    config = peft.PeftConfig.from_pretrained(str(folder))
    converted = "init" in OPTIONS[option]
    assert config.use_dora == (option == "dora") and config.use_rslora == ("rslora" in option)
    assert config.r == (2 * RANK if converted else RANK) and config.init_lora_weights is True
    peft_model = load_in_peft(copy.deepcopy(base), folder)  # the untouched base: PiSSA/OLoRA were converted
    diff = _diff(_logits(adapted.model, ids, mask), _logits(peft_model, ids, mask), mask)
    _report(f"{option} peftsum file -> peft on the original base", kind, diff)
    assert diff < 1e-4
    assert _diff(_logits(peft_model, ids, mask), _logits(base, ids, mask), mask) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_a_pissa_run_loads_back_as_it_trained(kind, tiny_model_dirs, tokenizer, tmp_path):
    """load_run (evaluate/summarize/export --run) rebuilds the untouched base and loads the converted adapter."""
    cfg = _cfg(init="pissa", variant="rslora")
    cfg.model.name, cfg.model.random_init, cfg.methods = str(tiny_model_dirs[kind]), True, ["lora"]
    session = open_session(cfg, progress=False)
    adapted = fresh_adapted(session, "lora")
    _as_if_trained(adapted, seed=2)
    folder = tmp_path / "run"
    adapters.save(adapted, folder, str(tiny_model_dirs[kind]), cfg)
    _, loaded = load_run(cfg, folder, progress=False)
    assert "r=8" in loaded.description and all(m.initial_A is None for m in lora.modules(loaded.model).values())
    ids, mask = _batch(tokenizer)
    adapted.model.eval()
    diff = _diff(_logits(adapted.model, ids, mask), _logits(loaded.model, ids, mask), mask)
    _report("PiSSA run (residual base + A, B) vs its loaded form (original base + rank-2r LoRA)", kind, diff)
    assert diff < 1e-4


# ---------------------------------------------------------------- 4. peft file -> peftsum, greedy tokens

def _base_folder(kind: str, tokenizer, folder: Path) -> Path:
    tiny_model(kind, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def _peft_made(kind: str, option: str, base_dir: Path, folder: Path) -> None:
    """A peft adapter with non-trivial weights in `folder`; PiSSA/OLoRA converted by peft's own save_pretrained."""
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    init = option if option in ("pissa", "olora") else True
    model = peft.get_peft_model(base, _peft_config(kind, targets, init_lora_weights=init, lora_dropout=0.1,
                                                   **PEFT_OPTIONS.get(option, {})))
    if init is not True:  # peft's documented way: keep the initial adapter, convert against it on save
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(folder.parent / "initial"))
        model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if "magnitude" in name else 0.3))
    model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=(
        None if init is True else str(folder.parent / "initial")))


@pytest.mark.parametrize("option, kind", [("dora", "gpt2"), ("dora", "llama"), ("rslora", "gpt2"),
                                          ("pissa", "gpt2"), ("pissa", "llama"), ("olora", "llama")])
def test_peft_made_adapter_generates_like_peft(kind, option, tokenizer, tmp_path, capsys):
    base_dir = _base_folder(kind, tokenizer, tmp_path / "base")
    folder = tmp_path / "adapter"
    _peft_made(kind, option, base_dir, folder)
    reference = load_in_peft(AutoModelForCausalLM.from_pretrained(base_dir), folder)  # on the original weights
    cfg = load_config(None, {"eval.no_repeat_ngram_size": 0, "eval.max_new_tokens": 10})
    ids = torch.tensor([encode_prompt(tokenizer, DOCUMENT, cfg.data.template, prompt_budget(cfg.data))])
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        plain = AutoModelForCausalLM.from_pretrained(base_dir).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    theirs = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    capsys.readouterr()
    assert main(["summarize", "--adapter", str(folder), "--precision", "fp32", "--eval.no_repeat_ngram_size", "0",
                 "--eval.max_new_tokens", "10", str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out == theirs + "\n"
    assert not torch.equal(out, plain)  # the adapter changes what is generated: the check is not vacuous


# ---------------------------------------------------------------- 5. merge / unmerge

@pytest.mark.parametrize("option", ["dora", "pissa", "rslora"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unmerge_are_exact(kind, option, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    ids, mask = _batch(tokenizer)
    adapted = adapt(base, tokenizer, "lora", _cfg(**OPTIONS[option]))
    adapted.model.eval()
    _as_if_trained(adapted, seed=7)
    original = {n: adapted.model.get_submodule(n).weight.detach().clone() for n in lora.modules(adapted.model)}
    hooked = _logits(adapted.model, ids, mask)
    with adapted.for_generation():
        merged = _logits(adapted.model, ids, mask)
        assert all(not torch.equal(adapted.model.get_submodule(n).weight, w) for n, w in original.items())
    assert all(torch.equal(adapted.model.get_submodule(n).weight, w) for n, w in original.items())  # bit for bit
    assert torch.equal(_logits(adapted.model, ids, mask), hooked)
    lora.remove(adapted.model)  # export: a plain model
    assert not any(".lora." in k for k in adapted.model.state_dict())
    exported = _logits(adapted.model, ids, mask)
    _report(f"{option} merged vs hooked logits", kind, _diff(merged, hooked, mask))
    assert _diff(merged, hooked, mask) < 1e-5 and _diff(exported, hooked, mask) < 1e-5


# ---------------------------------------------------------------- 6. LoRA+

@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_lora_plus_groups_as_peft_does(variant, tokenizer):
    base = tiny_model("llama", tokenizer, seed=0)
    cfg = _cfg(variant=variant, lr_ratio=16.0)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lora", cfg)
    ours = {}
    for group in adapted.method.param_groups(adapted, 1e-3):
        ours.update({id(p): group["lr"] for p in group["params"]})
    assert len(ours) == len(adapted.trainable)
    names = {id(p): n for n, p in adapted.named_trainable().items()}
    ours = {names[i]: lr for i, lr in ours.items()}  # e.g. model.layers.0.self_attn.q_proj.lora.lora_B

    peft_model = peft.get_peft_model(copy.deepcopy(base), _peft_config("llama", lora.chosen_targets(base, None),
                                                                       **PEFT_OPTIONS[variant]))
    optimizer = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3,
                                          loraplus_lr_ratio=16.0)
    peft_names = {id(p): n for n, p in peft_model.named_parameters()}
    theirs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:  # base_model.model.<module>.lora_B.default.weight -> <module>.lora.lora_B
            module, part = peft_names[id(p)].removeprefix("base_model.model.").split(".lora_")
            part = "magnitude" if part.startswith("magnitude") else "lora_" + part.split(".")[0]
            theirs[f"{module}.lora.{part}"] = group["lr"]
    assert ours == theirs
    assert sorted(set(ours.values())) == [1e-3, 1.6e-2]
    plain = adapt(copy.deepcopy(base), tokenizer, "lora", _cfg(variant=variant))
    assert plain.method.param_groups(plain, 1e-3) == [{"params": plain.trainable}]  # lr_ratio 1: one group


# ---------------------------------------------------------------- 7. resume to identical weights, every option

TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.epochs", "2", "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "0",
        "--train.checkpoint_every", "2", "--lora.lr", "1e-2", "--ia3.lr", "5e-2"]


@pytest.mark.parametrize("kind, method, flags", [
    ("gpt2", "lora", ["--lora.variant", "dora", "--lora.dropout", "0.1", "--lora.lr_ratio", "8"]),
    ("llama", "lora", ["--lora.init", "pissa", "--lora.variant", "rslora"]),
    ("llama", "lora", ["--lora.init", "olora", "--lora.lr_ratio", "16", "--train.grad_accum", "2"]),
    ("gpt2", "ia3", []),
    ("llama", "ia3", ["--precision", "bf16"]),
])
def test_interrupted_runs_resume_to_identical_weights(kind, method, flags, tiny_model_dirs, tiny_data, tmp_path,
                                                      monkeypatch, capsys):
    args = ["train", "--method", method, "--model", str(tiny_model_dirs[kind]), "--data", str(tiny_data), *TINY,
            *flags]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = train_module.summary_loss, iter(range(1, 1000))

    def interrupted(adapted, batch, *count):  # a real SIGINT during the 9th training forward pass (epoch 2)
        if next(calls) == 9:
            signal.raise_signal(signal.SIGINT)
        return real(adapted, batch, *count)

    monkeypatch.setattr(train_module, "summary_loss", interrupted)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert f"resuming {method} from" in capsys.readouterr().out
    whole, cut = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "cut")
    assert max_diff(cut, whole) == 0.0
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "whole")


# ---------------------------------------------------------------- 8. settings

def test_methods_all_runs_every_registered_method():
    registered = all_methods()
    assert tuple(registered) == METHODS and all(m.name == name for name, m in registered.items())
    assert load_config(None, {"methods": "all"}).methods == list(registered)
    assert "ia3" in registered and "ia3" not in RunConfig().methods  # a plain comparison keeps its three methods


@pytest.mark.parametrize("overrides, message", [
    ({"lora.variant": "vera"}, "lora.variant must be lora, dora, rslora"),
    ({"lora.init": "pissa_niter_0"}, "lora.init must be default, pissa, olora or pissa_niter_N"),
    ({"lora.init": "pissa", "lora.variant": "dora"}, "does not combine with lora.variant dora"),
    ({"lora.lr_ratio": "0"}, "lora.lr_ratio must be > 0"),
    ({"ia3.targets": "k_proj", "ia3.feedforward": "down_proj"}, "must be among ia3.targets"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_pissa_rank_beyond_the_weight_is_refused(tokenizer):
    with pytest.raises(UserError, match="exceeds what lora.init pissa can take"):
        adapt(tiny_model("llama", tokenizer), tokenizer, "lora", _cfg(init="pissa", rank=64))


def test_a_comparison_written_before_these_settings_existed_still_resumes(tmp_path):
    """Settings an older results.json lacks (lora.variant, the ia3 section...) read as their defaults, which are
    what that version did; a non-default value is still a change that refuses the folder."""
    from peftsum.infra import runs

    cfg = load_config(None, {"out": str(tmp_path)})
    old = cfg.to_dict()
    del old["ia3"], old["lora"]["variant"], old["lora"]["lr_ratio"]
    (tmp_path / runs.RESULTS).write_text(json.dumps({"config": old, "methods": {}, "baseline": None}))
    runs.prepare_compare_folder(tmp_path, cfg, resume=True, overwrite=False)
    cfg.lora.variant = "dora"
    with pytest.raises(UserError, match="lora.variant: 'lora' -> 'dora'"):
        runs.prepare_compare_folder(tmp_path, cfg, resume=True, overwrite=False)
