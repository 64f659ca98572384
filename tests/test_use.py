"""Using a result: `summarize` (runs, peft-made adapters, files, stdin, JSONL) and `export` of a merged model.

Everything runs on tiny random-init GPT-2, Llama and Gemma 3 models in fp32 on CPU, offline. The runs are
random-init, so `summarize --run` reproducing their predictions also checks that the base weights are rebuilt from the run's seed.
Parity figures are printed (`pytest -s tests/test_use.py`).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_model, write_tiny_data
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.core.forward import model_inputs
from peftsum.core.prompts import encode_prompt, prompt_budget
from peftsum.core.session import load_adapter, load_run

KINDS = ["gpt2", "llama", "gemma3"]
FAST = ["--train.max_steps", "3", "--train.batch_size", "4", "--data.train_eval_size", "2", "--eval-size", "4",
        "--eval.max_new_tokens", "8", "--eval.bootstrap_samples", "10", "--data.max_length", "64",
        "--data.max_summary_tokens", "12", "--prompt.num_virtual_tokens", "4", "--precision", "fp32",
        "--eval.before", "false", "--lora.lr", "1e-2", "--finetune.lr", "1e-2"]
NO_NGRAM = ["--eval.no_repeat_ngram_size", "0"]  # plain `generate(input_ids)` bans n-grams of the prompt too
NEW_TOKENS = 10
SUBSET_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj", "down_proj"],
                  "gemma3": ["q_proj", "v_proj", "down_proj"]}


def _report(what: str, value: float) -> None:
    print(f"\n[use parity] {what}: max abs logit diff = {value:.3e}")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("use") / "data")


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, data, tmp_path_factory) -> dict[str, Path]:
    """{kind: comparison folder} with lora/, prompt/, finetune/ trained a few steps on random-init tiny models."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in KINDS:
        out[kind] = root / kind
        assert main(["compare", "--model", str(tiny_model_dirs[kind]), "--random-init", "--data", str(data),
                     "--out", str(out[kind]), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def documents(data) -> dict[str, str]:
    return {row["id"]: row["document"] for row in _jsonl(data / "validation.jsonl")}


def _predictions(run: Path) -> list[dict]:
    return _jsonl(run / "predictions_eval.jsonl")


def _summarize(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["summarize", *map(str, args)]) == 0
    return capsys.readouterr().out


def _refused(capsys, args, message: str) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- summarize a run

@pytest.mark.parametrize("method", ["lora", "prompt", "finetune"])
@pytest.mark.parametrize("kind", KINDS)
def test_summarize_reproduces_the_runs_predictions(kind, method, runs, documents, tmp_path, capsys):
    run = runs[kind] / method
    expected = _predictions(run)
    source = tmp_path / "docs.jsonl"  # the run's eval documents, in its order, under another column name
    source.write_text("".join(json.dumps({"id": p["id"], "article": documents[p["id"]]}) + "\n" for p in expected))
    if kind == "gpt2":
        assert main(["summarize", "--run", str(run), "--input", str(source), "--output", str(tmp_path / "p.jsonl")]) == 0
        rows = _jsonl(tmp_path / "p.jsonl")
    else:  # --output - : JSONL on stdout
        rows = [json.loads(line) for line in _summarize(capsys, "--run", run, "--input", source, "--output", "-")
                .splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in expected]
    assert [r["prediction"] for r in rows] == [p["prediction"] for p in expected]
    # One document alone, as a file: the summary only, same text.
    (tmp_path / "one.txt").write_text(documents[expected[0]["id"]] + "\n")
    assert _summarize(capsys, "--run", run, tmp_path / "one.txt") == expected[0]["prediction"] + "\n"


def test_random_init_base_is_rebuilt_from_the_runs_seed(runs, documents, tmp_path, capsys):
    """The equality above depends on the seed: another seed builds other base weights and other summaries."""
    run = runs["gpt2"] / "lora"
    expected = _predictions(run)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"document": documents[p["id"]]}) + "\n" for p in expected))
    rows = _summarize(capsys, "--run", run, "--input", source, "--output", "-", "--seed", "1").splitlines()
    assert [json.loads(r)["prediction"] for r in rows] != [p["prediction"] for p in expected]
    assert [json.loads(r)["id"] for r in rows] == [0, 1, 2, 3]  # rows without an id: their index


def test_summarize_files_and_stdin_in_a_fresh_process(runs, documents, tmp_path):
    run = runs["llama"] / "lora"
    first, second = _predictions(run)[:2]
    (tmp_path / "a.txt").write_text(documents[first["id"]])
    result = subprocess.run([sys.executable, "-m", "peftsum", "summarize", "--run", str(run), str(tmp_path / "a.txt"),
                             "-"], input=documents[second["id"]], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"==> {tmp_path / 'a.txt'} <==\n{first['prediction']}\n\n"
                             f"==> <stdin> <==\n{second['prediction']}\n")


def test_generation_flags_override_the_runs_settings(runs, documents, tmp_path, capsys):
    run = runs["gpt2"] / "finetune"
    (tmp_path / "d.txt").write_text(documents[_predictions(run)[0]["id"]])
    short = _summarize(capsys, "--run", run, "--eval.max_new_tokens", "2", tmp_path / "d.txt").strip()
    full = _summarize(capsys, "--run", run, tmp_path / "d.txt").strip()
    assert full == _predictions(run)[0]["prediction"]  # the run's own max_new_tokens (8)
    assert full.startswith(short) and len(short) < len(full)  # greedy: 2 new tokens are a prefix of 8


@pytest.mark.parametrize("args, message", [
    (["summarize", "--run", "{run}"], "nothing to summarize"),
    (["summarize", "--run", "{run}", "-", "-"], "only once"),
    (["summarize", "--run", "{runs}", "{doc}"], "method folders are"),
    (["summarize", "--run", "{run}", "--input", "{bad_jsonl}"], "cannot tell which column"),
    (["summarize", "--run", "{run}", "--input", "{bad_jsonl}", "--document-column", "body"], "no column 'body'"),
    (["summarize", "--run", "{run}", "--input", "{doc}"], "expected JSONL rows"),
    (["summarize", "--run", "{run}", "{empty}"], "is empty"),
])
def test_summarize_user_errors(args, message, runs, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("the council said")
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "content": "the council said"}\n')
    values = {"{run}": runs["gpt2"] / "lora", "{runs}": runs["gpt2"], "{doc}": tmp_path / "doc.txt",
              "{bad_jsonl}": tmp_path / "bad.jsonl", "{empty}": tmp_path / "empty.txt"}
    _refused(capsys, [values.get(a, a) for a in args], message)


# ---------------------------------------------------------------- adapters made by peft

def _base_folder(kind: str, tokenizer, folder: Path) -> Path:
    """A tiny model saved with its weights and tokenizer, as a user's base model would be."""
    tiny_model(kind, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def _peft_adapter(kind: str, method: str, base_dir: Path, folder: Path):
    """A peft model on the base folder with non-trivial weights, saved to `folder`; returns the peft model."""
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()  # name_or_path: base_dir, which peft records
    torch.manual_seed(5)
    if method == "lora":
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=SUBSET_TARGETS[kind],
                                 fan_in_fan_out=(kind == "gpt2"), use_rslora=(kind == "llama"), task_type="CAUSAL_LM")
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="RANDOM")
    model = peft.get_peft_model(base, config).eval()
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name or "prompt_encoder" in name:  # B starts at zero: give the adapter an effect
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in name else 0.5))
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("method", ["lora", "prompt"])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_made_adapter_summarizes_like_peft(kind, method, tokenizer, documents, tmp_path, capsys):
    base_dir = _base_folder(kind, tokenizer, tmp_path / "base")
    folder = tmp_path / "adapter"
    peft_model = _peft_adapter(kind, method, base_dir, folder)
    model_flag = []
    if kind == "llama":  # the base named on the command line wins over the adapter's (here unreachable) path
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "/nonexistent/base-model"
        (folder / "adapter_config.json").write_text(json.dumps(config))
        model_flag = ["--model", base_dir]
    document = next(iter(documents.values()))
    (tmp_path / "doc.txt").write_text(document)

    # peft's own greedy generation on the same (unpadded) prompt ids.
    cfg = load_config(None, {"eval.no_repeat_ngram_size": 0, "eval.max_new_tokens": NEW_TOKENS})
    ids = encode_prompt(tokenizer, document, cfg.data.template, prompt_budget(cfg.data, 5 if method == "prompt" else 0))
    x = torch.tensor([ids])
    with torch.no_grad():
        out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out[0, :len(ids)], x[0])
    theirs = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    ours = _summarize(capsys, "--adapter", folder, *model_flag, *NO_NGRAM, "--eval.max_new_tokens", NEW_TOKENS,
                      "--precision", "fp32", tmp_path / "doc.txt")
    assert ours == theirs + "\n"

    # Logits: peftsum's model from the adapter folder (hooked and, for LoRA, merged as for generation) vs peft's.
    cfg.model.precision = "fp32"
    if model_flag:
        cfg.model.name = str(base_dir)
    _, adapted = load_adapter(cfg, folder, model_given=bool(model_flag), progress=False)
    assert adapted.name == method
    n = adapted.virtual_tokens
    with torch.no_grad():
        embeds, mask, positions, _ = model_inputs(adapted, x, torch.ones_like(x))
        hooked = adapted.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, n:]
        with adapted.for_generation():
            merged = adapted.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, n:]
        reference = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -len(ids):]
        plain = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=x).logits
    diff, merged_diff = (hooked - reference).abs().max().item(), (merged - reference).abs().max().item()
    _report(f"peft-made {method} adapter ({kind}) vs peft", diff)
    _report(f"peft-made {method} adapter ({kind}), merged for generation, vs peft", merged_diff)
    assert diff < 1e-5 and merged_diff < 1e-4
    assert (reference - plain).abs().max().item() > 1e-2  # the adapter matters: the check is not vacuous


def test_peft_adapter_on_layers_peftsum_does_not_adapt_is_refused(tokenizer, tmp_path, capsys):
    base_dir = _base_folder("gpt2", tokenizer, tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=2, target_modules=["c_attn", "wte"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    peft.get_peft_model(model, config).save_pretrained(str(tmp_path / "adapter"))
    (tmp_path / "doc.txt").write_text("the council said")
    _refused(capsys, ["summarize", "--adapter", tmp_path / "adapter", tmp_path / "doc.txt"],
             "layers peftsum does not adapt")


def _write_adapter(folder: Path, base: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "doc.txt").write_text("the council said")
    full = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 2,
            "lora_alpha": 4, "target_modules": ["c_attn"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    return folder


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "ADALORA"}, "supported: LORA, PROMPT_TUNING"),
    ({"target_modules": ".*attn.*"}, "regular expression"),
    ({"use_dora": True, "use_rslora": True}, "LoRA options not supported by peftsum: use_dora with use_rslora"),
    ({"init_lora_weights": "pissa"}, "applies to the residual base model"),
    ({"bias": "all"}, "bias=all"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "task_type"),
])
def test_unsupported_peft_adapters_are_refused(config, message, tiny_model_dirs, tmp_path, capsys):
    folder = _write_adapter(tmp_path / "adapter", tiny_model_dirs["gpt2"], **config)
    (folder / "adapter_model.safetensors").write_bytes(b"never read")
    _refused(capsys, ["summarize", "--adapter", folder, "--random-init", folder.parent / "doc.txt"], message)


def test_pickled_weights_are_refused_not_loaded(runs, tiny_model_dirs, tmp_path, capsys):
    # A pickle that would run code when unpickled: it must never be opened.
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    folder = _write_adapter(tmp_path / "adapter", tiny_model_dirs["gpt2"])
    (folder / "adapter_model.bin").write_bytes(payload)
    _refused(capsys, ["summarize", "--adapter", folder, "--random-init", folder.parent / "doc.txt"],
             "pickled weights are not loaded")
    run = tmp_path / "run"  # a fine-tuning run whose weights were replaced by a pickle
    run.mkdir()
    (run / "config.yaml").write_text((runs["gpt2"] / "finetune" / "config.yaml").read_text())
    (run / "finetuned.pt").write_bytes(payload)
    err = _refused(capsys, ["export", "--run", run, "--merged", tmp_path / "out"], "convert to safetensors")
    assert "finetuned.pt" in err and not marker.exists()


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("kind, method", [(kind, method) for method in ("lora", "finetune") for kind in KINDS])
def test_export_is_a_plain_model_that_generates_like_the_run(kind, method, runs, documents, tmp_path, capsys):
    run, out = runs[kind] / method, tmp_path / "merged"
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--merged", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and not any("lora" in k for k in keys)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out)

    document = documents[_predictions(run)[0]["id"]]
    (tmp_path / "doc.txt").write_text(document)
    cfg = load_config(run / "config.yaml")
    ids = encode_prompt(tokenizer, document, cfg.data.template, prompt_budget(cfg.data))
    x = torch.tensor([ids])
    with torch.no_grad():
        out_ids = model.eval().generate(input_ids=x, attention_mask=torch.ones_like(x),
                                        max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                        no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    exported_text = tokenizer.decode(out_ids[0, len(ids):], skip_special_tokens=True).strip()
    assert _summarize(capsys, "--run", run, *NO_NGRAM, tmp_path / "doc.txt") == exported_text + "\n"

    # Logits of the exported model vs the run's adapted model (LoRA unmerged, through its hooks).
    cfg.model.precision = "fp32"
    _, adapted = load_run(cfg, run, progress=False)
    with torch.no_grad():
        exported = model(input_ids=x).logits
        adapted_logits = adapted.model(input_ids=x).logits
        torch.manual_seed(cfg.train.seed)
        base = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))(input_ids=x).logits
    diff = (exported - adapted_logits).abs().max().item()
    _report(f"export of a {method} run ({kind}) vs the run", diff)
    assert diff < 1e-5
    assert (exported - base).abs().max().item() > 1e-4  # training changed the model: the export carries it


def test_export_refuses_prompt_runs_and_non_empty_folders(runs, tmp_path, capsys):
    _refused(capsys, ["export", "--run", runs["gpt2"] / "prompt", "--merged", tmp_path / "m"],
             "cannot be exported as a plain model")
    assert not (tmp_path / "m").exists()
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model.safetensors").write_bytes(b"stale")
    _refused(capsys, ["export", "--run", runs["llama"] / "lora", "--merged", out], "--overwrite")
    assert (out / "model.safetensors").read_bytes() == b"stale"
    assert main(["export", "--run", str(runs["llama"] / "lora"), "--merged", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    AutoModelForCausalLM.from_pretrained(out)  # the stale weights were replaced


def test_export_of_a_peft_lora_adapter_equals_peft_merge_and_unload(tokenizer, tmp_path, capsys):
    base_dir = _base_folder("gpt2", tokenizer, tmp_path / "base")  # GPT-2: Conv1D, merged transposed
    peft_model = _peft_adapter("gpt2", "lora", base_dir, tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = peft_model.merge_and_unload().eval()
    x = torch.tensor([tokenizer("the council said on monday that new rules", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        diff = (exported(input_ids=x).logits - reference(input_ids=x).logits).abs().max().item()
        base = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=x).logits
    _report("export of a peft LoRA adapter (gpt2) vs peft merge_and_unload", diff)
    assert diff < 1e-5 and (exported(input_ids=x).logits - base).abs().max().item() > 1e-2
