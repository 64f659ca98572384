"""Baselines (baselines.py): lead-k with and without sentence punctuation, few-shot prompts that never exceed the
context, and a tiny chat-format comparison end to end (every baseline scored, read back on resume, the run's format
kept by summarize and export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftsum.cli import main
from peftsum.config import RunConfig, load_config
from peftsum.core.data import Example, Splits
from peftsum.core.prompts import ChatFormat, PlainFormat, prompt_format
from peftsum.study.baselines import few_shot_prompts, lead, shot_pool

# ---------------------------------------------------------------- lead-k


def test_lead_takes_the_first_sentences():
    text = "Mr. Smith went to Washington on Monday. He met the U.S. president! Was it useful? Nobody knows."
    assert lead(text, 2) == "Mr. Smith went to Washington on Monday. He met the U.S. president!"
    assert lead(text, 1) == "Mr. Smith went to Washington on Monday."
    assert lead(text, 9) == text  # fewer sentences than k: all of them


def test_lead_on_text_without_sentence_punctuation():
    # A line break ends a sentence even without a full stop (headlines, bullet lists).
    assert lead("City buses get new rules\nthe council said on monday\nriders asked for more", 2) == \
        "City buses get new rules the council said on monday"
    # Dialogues: one turn a line, whatever punctuation the turns have.
    dialogue = "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)"
    assert lead(dialogue, 2, unit="line") == "Amanda: I baked cookies. Do you want some? Jerry: Sure!"
    assert lead(dialogue, 2) == "Amanda: I baked cookies. Do you want some?"
    # No punctuation and no line break at all: one endless "sentence", cut as a generated summary would be.
    words = " ".join(f"word{i}" for i in range(500))
    assert lead(words, 3, max_words=40) == " ".join(f"word{i}" for i in range(40))
    assert lead("", 3) == ""


# ---------------------------------------------------------------- few-shot


def _examples(n: int, words: int) -> list[Example]:
    return [Example(f"t{i}", " ".join(["council buses riders"] * words) + f" {i}.", f"summary number {i}")
            for i in range(n)]


@pytest.mark.parametrize("chat", [True, False])
def test_few_shot_prompts_never_exceed_the_context(tokenizer, chat_tokenizer, chat):
    tok = chat_tokenizer if chat else tokenizer
    cfg = RunConfig()
    cfg.data.max_length, cfg.data.max_summary_tokens, cfg.eval.max_new_tokens = 96, 16, 20
    fmt = prompt_format(tok, cfg.data)
    assert isinstance(fmt, ChatFormat if chat else PlainFormat)
    shots, documents = _examples(4, 30), [e.document for e in _examples(5, 60)]
    seen = []
    for context in (2000, 400, 300, 250, 200, 120, 60):
        k, prompts = few_shot_prompts(fmt, shots, documents, cfg, context)
        seen.append(k)
        if k:
            assert len(prompts) == len(documents)
            assert max(map(len, prompts)) + cfg.eval.max_new_tokens <= context
            more = [fmt.few_shot(shots[:k + 1], d, cfg.data, fmt.budget(cfg.data)) for d in documents]
            assert k == len(shots) or max(map(len, more)) + cfg.eval.max_new_tokens > context  # the most that fit
            text = tok.decode(prompts[0])
            assert all(s.summary in text for s in shots[:k]) and "summary number" not in text.split(
                shots[k - 1].summary)[-1]  # the document itself comes after the last example, with no summary
        else:
            assert prompts == []
    assert seen == sorted(seen, reverse=True) and seen[0] == 4 and seen[-1] == 0  # fewer as the context shrinks


def test_chat_few_shot_is_the_templates_conversation(chat_tokenizer):
    cfg = RunConfig()
    fmt = prompt_format(chat_tokenizer, cfg.data)
    shots, document = _examples(2, 3), "the council said on monday"
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": f"{fmt.instruction}\n\n{shot.document}"},
                     {"role": "assistant", "content": shot.summary}]
    messages.append({"role": "user", "content": f"{fmt.instruction}\n\n{document}"})
    expected = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert fmt.few_shot(shots, document, cfg.data, fmt.budget(cfg.data)) == expected


def test_shot_pool_leaves_out_the_scored_training_rows():
    train = _examples(6, 2)
    pool, scored = shot_pool(Splits(train, train[:2], [], {}))
    assert [e.id for e in pool] == ["t2", "t3", "t4", "t5"] and scored
    pool, scored = shot_pool(Splits(train, train, [], {}))
    assert pool == train and not scored


# ---------------------------------------------------------------- a chat-format comparison, end to end

FAST = ["--methods", "lora", "--train.max_steps", "3", "--train.batch_size", "4", "--data.train_eval_size", "2",
        "--eval-size", "4", "--eval.max_new_tokens", "8", "--eval.bootstrap_samples", "20", "--data.max_length", "96",
        "--data.max_summary_tokens", "12", "--precision", "fp32", "--lora.lr", "1e-2",
        "--baselines", "zero-shot,lead,few-shot"]


@pytest.fixture(scope="module")
def chat_run(tiny_chat_dirs, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("chat-run")
    data = write_tiny_data(root / "data")
    args = ["compare", "--model", str(tiny_chat_dirs["llama"]), "--random-init", "--data", str(data),
            "--out", str(root / "out"), *FAST]
    assert main(args) == 0
    return root / "out", args


def test_every_baseline_is_scored_on_the_methods_documents(chat_run):
    out, _ = chat_run
    results = json.loads((out / "results.json").read_text())
    assert results["prompt"]["format"] == "chat" and results["prompt"]["end_of_turn"] == "<|im_end|>"
    baselines = results["baselines"]
    assert list(baselines) == ["zero-shot", "zero-shot-plain", "lead", "few-shot"]
    assert [b["label"] for b in baselines.values()] == ["untouched model (chat)", "untouched model (plain)",
                                                       "lead-3", "few-shot (chat)"]
    assert results["baseline"] == {"train": baselines["zero-shot"]["train"], "eval": baselines["zero-shot"]["eval"]}
    method_ids = [json.loads(line)["id"] for line in (out / "lora" / "predictions_eval.jsonl").open()]
    for name, b in baselines.items():
        assert (out / b["dir"] / "metrics.json").is_file()
        ids = [json.loads(line)["id"] for line in (out / b["dir"] / "predictions_eval.jsonl").open()]
        assert ids == method_ids and len(b["eval"]["per_document"]["rouge1"]) == len(ids)
    assert baselines["lead"]["eval"]["loss"] is None and baselines["few-shot"]["shots"] >= 1
    # The same model in its two formats gives different prompts, so different losses.
    assert baselines["zero-shot"]["eval"]["loss"] != baselines["zero-shot-plain"]["eval"]["loss"]
    tests = {(t["a"], t["b"], t["metric"]) for t in results["analysis"]["tests"]}
    for other in ("untouched model", "zero-shot-plain", "lead", "few-shot"):
        assert ("lora", other, "rouge1") in tests
    assert ("untouched model", "zero-shot-plain", "rouge1") in tests
    assert results["analysis"]["baselines"]["strongest"]["rouge1"] in results["analysis"]["baselines"]["labels"]
    report = (out / "report.md").read_text()
    assert "### Baselines" in report and "| lead-3 | – |" in report and "Strongest baseline on eval ROUGE-1" in report
    assert "- **Prompt**: chat format (data.format auto" in report


def test_resume_reads_finished_baselines_back(chat_run, capsys):
    out, args = chat_run
    before = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    for label in ("untouched model (chat)", "untouched model (plain)", "lead-3", "few-shot (chat)"):
        assert f"{label}: scores read back from" in printed
    after = json.loads((out / "results.json").read_text())
    assert after["baselines"] == before["baselines"] and after["analysis"]["tests"] == before["analysis"]["tests"]


def test_a_chat_run_is_used_and_exported_in_its_format(chat_run, tiny_chat_dirs, tmp_path, capsys):
    out, _ = chat_run
    run = out / "lora"
    saved = load_config(run / "config.yaml", saved=True).data
    assert saved.format == "chat" and saved.instruction == "Summarize this text in a few sentences."
    expected = [json.loads(line) for line in (run / "predictions_eval.jsonl").open()]
    documents = {json.loads(line)["id"]: json.loads(line)["document"]
                 for line in (out.parent / "data" / "validation.jsonl").open()}
    (tmp_path / "doc.txt").write_text(documents[expected[0]["id"]])
    capsys.readouterr()
    assert main(["summarize", "--run", str(run), str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out == expected[0]["prediction"] + "\n"

    assert main(["export", "--run", str(run), "--merged", str(tmp_path / "merged")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    cfg = load_config(run / "config.yaml", saved=True)
    fmt = prompt_format(AutoTokenizer.from_pretrained(tiny_chat_dirs["llama"]), cfg.data)
    document = "the council said on monday that new rules"  # the run's max_length does not cut it (transformers won't)
    assert fmt.prompt(document, fmt.budget(cfg.data)) == fmt.prompt(document, 10 ** 6)
    (tmp_path / "doc.txt").write_text(document)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": document}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    assert ids == fmt.prompt(document, 10 ** 6)  # the exported template builds the run's prompt
    # It is a chat template peftsum can use too: the run's prompt once the instruction is left to the template.
    exported = prompt_format(tokenizer, load_config(None, {"data.instruction": ""}).data)
    assert exported.prompt(document, 10 ** 6) == ids and exported.end_of_turn == fmt.end_of_turn
    assert model.generation_config.eos_token_id == list(fmt.stop_ids) and len(fmt.stop_ids) == 2
    x = torch.tensor([ids])
    with torch.no_grad():  # generation_config as exported, except the n-gram ban (transformers' also sees the prompt)
        new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), no_repeat_ngram_size=0)[0, len(ids):]
    capsys.readouterr()
    assert main(["summarize", "--run", str(run), "--eval.no_repeat_ngram_size", "0", str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out == tokenizer.decode(new, skip_special_tokens=True).strip() + "\n"
    assert len(new) <= cfg.eval.max_new_tokens
