"""Model cards (README.md in the Hugging Face format) and `peftsum push`'s file list; the hub is never contacted
(push's client is replaced by a fake that records what it was asked to do)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_COMPARE, write_tiny_data

from peftsum.cli import main
from peftsum.evaluation.metrics import ROUGE_KEYS, bootstrap_interval, paired_bootstrap
from peftsum.outputs.formatting import ci, p_value, signed
from peftsum.outputs.model_card import CardInfo, render_card
from peftsum.outputs.push import upload_files
from peftsum.study.analysis import against_untouched

EMBEDDED_CONFIG = {"model": {"name": "smollm2-135m", "random_init": False, "precision": "bf16"},
                   "data": {"source": "xsum", "template": "{document}\nTL;DR:", "max_length": 256,
                            "max_summary_tokens": 64, "eval_split": "validation"},
                   "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": None, "lr": 5e-4},
                   "prompt": {"num_virtual_tokens": 10, "lr": 0.1}, "finetune": {"head": True, "lr": 5e-4},
                   "train": {"epochs": 1, "batch_size": 8, "seed": 3, "budget_seconds": 800.0},
                   "eval": {"max_new_tokens": 64, "num_beams": 1, "no_repeat_ngram_size": 3,
                            "bootstrap_samples": 200}}


def split(scores: list[float], loss: float) -> dict:
    return {"loss": loss, "n": len(scores), "rouge": {k: bootstrap_interval(scores, 200) for k in ROUGE_KEYS},
            "per_document": {k: scores for k in ROUGE_KEYS}}


MINE = [30.0, 25.5, 41.0, 18.0, 33.0, 29.0]
BASE = [20.0, 22.0, 30.0, 19.0, 21.5, 25.0]


def info(method: str = "lora", kind: str = "adapter", config: dict | None = None, **extra) -> CardInfo:
    after, baseline = {"eval": split(MINE, 2.66)}, {"eval": split(BASE, 3.11)}
    return CardInfo(method=method, kind=kind, config=config or EMBEDDED_CONFIG, where="runs/x/" + method,
                    params={"total": 135_436_608, "trainable": 921_600, "trainable_percent": 0.68,
                            "description": "LoRA r=8 alpha=16 on q_proj, v_proj"},
                    training={"steps": 347, "tokens": 650_000, "tokens_per_s": 823.0,
                              "epochs": [{"seconds": 400.0, "batches": 100, "of_batches": 100},
                                         {"seconds": 400.0, "batches": 47, "of_batches": 100}]},
                    after=after, baseline=baseline, paired=against_untouched(after, baseline, samples=200),
                    data={"source": "xsum", "document_column": "document", "summary_column": "summary",
                          "train_examples": 800, "eval_examples": 6}, **extra)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("method,kind,library,relation", [("lora", "adapter", "peft", "adapter"),
                                                          ("prompt", "adapter", "peft", "adapter"),
                                                          ("finetune", "tensors", "transformers", "finetune"),
                                                          ("lora", "merged", "transformers", "finetune")])
def test_front_matter_follows_the_hub_spec(method, kind, library, relation):
    meta = front_matter(render_card(info(method, kind)))
    assert meta["library_name"] == library and meta["base_model_relation"] == relation
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's hub original
    assert meta["datasets"] == ["EdinburghNLP/xsum"] and meta["metrics"] == ["rouge"]
    assert meta["pipeline_tag"] == "text-generation" and {"peftsum", "summarization"} <= set(meta["tags"])
    assert ("merged" in meta["tags"]) == (kind == "merged")
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "summarization"
    assert result["dataset"] == {"type": "EdinburghNLP/xsum", "name": "xsum", "split": "validation"}
    expected = split(MINE, 2.66)["rouge"]
    assert [m["value"] for m in result["metrics"]] == [round(expected[k]["mean"], 2) for k in ROUGE_KEYS]
    assert all(m["type"] == "rouge" for m in result["metrics"])


def test_scores_have_intervals_and_the_paired_test_against_the_untouched_model():
    card = render_card(info())
    mine, base = split(MINE, 2.66), split(BASE, 3.11)
    rows = {line.split(" | ")[0].strip("| "): line for line in card.splitlines() if line.startswith("| ")}
    intervals = " | ".join(ci(mine["rouge"][k]) for k in ROUGE_KEYS)
    assert rows["this model"] == f"| this model | 2.660 | {intervals} |"
    assert rows["untouched base model"].startswith("| untouched base model | 3.110 | " + ci(base["rouge"]["rouge1"]))
    test = paired_bootstrap(MINE, BASE, samples=200, seed=0)
    p = p_value(test["p_value"], 200)
    cell = f"{signed(test['diff'])} [{signed(test['low'])}, {signed(test['high'])}], p {p}"
    assert rows["difference (paired)"] == "| difference (paired) | −0.450 | " + " | ".join([cell] * 4) + " |"
    assert "paired bootstrap (200 resamples)" in card
    assert "800 s of training wall-clock" in card and "347 optimizer steps, 1.47 epochs" in card


def test_usage_matches_the_kind():
    adapter, tensors, merged = (render_card(info(m, k)) for m, k in
                                [("lora", "adapter"), ("finetune", "tensors"), ("lora", "merged")])
    assert "PeftModel.from_pretrained(base, 'runs/x/lora')" in adapter
    assert "peftsum summarize --run runs/x/lora article.txt" in adapter
    assert "load_file('runs/x/finetune/finetuned.safetensors'), strict=False" in tensors and "PeftModel" not in tensors
    assert "AutoModelForCausalLM.from_pretrained('runs/x/lora')" in merged and "PeftModel" not in merged
    # An export's chat template builds the run's prompt from the document alone.
    assert "peftsum summarize --model runs/x/lora --instruction '' article.txt" in merged
    assert 'messages = [{"role": "user", "content": open("article.txt").read()}]' in merged
    assert "prompt = '{document}\\nTL;DR:'.format(" in adapter  # a plain-format run, on its base model
    prompt = render_card(info("prompt", "adapter"))
    assert "one document at a time" in prompt and "one document at a time" not in adapter


def test_what_a_card_says_of_a_method_follows_the_method_protocol():
    """A merged export of an adapter is titled by the adapter's name, whatever the adapter (IA3's once read
    "fine-tuned model"); the note on peft's batching goes with every method that puts virtual tokens in the inputs."""
    titles = {m: render_card(info(m, "merged")).split("\n# ")[1].split("\n")[0] for m in ("lora", "ia3", "finetune")}
    assert titles == {"lora": "SmolLM2-135M-Instruct: LoRA-merged model for summarization (xsum)",
                      "ia3": "SmolLM2-135M-Instruct: (IA)³-merged model for summarization (xsum)",
                      "finetune": "SmolLM2-135M-Instruct: fine-tuned model for summarization (xsum)"}
    exported = {m: render_card(info(m, "merged", source_run="runs/x")) for m in ("ia3", "finetune")}
    assert "Exported from the run `runs/x` with the (IA)³ weights merged into the base weights." in exported["ia3"]
    assert "Exported from the run `runs/x`." in exported["finetune"]
    noted = {m for m in ("lora", "prompt", "ptuning", "prefix", "ia3") if "one document at a time" in
             render_card(info(m, "adapter"))}
    assert noted == {"prompt", "ptuning"}


def test_the_card_reads_its_paired_test_from_the_analysis():
    """No statistics are computed while rendering: a card without the analysis' comparison shows no paired row."""
    card = render_card(dataclasses.replace(info(), paired=None))
    assert "| difference (paired) |" not in card and "No paired test" in card
    untested = info()
    untested.paired = {**untested.paired, "tests": {k: {**t, "p_value": None} for k, t in untested.paired["tests"].items()}}
    assert "(not tested)" in render_card(untested)


def test_a_chat_format_run_is_described_and_prompted_as_trained():
    card_info = info("lora", "adapter")
    card_info.config = {**card_info.config, "data": {**card_info.config["data"], "format": "chat",
                                                      "instruction": "Summarize this article in one sentence."}}
    card = render_card(card_info)
    assert ("- **Prompt**: the model's chat template, a user turn holding the instruction 'Summarize this article in "
            "one sentence.' and the document;") in card
    assert ('messages = [{"role": "user", "content": \'Summarize this article in one sentence.\' + "\\n\\n" + '
            'open("article.txt").read()}]') in card
    assert "apply_chat_template(messages, add_generation_prompt=True" in card and "TL;DR" not in card


def test_a_gemma_card_carries_the_gemma_terms():
    """Whatever is trained on Gemma is a Model Derivative: its card names the license and passes on the notice."""
    gemma = {**EMBEDDED_CONFIG, "model": {**EMBEDDED_CONFIG["model"], "name": "gemma3-270m"}}
    card = render_card(info(config=gemma))
    meta = front_matter(card)
    assert meta["license"] == "gemma" and meta["base_model"] == "google/gemma-3-270m"
    assert "the Q4_K_M GGUF of google/gemma-3-270m" in card
    assert card.rstrip().endswith("(ai.google.dev/gemma/prohibited_use_policy).")
    assert "## License\n\nGemma is provided under and subject to the Gemma Terms of Use" in card
    smollm = render_card(info())
    assert "license" not in front_matter(smollm) and "## License" not in smollm
    random_weights = {**gemma, "model": {**gemma["model"], "random_init": True}}  # no Gemma weights in it
    assert "## License" not in render_card(info(config=random_weights))


def test_local_or_random_bases_and_local_data_have_no_hub_ids():
    config = {**EMBEDDED_CONFIG, "model": {"name": "/models/tiny", "random_init": True},
              "data": {**EMBEDDED_CONFIG["data"], "source": "/data/xsum"}}
    meta = front_matter(render_card(info(config=config)))
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta
    assert meta["metrics"] == ["rouge"] and meta["library_name"] == "peft"
    hub = {**EMBEDDED_CONFIG, "model": {"name": "gpt2"},
           "data": {**EMBEDDED_CONFIG["data"], "source": "knkarthick/dialogsum"}}
    meta = front_matter(render_card(info(config=hub)))
    assert meta["base_model"] == "gpt2" and meta["datasets"] == ["knkarthick/dialogsum"]


def test_a_card_without_scores_says_how_to_get_them():
    bare = CardInfo(method="lora", kind="adapter", config=EMBEDDED_CONFIG, where="runs/s/lora")
    card = render_card(bare)
    assert "metrics" not in front_matter(card) and "model-index" not in front_matter(card)
    assert "Not scored here" in card and "peftsum evaluate --run runs/s/lora" in card


# ---------------------------------------------------------------- cards written by compare, train and export


def test_compare_writes_a_card_into_every_method_folder(tiny_comparison):
    results = json.loads((tiny_comparison / "results.json").read_text())
    for method, library in (("lora", "peft"), ("prompt", "peft"), ("finetune", "transformers")):
        card = (tiny_comparison / method / "README.md").read_text()
        meta = front_matter(card)
        assert meta["library_name"] == library and "base_model" not in meta  # a random-init base has no hub id
        rouge1 = results["methods"][method]["after"]["eval"]["rouge"]["rouge1"]
        assert f"| this model | {results['methods'][method]['after']['eval']['loss']:.3f} | {ci(rouge1)} |" in card
        assert "| difference (paired) |" in card


def test_cards_of_an_older_comparison_gain_their_paired_tests(tiny_comparison):
    """results.json written before the analysis held the cards' tests: `upgrade` computes them, the same as compare's."""
    from peftsum.study.analysis import upgrade

    results = json.loads((tiny_comparison / "results.json").read_text())
    stored = results["analysis"].pop("against_untouched")
    assert set(stored) == {"lora", "prompt", "finetune"}
    assert upgrade(results)["analysis"]["against_untouched"] == stored


def test_train_and_export_write_cards(tiny_model_dirs, tiny_comparison, tmp_path):
    data = write_tiny_data(tmp_path / "data")
    args = ["train", "--method", "lora", "--model", tiny_model_dirs["llama"], "--data", data, "--out",
            tmp_path / "trained", *TINY_COMPARE]
    assert main([str(a) for a in args]) == 0
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "Not scored here" in card and front_matter(card)["library_name"] == "peft"
    assert main(["export", "--run", str(tiny_comparison / "lora"), "--merged", str(tmp_path / "merged")]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert f"Exported from the run `{tiny_comparison / 'lora'}`" in card and "| this model |" in card
    assert not (tiny_comparison / "lora" / "peftsum_config.yaml").exists()  # the source run is left alone


# ---------------------------------------------------------------- push


def test_upload_files_of_method_folders_and_exports(tiny_comparison, tmp_path):
    assert upload_files(tiny_comparison / "lora") == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "config.yaml", "metrics.json", "train_log.jsonl"]
    assert upload_files(tiny_comparison / "finetune") == ["README.md", "finetuned.safetensors", "config.yaml",
                                                          "metrics.json", "train_log.jsonl"]
    assert main(["export", "--run", str(tiny_comparison / "lora"), "--merged", str(tmp_path / "merged")]) == 0
    (tmp_path / "merged" / ".cache-note").write_text("hidden")
    expected = sorted(p.name for p in (tmp_path / "merged").iterdir() if not p.name.startswith("."))
    assert upload_files(tmp_path / "merged") == expected
    assert {"README.md", "config.json", "model.safetensors", "peftsum_config.yaml"} <= set(expected)


def _refusal(folder: Path, text: str) -> None:
    from peftsum.errors import UserError

    with pytest.raises(UserError, match=text):
        upload_files(folder)


def test_upload_files_refuses_what_is_not_one_result(tiny_comparison, tmp_path):
    _refusal(tiny_comparison, "is a whole comparison; push one of its method folders")
    seeds = tmp_path / "seeds" / "lora"
    shutil.copytree(tiny_comparison / "lora", seeds / "seed-0")
    _refusal(seeds, "holds one run per seed")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_comparison / "lora", unfinished)
    (unfinished / "checkpoints").mkdir()
    _refusal(unfinished, "unfinished run")
    no_card = tmp_path / "no-card"
    shutil.copytree(tiny_comparison / "lora", no_card)
    (no_card / "README.md").unlink()
    _refusal(no_card, "no model card")
    _refusal(tmp_path / "missing", "no such folder")


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, or raises what the real one raises offline."""

    calls: list = []
    error: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        if FakeHub.error is not None:
            raise FakeHub.error
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeHub.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.error = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_push_uploads_exactly_the_file_list(fake_hub, tiny_comparison, capsys):
    folder = tiny_comparison / "lora"
    assert main(["push", "--run", str(folder), "--repo", "me/tiny-lora", "--private"]) == 0
    (_, repo, create), (_, upload) = fake_hub.calls
    assert repo == "me/tiny-lora" and create == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/tiny-lora" and upload["folder_path"] == str(folder)
    assert upload["allow_patterns"] == upload_files(folder)
    assert "pushed 6 files" in capsys.readouterr().out


def test_push_offline_fails_in_one_line(fake_hub, tiny_comparison, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    fake_hub.error = OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode "
                                          "is enabled.")
    assert main(["push", "--run", str(tiny_comparison / "lora"), "--repo", "me/tiny-lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot push" in err and "offline mode is enabled" in err
