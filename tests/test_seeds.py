"""--seeds N: each method trained N times from different initialisations and batch orders on the same data; the
report gives mean ± std over seeds. Tiny random-init models."""

import json

import numpy as np
from conftest import max_diff, trained_weights

from peftsum.cli import main

TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "4", "--train.epochs", "1",
        "--eval.max_new_tokens", "8", "--prompt.num_virtual_tokens", "4", "--train.checkpoint_every", "0"]


def compare(model_dir, data, out, *extra):
    return main([str(a) for a in ["compare", "--model", model_dir, "--data", data, "--out", out, "--methods",
                                  "lora,prompt", *TINY, *extra]])


def test_seeds_train_each_method_once_per_seed_and_report_the_spread(tiny_model_dirs, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert compare(tiny_model_dirs["llama"], tiny_data, out, "--seeds", "3", "--seed", "5") == 0
    results = json.loads((out / "results.json").read_text())
    for method in ("lora", "prompt"):
        m = results["methods"][method]
        assert [r["seed"] for r in m["seed_runs"]] == [5, 6, 7]
        assert [r["dir"] for r in m["seed_runs"]] == [f"{method}/seed-{s}" for s in (5, 6, 7)]
        assert m["after"] == m["seed_runs"][0]["after"]
        losses = [r["after"]["eval"]["loss"] for r in m["seed_runs"]]
        assert len(set(losses)) == 3  # different initialisations and batch orders...
        summary = m["across_seeds"]["eval"]["loss"]
        assert summary["mean"] == np.mean(losses) and abs(summary["std"] - np.std(losses, ddof=1)) < 1e-12
        ids = [[json.loads(line)["id"] for line in (out / method / f"seed-{s}" / "predictions_eval.jsonl").open()]
               for s in (5, 6, 7)]
        assert ids[0] == ids[1] == ids[2]  # ...on the very same evaluation documents
    assert max_diff(trained_weights(out / "lora" / "seed-5"), trained_weights(out / "lora" / "seed-6")) > 0
    report = (out / "report.md").read_text()
    assert "3 seeds" in report

    # Rerun: every seed is read back, nothing is retrained.
    before = (out / "lora" / "seed-6" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert compare(tiny_model_dirs["llama"], tiny_data, out, "--seeds", "3", "--seed", "5", "--resume") == 0
    assert "lora/seed-6: finished earlier" in capsys.readouterr().out
    assert (out / "lora" / "seed-6" / "metrics.json").stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_the_first_seed_alone_is_a_plain_run(tiny_model_dirs, tiny_data, tmp_path):
    """A one-seed comparison keeps the plain layout (out/method) and equals seed 0 of a multi-seed one."""
    assert compare(tiny_model_dirs["gpt2"], tiny_data, tmp_path / "one") == 0
    assert compare(tiny_model_dirs["gpt2"], tiny_data, tmp_path / "two", "--seeds", "2") == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())["methods"]["lora"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["methods"]["lora"]
    assert "seed_runs" not in one
    assert one["after"]["eval"]["loss"] == two["seed_runs"][0]["after"]["eval"]["loss"]
    assert max_diff(trained_weights(tmp_path / "one" / "lora"), trained_weights(tmp_path / "two" / "lora" / "seed-0")) == 0
