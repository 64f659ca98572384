"""The demo's data ships with the project (demo/cnn_dailymail), so `make demo` runs with the network off: its
configuration loads the shipped rows offline, and a comparison on them scores documents end to end (on the tiny
random-init Llama: the point is the data path, not the model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_COMPARE

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.core.data import load_data

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


@pytest.fixture
def offline(monkeypatch):
    """No hub: the variables a user without network sets; the relative data path resolves from the repository root,
    where `make demo` runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


def shipped_ids(split: str) -> list[str]:
    folder = ROOT / load_config(DEMO_CONFIG).data.source
    return [json.loads(line)["id"] for line in (folder / f"{split}.jsonl").open()]


def test_the_demo_configuration_reads_the_shipped_data_offline(offline):
    cfg = load_config(DEMO_CONFIG)
    assert not Path(cfg.data.source).is_absolute() and (ROOT / cfg.data.source).is_dir()
    splits = load_data(cfg.data, seed=cfg.train.seed)
    assert (len(splits.train), len(splits.train_eval), len(splits.eval)) == (120, 12, 30)
    assert splits.info["skipped"] == 0
    for example in splits.train + splits.eval:
        assert example.document.strip() and example.summary.strip()
    assert {e.id for e in splits.eval} == set(shipped_ids("validation"))


def test_a_demo_comparison_scores_shipped_documents_offline(offline, tiny_model_dirs, tmp_path):
    out = tmp_path / "demo"
    args = ["compare", "--config", DEMO_CONFIG, "--model", tiny_model_dirs["llama"], "--methods", "lora",
            "--out", out, *TINY_COMPARE]
    assert main([str(a) for a in args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["source"] == "demo/cnn_dailymail" and results["data"]["eval_examples"] == 4
    ids = [json.loads(line)["id"] for line in (out / "lora" / "predictions_eval.jsonl").open()]
    assert len(set(ids)) == 4 and set(ids) <= set(shipped_ids("validation"))
    assert results["methods"]["lora"]["after"]["eval"]["n"] == 4
    assert len(results["methods"]["lora"]["after"]["eval"]["per_document"]["rouge1"]) == 4
    lead = results["baselines"]["lead"]
    assert [json.loads(line)["id"] for line in (out / lead["dir"] / "predictions_eval.jsonl").open()] == ids
    # Real news: its first three sentences share words with the highlights (25.3 ROUGE-1 on these four), which
    # placeholder text would not.
    assert lead["eval"]["n"] == 4 and lead["eval"]["rouge"]["rouge1"]["mean"] > 10


def test_the_shipped_folder_is_small_and_says_where_it_comes_from():
    folder = ROOT / "demo" / "cnn_dailymail"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "train.jsonl", "validation.jsonl"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    readme = (folder / "README.md").read_text()
    assert "Apache-2.0" in readme and "abisee/cnn_dailymail" in readme
    assert "demo/cnn_dailymail" in (ROOT / "NOTICE").read_text()


def test_the_demo_run_from_another_folder_is_refused_naming_the_missing_folder(tmp_path, monkeypatch, capsys):
    """Run outside the checkout, the relative data path finds no folder and falls through to the hub; with the network
    off the refusal says both, not only that the hub failed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--config", str(DEMO_CONFIG), "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    assert f"no folder 'demo/cnn_dailymail' under {tmp_path}" in message, message
