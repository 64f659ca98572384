"""GGUF export (`peftsum export --gguf`): round trip through transformers' GGUF loader, the tokenizer, refusals, and
llama.cpp itself where llama-cpp-python is installed.

Tiny random-init Llama and GPT-2 runs are trained a few steps through the CLI and exported with `--merged` and
`--gguf` in one command; the GGUF file is loaded back with transformers (`from_pretrained(folder, gguf_file=name)`)
and compared with the merged folder: logits within a tolerance per type, relative to the largest logit, and the same
greedy tokens at f16/bf16. Figures are printed (`pytest -s tests/test_gguf.py`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, make_tokenizer, requires_real, tiny_config, tiny_model, write_tiny_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.core.prompts import encode_prompt, prompt_budget
from peftsum.errors import UserError
from peftsum.outputs.gguf_export import write_gguf

FAST = ["--train.max_steps", "3", "--train.batch_size", "4", "--data.train_eval_size", "2", "--eval-size", "4",
        "--eval.max_new_tokens", "8", "--eval.bootstrap_samples", "10", "--data.max_length", "64",
        "--data.max_summary_tokens", "12", "--prompt.num_virtual_tokens", "4", "--precision", "fp32",
        "--eval.before", "false", "--lora.lr", "1e-2", "--finetune.lr", "1e-2"]
# Largest |logit difference| over the largest |logit|, GGUF file against the merged model, at most. Measured on these
# runs (pytest -s): f16 3.7e-4, bf16 2.7e-3, q8_0 7.5e-3 at most; the bounds leave about three times that.
TOLERANCE = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 3e-2}
NEW_TOKENS = 12
requires_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                        reason="needs llama-cpp-python: pip install -e '.[llamacpp]'")
TEXTS = ["the council said on monday that new rules", "  riders who asked <eos> for more\n\nroutes, 2024!",
         "TL;DR: Summarize: cheaper fares <pad>"]


def _report(what: str, value: float) -> None:
    print(f"\n[gguf] {what}: {value:.3e}")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny config folders. GPT-2 gets 1024 positions: transformers' GGUF loader reads gpt2.context_length into
    n_ctx and keeps GPT2Config's default n_positions (1024), so a file of another length does not load there."""
    root = tmp_path_factory.mktemp("gguf-models")
    dirs = {}
    for kind, changes in (("llama", {}), ("gpt2", {"n_positions": 1024}), ("llama48", {"hidden_size": 48})):
        config = tiny_config(kind.removesuffix("48"), len(tokenizer))
        for key, value in changes.items():
            setattr(config, key, value)
        config.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("gguf") / "data")


@pytest.fixture(scope="module")
def runs(model_dirs, data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(kind, method) -> a run folder trained a few steps with `peftsum train`."""
    root = tmp_path_factory.mktemp("gguf-runs")
    out = {}
    for kind, method in (("llama", "lora"), ("gpt2", "lora"), ("llama", "finetune"), ("gpt2", "prompt"),
                         ("llama48", "lora")):
        out[kind, method] = root / f"{kind}-{method}"
        assert main(["train", "--method", method, "--model", str(model_dirs[kind]), "--random-init", "--data",
                     str(data), "--out", str(out[kind, method]), *FAST]) == 0
    return out


def _prompt_ids(run: Path, document: str, tokenizer) -> list[int]:
    cfg = load_config(run / "config.yaml")
    return encode_prompt(tokenizer, document, cfg.data.template, prompt_budget(cfg.data))


def _document(data: Path) -> str:
    return json.loads((data / "validation.jsonl").read_text().splitlines()[0])["document"]


def _export(run: Path, folder: Path, gguf_type: str) -> tuple[Path, Path]:
    merged, gguf = folder / "merged", folder / f"model-{gguf_type}.gguf"
    assert main(["export", "--run", str(run), "--merged", str(merged), "--gguf", str(gguf),
                 "--gguf-type", gguf_type]) == 0
    return merged, gguf


def _load_gguf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _greedy(model, ids: list[int], eos_id: int) -> list[int]:
    """transformers' greedy tokens after the prompt, up to NEW_TOKENS, without the final EOS."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             do_sample=False, no_repeat_ngram_size=0, eos_token_id=eos_id, pad_token_id=eos_id)
    tokens = out[0, len(ids):].tolist()
    return tokens[:-1] if tokens and tokens[-1] == eos_id else tokens


def _rounded(model, gguf_type: str):
    """A copy of `model` with every matrix rounded as the file stores it (f16, bf16, or Q8_0 blocks along each
    row of llama.cpp's layout, which for GPT-2's Conv1D weights is the transpose); vectors stay float32."""
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    copy = AutoModelForCausalLM.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in copy.named_parameters():
            if param.ndim < 2:
                continue
            if gguf_type != "q8_0":
                param.copy_(param.to(torch.float16 if gguf_type == "f16" else torch.bfloat16).float())
                continue
            transposed = model.config.model_type == "gpt2" and name.endswith(conv1d)
            rows = (param.t() if transposed else param).contiguous().numpy()
            back = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, q8_0), q8_0))
            param.copy_(back.t() if transposed else back)
    return copy


# ---------------------------------------------------------------- round trip

@pytest.mark.parametrize("kind, method, gguf_type", [
    ("llama", "lora", "f16"), ("llama", "lora", "bf16"), ("llama", "lora", "q8_0"), ("llama", "finetune", "f16"),
    ("gpt2", "lora", "f16"), ("gpt2", "lora", "bf16"), ("gpt2", "lora", "q8_0")])
def test_gguf_loads_back_in_transformers_like_the_merged_model(kind, method, gguf_type, runs, data, tmp_path):
    run = runs[kind, method]
    merged_dir, gguf = _export(run, tmp_path, gguf_type)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    back, back_tokenizer = _load_gguf(gguf)
    assert back.config.model_type == kind
    assert back.config.tie_word_embeddings == merged.config.tie_word_embeddings  # output.weight only when untied

    ids = _prompt_ids(run, _document(data), tokenizer)
    assert _prompt_ids(run, _document(data), back_tokenizer) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        expected, got = merged(input_ids=x).logits, back(input_ids=x).logits
        rounded = _rounded(merged, gguf_type)(input_ids=x).logits
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    _report(f"{kind} {method} {gguf_type}: max |logit diff| / max |logit|", relative)
    assert relative < TOLERANCE[gguf_type]
    # Exactly the merged model with its matrices rounded to the file's type: every tensor is where it belongs.
    assert torch.equal(got, rounded)
    if gguf_type != "q8_0":
        assert _greedy(back, ids, tokenizer.eos_token_id) == _greedy(merged, ids, tokenizer.eos_token_id)

    # The export carries the training: the untouched random-init base (same seed) gives other logits.
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    base = AutoModelForCausalLM.from_config(merged.config).eval()
    with torch.no_grad():
        assert (base(input_ids=x).logits - expected).abs().max().item() > 10 * (got - expected).abs().max().item()


def test_q8_0_is_smaller_and_bf16_is_the_size_of_f16(runs, tmp_path):
    sizes = {t: _export(runs["llama", "lora"], tmp_path / t, t)[1].stat().st_size for t in ("f16", "bf16", "q8_0")}
    assert sizes["bf16"] == sizes["f16"] and sizes["q8_0"] < 0.7 * sizes["f16"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tokenizer_round_trip(kind, runs, tmp_path):
    merged_dir, gguf = _export(runs[kind, "lora"], tmp_path, "f16")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    back = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert (back.eos_token, back.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)


def test_llama3_style_tokenizer_and_chat_template_round_trip(tmp_path):
    """A Split(regex) + ByteLevel(use_regex=False) tokenizer is written as llama.cpp's `llama-bpe`, with its BOS."""
    from gguf import GGUFReader
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from peftsum.outputs.gguf_export import _LLAMA3_SPLIT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")
    tokenizer.chat_template = "{% for m in messages %}<|begin|>{{ m['content'] }}<|end|>{% endfor %}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer) + 4)).eval()  # 4 padded rows
    path = tmp_path / "l3.gguf"
    written = write_gguf(model, tokenizer, path, "f16")
    assert written.path == path and written.tensors == len(list(model.parameters()))

    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{len(tokenizer) + 3}]"
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert back.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------- refusals

def _refused(capsys, args, message: str) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    return err


def test_export_refuses_what_it_cannot_write(runs, tmp_path, capsys):
    target = tmp_path / "out.gguf"
    _refused(capsys, ["export", "--run", runs["gpt2", "prompt"], "--gguf", target],
             "cannot be exported as a plain model")
    _refused(capsys, ["export", "--run", runs["llama", "lora"]], "--merged DIR")
    _refused(capsys, ["export", "--run", tmp_path / "missing", "--gguf", target], "is not a trained run folder")
    _refused(capsys, ["export", "--run", runs["llama", "lora"], "--gguf", tmp_path], "is a folder")
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal, one line through cli.Parser.error
        main(["export", "--run", str(runs["llama", "lora"]), "--gguf", str(target), "--gguf-type", "q4_0"])
    assert exit_.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
    _refused(capsys, ["export", "--run", runs["llama48", "lora"], "--gguf", target, "--gguf-type", "q8_0"],
             "multiple of 32")
    assert not target.exists() and not list(tmp_path.glob(".out.gguf-*"))  # refused before writing: no partial file

    target.write_bytes(b"keep me")
    _refused(capsys, ["export", "--run", runs["llama", "lora"], "--gguf", target], "--overwrite")
    assert target.read_bytes() == b"keep me"
    assert main(["export", "--run", str(runs["llama", "lora"]), "--gguf", str(target), "--overwrite"]) == 0
    assert target.read_bytes()[:4] == b"GGUF"


def test_unsupported_architectures_and_settings_are_refused(tokenizer, tmp_path):
    from tokenizers import normalizers
    from transformers import LlamaConfig, Qwen2Config

    qwen = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=4,
                                                        num_key_value_heads=2))
    with pytest.raises(UserError, match="does not support 'qwen2' models yet; supported: llama, gpt2"):
        write_gguf(qwen, tokenizer, tmp_path / "q.gguf")
    scaled = LlamaConfig(**{**tiny_config("llama", len(tokenizer)).to_dict(),
                            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})
    with pytest.raises(UserError, match="rope scaling 'linear'"):
        write_gguf(AutoModelForCausalLM.from_config(scaled), tokenizer, tmp_path / "r.gguf")
    odd = make_tokenizer()
    odd.backend_tokenizer.normalizer = normalizers.NFKC()
    with pytest.raises(UserError, match="byte-level BPE tokenizers"):
        write_gguf(tiny_model("llama", tokenizer), odd, tmp_path / "t.gguf")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
@requires_real
def test_real_model_lora_exports_to_f16_gguf_with_the_same_greedy_tokens(tmp_path):
    run = tmp_path / "lora"
    assert main(["train", "--method", "lora", "--data", str(SHARED_DATA / "xsum"), "--out", str(run),
                 "--train.max_steps", "2", "--train.batch_size", "4", "--train-size", "8", "--data.train_eval_size",
                 "0", "--eval-size", "2", "--eval.max_new_tokens", "8", "--eval.before", "false",
                 "--data.max_length", "256", "--eval.bootstrap_samples", "10"]) == 0
    merged_dir, gguf = _export(run, tmp_path, "f16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    back, back_tokenizer = _load_gguf(gguf)
    assert back.config.tie_word_embeddings and back_tokenizer.chat_template == tokenizer.chat_template
    rows = [json.loads(line) for line in (SHARED_DATA / "xsum" / "validation.jsonl").read_text().splitlines()[:2]]
    for row in rows:
        ids = _prompt_ids(run, row["document"], tokenizer)
        assert _prompt_ids(run, row["document"], back_tokenizer) == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (back(input_ids=x).logits - merged(input_ids=x).logits).abs().max().item()
        _report("SmolLM2 LoRA f16 GGUF: max |logit diff|", diff)
        assert _greedy(back, ids, tokenizer.eos_token_id) == _greedy(merged, ids, tokenizer.eos_token_id)


# ---------------------------------------------------------------- llama.cpp itself (pip install -e '.[llamacpp]')

def _llama_cpp_greedy(path: Path, ids: list[int], eos_id: int) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy tokens (via llama-cpp-python) after a prompt of token ids, and its last-position logits."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, logits_all=True, verbose=False)
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token == eos_id or len(tokens) == NEW_TOKENS:
            break
        tokens.append(token)
    logits = list(llm.scores[len(ids) - 1])
    llm.close()
    return tokens, logits


@pytest.mark.llamacpp
@requires_llama_cpp
@pytest.mark.parametrize("kind, gguf_type", [("llama", "f16"), ("llama", "bf16"), ("gpt2", "f16")])
def test_llama_cpp_generates_the_greedy_tokens_of_transformers(kind, gguf_type, runs, data, tmp_path):
    run = runs[kind, "lora"]
    merged_dir, gguf = _export(run, tmp_path, gguf_type)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = _prompt_ids(run, _document(data), tokenizer)
    tokens, logits = _llama_cpp_greedy(gguf, ids, tokenizer.eos_token_id)
    with torch.no_grad():
        expected = merged(input_ids=torch.tensor([ids])).logits[0, -1]
    relative = ((torch.tensor(logits) - expected).abs().max() / expected.abs().max()).item()
    _report(f"llama.cpp {kind} {gguf_type}: max |logit diff| / max |logit| at the last prompt position", relative)
    assert relative < TOLERANCE[gguf_type]
    expected_tokens = _greedy(merged, ids, tokenizer.eos_token_id)
    assert tokens == expected_tokens and len(expected_tokens) >= 4, (tokens, expected_tokens)


@pytest.mark.llamacpp
@pytest.mark.slow
@requires_llama_cpp
@requires_real
def test_llama_cpp_on_the_real_model(tmp_path):
    """The untouched embedded SmolLM2 (peftsum's fp32 cache) exported to f16: llama.cpp's tokens and greedy text."""
    import llama_cpp

    from peftsum.core.models import embedded_model_dir, load_tokenizer

    source = embedded_model_dir("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(source))
    path = write_gguf(model, tokenizer, tmp_path / "smollm2.gguf", "f16").path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False)
    rows = [json.loads(line) for line in (SHARED_DATA / "xsum" / "validation.jsonl").read_text().splitlines()[:2]]
    for row in rows:
        text = row["document"][:1500] + "\nTL;DR:"
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if token == tokenizer.eos_token_id or len(tokens) == NEW_TOKENS:
                break
            tokens.append(token)
        assert tokens == _greedy(model, ids, tokenizer.eos_token_id)
    llm.close()


def test_the_command_line_offers_exactly_the_writer_types():
    from peftsum.cli import export
    from peftsum.outputs.gguf_export import GGUF_TYPES

    assert export.GGUF_TYPES == GGUF_TYPES
