"""Prefix tuning and P-tuning on tiny random-init GPT-2 and Llama models (fp32, CPU, offline).

Parity with peft 0.21.2: the same seed builds the same initial weights as peft, which give the same logits; adapter
files load both ways (peftsum -> PeftModel.from_pretrained, peft -> `--adapter` with peft's greedy and beam tokens);
a left-padded batch gives every row what it gives alone (logits, loss, greedy tokens, rows leaving the batch); an
interrupted run resumes to the same weights; and the commands a user runs work end to end. Figures are printed
(`pytest -s tests/test_prefix_ptuning.py`).
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import max_diff, step_losses, tiny_model, trained_weights, write_tiny_data
from transformers import AutoModelForCausalLM

from peftsum.cli import main
from peftsum.config import RunConfig, load_config
from peftsum.core.forward import collate, generate_batch, greedy, model_inputs, prefix_cache, summary_loss
from peftsum.core.prompts import IGNORE, Encoded, encode_prompt, prompt_budget
from peftsum.core.session import load_adapter
from peftsum.methods import adapters
from peftsum.methods.base import adapt
from peftsum.training import checkpoint

KINDS = ["gpt2", "llama"]
N_VIRTUAL = 5
# (method, settings): each method with its two encoders.
CASES = [("prefix", {}), ("prefix", {"projection": True}),
         ("ptuning", {}), ("ptuning", {"encoder_reparameterization_type": "lstm"})]
CASE_IDS = ["prefix", "prefix-projection", "ptuning-mlp", "ptuning-lstm"]
TEXTS = ["the council said on monday that new rules for city buses will start next year",
         "drivers asked for cheaper fares"]


def _report(what: str, value: float) -> None:
    print(f"\n[prefix/ptuning] {what}: max abs diff = {value:.3e}")


def _run_config(method: str, settings: dict | None = None) -> RunConfig:
    cfg = RunConfig()
    cfg.model.precision = "fp32"
    section = getattr(cfg, method)
    section.num_virtual_tokens = N_VIRTUAL
    if method == "prefix":
        section.init = "random"  # peft's initialisation: with one seed, peft's initial weights
    for key, value in (settings or {}).items():
        setattr(section, key, value)
    return cfg


def _peft_config(method: str, settings: dict | None = None):
    settings = settings or {}
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                       prefix_projection=settings.get("projection", False))
    kind = settings.get("encoder_reparameterization_type", "mlp").upper()
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                    encoder_reparameterization_type=kind)


def _twins(kind: str, method: str, settings: dict, tokenizer, seed: int = 3):
    """(peftsum adapted model, peft model) on copies of one base model, each built from `seed`."""
    base = tiny_model(kind, tokenizer, seed=0)
    torch.manual_seed(seed)
    adapted = adapt(copy.deepcopy(base), tokenizer, method, _run_config(method, settings))
    adapted.model.eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(method, settings)).eval()
    return adapted, theirs, base


def _ids(tokenizer, texts, length=None):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, peftsum's layout
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def _logits(adapted, ids, mask) -> torch.Tensor:
    """peftsum's logits of the real tokens' positions (the last L), however the method feeds the model."""
    embeds, m, positions, _ = model_inputs(adapted, ids, mask)
    logits = adapted.model(inputs_embeds=embeds, attention_mask=m, position_ids=positions,
                           past_key_values=prefix_cache(adapted, len(embeds)), use_cache=False).logits
    return logits[:, -ids.shape[1]:]


@torch.no_grad()
def _peft_logits(peft_model, ids, mask, **kwargs) -> torch.Tensor:
    return peft_model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -ids.shape[1]:]


def _load_in_peft(base, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert [str(w.message) for w in caught if "missing" in str(w.message).lower()
            or "unexpected" in str(w.message).lower()] == []
    return peft_model


@torch.no_grad()
def _as_if_trained(adapted, seed: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in adapted.trainable:
        p.add_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- same weights -> same logits as peft

@pytest.mark.parametrize("method, settings", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_peft_initial_weights_and_logits(kind, method, settings, tokenizer):
    adapted, theirs, base = _twins(kind, method, settings, tokenizer)
    ours_state, peft_state = adapted.prompt_encoder.state_dict(), theirs.prompt_encoder["default"].state_dict()
    assert list(ours_state) == list(peft_state)  # peft's parameter names
    assert all(torch.equal(ours_state[k], peft_state[k]) for k in ours_state)
    assert adapted.parameter_counts()["trainable"] == theirs.get_nb_trainable_parameters()[0]

    ids, mask = _ids(tokenizer, TEXTS, length=7)  # equal lengths: no padding, peft's own layout
    ours, reference = _logits(adapted, ids, mask), _peft_logits(theirs, ids, mask)
    diff = (ours - reference).abs().max().item()
    _report(f"{CASE_IDS[CASES.index((method, settings))]} vs peft, unpadded ({kind})", diff)
    assert diff < 1e-5
    with torch.no_grad():
        assert (ours - base(input_ids=ids).logits).abs().max().item() > 1e-2  # not vacuous

    if method == "prefix":
        # peft shifts given position ids past its prefix: with peftsum's positions it handles padding as peftsum.
        ids, mask = _ids(tokenizer, TEXTS)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = (_logits(adapted, ids, mask) - _peft_logits(theirs, ids, mask, position_ids=positions)).abs()
        diff = padded[mask.bool()].max().item()
        _report(f"{CASE_IDS[CASES.index((method, settings))]} vs peft with position ids, left-padded ({kind})", diff)
        assert diff < 1e-5


# ---------------------------------------------------------------- files: peftsum -> peft -> peftsum

@pytest.mark.parametrize("method, settings", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapter_loads_in_peft_and_back_with_the_same_logits(kind, method, settings, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    cfg = _run_config(method, settings)
    torch.manual_seed(3)
    adapted = adapt(copy.deepcopy(base), tokenizer, method, cfg)
    adapted.model.eval()
    _as_if_trained(adapted)
    adapters.save(adapted, tmp_path / "adapter", f"tiny-{kind}", cfg)

    config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert type(config) is type(_peft_config(method, settings)) and config.inference_mode
    assert config.num_virtual_tokens == N_VIRTUAL
    peft_model = _load_in_peft(copy.deepcopy(base), tmp_path / "adapter")
    ids, mask = _ids(tokenizer, TEXTS, length=7)
    ours = _logits(adapted, ids, mask)  # the live model, MLP or LSTM included
    diff = (ours - _peft_logits(peft_model, ids, mask)).abs().max().item()
    _report(f"{CASE_IDS[CASES.index((method, settings))]} peftsum file -> peft ({kind})", diff)
    assert diff < 1e-5

    again = adapt(copy.deepcopy(base), tokenizer, method, cfg)  # a fresh model, as `--run` builds it
    adapters.load_into(again, tmp_path / "adapter")
    again.model.eval()
    assert again.parameter_counts()["trainable"] == N_VIRTUAL * again.prompt_encoder.embedding.weight.shape[1]
    assert (_logits(again, ids, mask) - ours).abs().max().item() < 1e-5


# ---------------------------------------------------------------- files: peft -> peftsum

@pytest.mark.parametrize("method, settings", [CASES[1], CASES[3]], ids=["prefix-projection", "ptuning-lstm"])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_made_adapter_gives_peft_greedy_and_beam_tokens(kind, method, settings, tokenizer, tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_model(kind, tokenizer, seed=0).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                     _peft_config(method, settings)).eval()
    with torch.no_grad():  # peft's initialisation is random already; make the adapter matter more on a flat model
        for p in peft_model.prompt_encoder["default"].parameters():
            p.mul_(3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    document = " ".join(TEXTS)
    (tmp_path / "doc.txt").write_text(document)
    cfg = load_config(None, {"eval.no_repeat_ngram_size": 0, "eval.max_new_tokens": 10, "model.precision": "fp32"})
    ids = encode_prompt(tokenizer, document, cfg.data.template, prompt_budget(cfg.data, N_VIRTUAL))
    x = torch.tensor([ids])
    settings_for = dict(max_new_tokens=10, do_sample=False, no_repeat_ngram_size=0,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        greedy_ids = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), **settings_for)
        beam_ids = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), num_beams=3, **settings_for)
    theirs = [tokenizer.decode(out[len(ids):], skip_special_tokens=True).strip() for out in (greedy_ids[0], beam_ids[0])]

    capsys.readouterr()
    assert main(["summarize", "--adapter", str(tmp_path / "adapter"), "--precision", "fp32", "--eval.max_new_tokens",
                 "10", "--eval.no_repeat_ngram_size", "0", str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out == theirs[0] + "\n"

    _, adapted = load_adapter(cfg, tmp_path / "adapter", progress=False)
    assert adapted.name == method
    beams = generate_batch(adapted, tokenizer, [ids], max_new_tokens=10, num_beams=3, no_repeat_ngram_size=0,
                           repetition_penalty=1.0, stop_ids=(tokenizer.eos_token_id,))
    assert beams == [theirs[1]]
    diff = (_logits(adapted, x, torch.ones_like(x)) - _peft_logits(peft_model, x, torch.ones_like(x))).abs().max()
    _report(f"peft-made {method} adapter in peftsum vs peft ({kind})", diff.item())
    assert diff < 1e-5
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=x).logits
    assert (_logits(adapted, x, torch.ones_like(x)) - plain).abs().max().item() > 1e-2


# ---------------------------------------------------------------- left padding = each row alone

@pytest.mark.parametrize("method", ["prefix", "ptuning"])
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_gives_each_row_what_it_gives_alone(kind, method, tokenizer):
    torch.manual_seed(3)
    adapted = adapt(tiny_model(kind, tokenizer), tokenizer, method, _run_config(method))
    adapted.model.eval()
    _as_if_trained(adapted)
    ids, mask = _ids(tokenizer, TEXTS)
    lengths = mask.sum(1).tolist()
    assert lengths[0] > lengths[1]  # the second row is left-padded
    batched = _logits(adapted, ids, mask)
    diffs = [(batched[row, -n:] - _logits(adapted, ids[row:row + 1, -n:], torch.ones(1, n, dtype=torch.long))[0])
             .abs().max().item() for row, n in enumerate(lengths)]
    _report(f"{method}: left-padded batch vs each row alone, logits ({kind})", max(diffs))
    assert max(diffs) < 1e-5

    encoded = [Encoded(ids[row, -n:].tolist(), [IGNORE] * 3 + ids[row, -n + 3:].tolist())
               for row, n in enumerate(lengths)]
    with torch.no_grad():
        together, count = summary_loss(adapted, collate(encoded, tokenizer.pad_token_id))
        alone = [summary_loss(adapted, collate([e], tokenizer.pad_token_id)) for e in encoded]
    assert count == sum(n for _, n in alone)
    alone_total = sum(loss for loss, _ in alone)
    _report(f"{method}: left-padded batch vs rows alone, summed loss ({kind})", abs(together - alone_total))
    assert together.item() == pytest.approx(alone_total.item(), abs=1e-4)

    prompts = [ids[row, -n:].tolist() for row, n in enumerate(lengths)]
    settings = dict(max_new_tokens=6, no_repeat_ngram_size=0, repetition_penalty=1.0,
                    stop_ids=(tokenizer.eos_token_id,))
    for beams in (1, 2):
        assert (generate_batch(adapted, tokenizer, prompts, num_beams=beams, **settings)
                == [generate_batch(adapted, tokenizer, [p], num_beams=beams, **settings)[0] for p in prompts])


@pytest.mark.parametrize("kind", KINDS)
def test_rows_leaving_the_batch_keep_their_prefix(kind, tokenizer):
    """peftsum's greedy loop drops finished rows from its cache: the others keep their prefix and their tokens."""
    torch.manual_seed(3)
    adapted = adapt(tiny_model(kind, tokenizer), tokenizer, "prefix", _run_config("prefix"))
    adapted.model.eval()
    _as_if_trained(adapted)
    texts = TEXTS + ["new rules for city buses", "the council said"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    @torch.no_grad()
    def run(prompts, eos):
        batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts], tokenizer.pad_token_id)
        embeds, mask, _, _ = model_inputs(adapted, batch["input_ids"], batch["attention_mask"])
        return greedy(adapted.model, embeds, mask, max_new_tokens=8, stop_ids=[eos],
                      prefix=adapted.method.key_value_prefix(adapted, len(prompts)))

    endless = [run([r], eos=-1)[0] for r in rows]
    # As "EOS", a token that some row makes early and another row never makes: one row leaves, another goes on.
    eos = next(t for tokens in endless for t in tokens[:6] if any(t not in other for other in endless))
    alone = [run([r], eos)[0] for r in rows]
    assert min(len(tokens) for tokens in alone) < 8 == max(len(tokens) for tokens in alone), alone
    assert run(rows, eos) == alone


@pytest.mark.parametrize("method, settings", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_frozen_weights_train_and_generate(kind, method, settings, tokenizer):
    """Frozen weights in bf16 next to the fp32 prefix or encoder: the prefix joins the bf16 cache, gradients reach it."""
    from peftsum.core.forward import autocast

    cfg = _run_config(method, settings)
    cfg.model.precision = "bf16"
    adapted = adapt(tiny_model(kind, tokenizer), tokenizer, method, cfg)
    assert adapted.frozen_dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in adapted.trainable)
    ids, mask = _ids(tokenizer, TEXTS)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, IGNORE)}
    with autocast(torch.device("cpu"), torch.bfloat16):
        loss, count = summary_loss(adapted, batch)
    (loss / count).backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.trainable)
    prompts = [ids[row, -n:].tolist() for row, n in enumerate(mask.sum(1).tolist())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for beams in (1, 2):
            texts = generate_batch(adapted, tokenizer, prompts, max_new_tokens=3, num_beams=beams,
                                   no_repeat_ngram_size=0, repetition_penalty=1.0,
                                   stop_ids=(tokenizer.eos_token_id,))
            assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# ---------------------------------------------------------------- interrupted runs

TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.epochs", "2", "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "0",
        "--prefix.num_virtual_tokens", "4", "--ptuning.num_virtual_tokens", "4", "--train.checkpoint_every", "2"]


@pytest.mark.parametrize("method, kind, extra", [
    ("prefix", "llama", ["--prefix.projection", "true"]),
    ("ptuning", "gpt2", ["--ptuning.encoder_reparameterization_type", "lstm", "--ptuning.encoder_dropout", "0.1"]),
])
def test_an_interrupted_run_resumes_to_identical_weights(method, kind, extra, tiny_model_dirs, tiny_data, tmp_path,
                                                         monkeypatch, capsys):
    from test_reliability import ctrl_c, on_training_forward

    args = ["train", "--method", method, "--model", str(tiny_model_dirs[kind]), "--data", str(tiny_data), *TINY,
            *extra]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    on_training_forward(monkeypatch, 9, ctrl_c)  # in epoch 2, after the checkpoint of step 8
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    saved = checkpoint.latest(tmp_path / "cut")
    assert saved.name == "step-00000009"
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert f"resuming {method} from" in capsys.readouterr().out
    whole = trained_weights(tmp_path / "whole")
    assert list(whole) == ["prompt_embeddings"]
    assert max_diff(trained_weights(tmp_path / "cut"), whole) == 0.0
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "whole")


# ---------------------------------------------------------------- the command line, end to end

FAST = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.batch_size", "4", "--data.train_eval_size", "2", "--eval-size", "3", "--eval.max_new_tokens", "6",
        "--eval.bootstrap_samples", "10", "--prefix.num_virtual_tokens", "4", "--ptuning.num_virtual_tokens", "4",
        "--eval.before", "false", "--prefix.lr", "0.05", "--ptuning.lr", "0.05"]


def test_compare_evaluate_summarize_sweep_and_export_run_end_to_end(tiny_model_dirs, tmp_path, capsys):
    data = write_tiny_data(tmp_path / "data", n_train=12, n_eval=3)
    out = tmp_path / "x"
    common = ["--model", str(tiny_model_dirs["llama"]), "--data", str(data), *FAST]

    capsys.readouterr()
    assert main(["compare", *common, "--methods", "prefix,ptuning", "--dry-run", "--json", "--out", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["methods"]["prefix"]["trainable"] == 4 * 2 * 2 * 16  # N x layers x (keys, values) x kv width
    assert plan["methods"]["ptuning"]["trainable"] > 4 * 32  # the encoder trains, not only the 4 x 32 output

    assert main(["compare", *common, "--methods", "prefix,ptuning", "--seeds", "2", "--budget-tokens", "600",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"prefix", "ptuning"}
    report = (out / "report.md").read_text()
    assert "key/value prefix" in report and "prompt encoder" in report
    for method in ("prefix", "ptuning"):
        run = out / method / "seed-0"
        assert (run / "adapter_config.json").is_file()
        predictions = [json.loads(line) for line in (run / "predictions_eval.jsonl").read_text().splitlines()]
        capsys.readouterr()
        assert main(["summarize", "--run", str(run), "--input", str(data / "validation.jsonl"), "--output", "-"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        by_id = {r["id"]: r["prediction"] for r in rows}
        assert [by_id[p["id"]] for p in predictions] == [p["prediction"] for p in predictions]
        assert main(["evaluate", "--run", str(run), "--split", "eval", "--out", str(tmp_path / f"{method}-eval")]) == 0
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--merged", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot be exported as a plain model" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "m").exists()

    assert main(["sweep", *common, "--methods", "prefix", "--vary", "prefix.num_virtual_tokens=2,4", "--max-steps",
                 "2", "--out", str(tmp_path / "sw")]) == 0
    points = json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"]
    assert sorted(p["trainable_params"] for p in points) == [2 * 2 * 2 * 16, 4 * 2 * 2 * 16]


def test_two_processes_train_and_score_like_one(tiny_model_dirs, tmp_path):
    from test_distributed import TINY as PARALLEL
    from test_distributed import ids, torchrun

    data = write_tiny_data(tmp_path / "data", n_train=24, n_eval=7)
    args = ["compare", "--model", tiny_model_dirs["llama"], "--data", data, "--methods", "prefix,ptuning", *PARALLEL,
            "--prefix.num_virtual_tokens", "4", "--prefix.projection", "true", "--ptuning.num_virtual_tokens", "4",
            "--eval.before", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    torchrun(tmp_path, two, *args)
    for method in ("prefix", "ptuning"):
        diff = max_diff(trained_weights(two / method), trained_weights(one / method))
        _report(f"{method}: two processes vs one, trained weights", diff)
        assert diff < 1e-6
        assert step_losses(two / method) == pytest.approx(step_losses(one / method), abs=1e-5)
        assert ids(two / method / "predictions_eval.jsonl") == ids(one / method / "predictions_eval.jsonl")


@pytest.mark.parametrize("flags, message", [
    (["--ptuning.encoder_num_layers", "3"], "apply to the lstm encoder only"),
    (["--ptuning.encoder_reparameterization_type", "gru"], "must be mlp or lstm"),
    (["--prefix.init", "vocab"], "prefix.init must be text or random"),
    (["--prefix.num_virtual_tokens", "60"], "leaves no room for the document"),
])
def test_bad_settings_are_refused_in_one_line(flags, message, tiny_model_dirs, tiny_data, tmp_path, capsys):
    assert main(["train", "--method", "prefix", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(tiny_data),
                 *FAST, *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# The real model: prefix tuning lowers SmolLM2's validation loss on XSum in tests/test_real_model.py, with the other
# methods (test_methods_lower_the_validation_loss).
