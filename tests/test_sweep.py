"""`peftsum sweep`: --vary parsing and its refusals, the Pareto front, and one sweep end to end on a tiny model."""

import json
import subprocess
import sys

import pytest

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.errors import UserError
from peftsum.study.sweep import (
    Vary,
    pareto_front,
    parse_varies,
    parse_vary,
    plan_points,
    render_sweep_markdown,
    sweep_table,
)

FAST = ["--max-steps", "2", "--train.batch_size", "4", "--data.train_eval_size", "2", "--eval-size", "2",
        "--eval.max_new_tokens", "4", "--eval.bootstrap_samples", "10", "--data.max_length", "64",
        "--data.max_summary_tokens", "12", "--prompt.num_virtual_tokens", "4", "--precision", "fp32"]


# ---------------------------------------------------------------- --vary


def test_vary_values_take_the_type_of_their_key():
    assert parse_vary("lora.rank=1, 4,16") == Vary("lora.rank", [1, 4, 16])
    assert parse_vary("prompt.lr=1e-3,0.03") == Vary("prompt.lr", [0.001, 0.03])
    assert parse_vary("finetune.head=true,false") == Vary("finetune.head", [True, False])
    vary = parse_vary("finetune.last_blocks=0,2")
    assert (vary.method, vary.leaf) == ("finetune", "last_blocks")


@pytest.mark.parametrize("text, message", [
    ("lora.rank", "expected KEY=V1,V2"),
    ("lora.rnak=1,2", "unknown config key 'lora.rnak'"),
    ("train.lr=1e-3", "choose a key of a method's section"),
    ("methods=lora", "choose a key of a method's section"),
    ("lora=1", "choose a key of a method's section"),
    ("lora.targets=q_proj,v_proj", "holds a list"),
    ("lora.rank=", "no values given"),
    ("lora.rank= , ", "no values given"),
    ("lora.rank=1,two", "--vary lora.rank: expected int, got 'two'"),
    ("lora.rank=1.5", "expected int"),
    ("lora.rank=2,2", "2 given more than once"),
])
def test_bad_vary_is_refused_in_one_line(text, message):
    with pytest.raises(UserError) as error:
        parse_vary(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_vary_must_name_a_method_that_runs_once():
    with pytest.raises(UserError, match="sweeps lora, which is not among the methods run"):
        parse_varies(["lora.rank=1,2"], ["prompt"])
    with pytest.raises(UserError, match="given twice"):
        parse_varies(["lora.rank=1", "lora.rank=2"], ["lora"])


def test_plan_varies_one_method_and_runs_the_others_once():
    cfg = load_config(overrides={"out": "runs/s", "methods": "lora,prompt"})
    points = plan_points(cfg, parse_varies(["lora.rank=1,2", "lora.lr=1e-3"], cfg.methods))
    assert [p.folder for p in points] == ["lora/rank-1", "lora/rank-2", "lora/lr-0.001", "prompt/configured"]
    assert [p.cfg.lora.rank for p in points] == [1, 2, 8, 8] and points[2].cfg.lora.lr == 0.001
    assert all(p.cfg.methods == [p.method] and not p.cfg.eval.before for p in points)
    assert points[1].cfg.out == "runs/s/lora/rank-2" and cfg.lora.rank == 8  # the sweep's own config is untouched


def test_plan_refuses_a_value_the_config_rules_refuse():
    cfg = load_config(overrides={"methods": "lora"})
    with pytest.raises(UserError, match="--vary lora.rank=0: lora.rank must be >= 1, got 0"):
        plan_points(cfg, parse_varies(["lora.rank=0,4"], cfg.methods))
    cfg = load_config(overrides={"methods": "prompt", "data.max_length": 80})
    with pytest.raises(UserError, match="leaves no room for the document"):
        plan_points(cfg, parse_varies(["prompt.num_virtual_tokens=4,40"], cfg.methods))


def test_cli_refuses_a_bad_vary_in_one_line_with_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "peftsum", "sweep", "--methods", "prompt", "--vary", "lora.rank=1"],
                            capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "not among the methods run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- Pareto front and table


def _p(method, params, score, key=None, value=None):
    return {"method": method, "key": key, "value": value, "trainable_params": params, "total_params": 1000,
            "eval_loss": 2.0, "rouge1": score, "rouge2": score, "rougeL": score, "rougeLsum": score,
            "train_seconds": 1.0, "tokens_per_s": 100.0, "folder": f"{method}/x"}


def test_pareto_front_keeps_only_undominated_points():
    points = [_p("prompt", 10, 5.0), _p("lora", 100, 8.0), _p("lora", 200, 7.0), _p("finetune", 1000, 9.0),
              _p("lora", 100, 6.0)]
    # 200/7.0 loses to 100/8.0 (fewer and better); 100/6.0 ties on parameters but scores lower
    assert pareto_front(points, "rougeL") == [True, True, False, True, False]


def test_pareto_front_ties_and_single_point():
    assert pareto_front([_p("lora", 5, 3.0)], "rougeL") == [True]
    assert pareto_front([_p("lora", 5, 3.0), _p("prompt", 5, 3.0)], "rougeL") == [True, True]  # equal: both stay
    assert pareto_front([_p("lora", 5, 3.0), _p("prompt", 9, 3.0)], "rougeL") == [True, False]  # same score, more


def test_pareto_front_follows_the_chosen_metric():
    a, b = _p("lora", 10, 5.0), _p("prompt", 20, 4.0)
    b["rouge2"] = 6.0
    assert pareto_front([a, b], "rougeL") == [True, False]
    assert pareto_front([a, b], "rouge2") == [True, True]


def test_markdown_table_sorted_by_method_then_value_with_the_front_marked():
    points = [_p("prompt", 10, 5.0), _p("lora", 200, 7.0, "lora.rank", 16), _p("lora", 100, 8.0, "lora.rank", 4)]
    text = render_sweep_markdown(points, "rougeL", baseline={"eval_loss": 3.0, "rougeL": 2.5})
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[:3] for r in rows] == [["| lora", "lora.rank", "4"], ["| lora", "lora.rank", "16"],
                                                  ["| prompt", "–", "configured"]]
    assert [r.rstrip(" |").endswith("yes") for r in rows] == [True, False, True]
    assert "Pareto (ROUGE-L)" in text and "untouched model scores eval loss 3.000, ROUGE-L 2.5" in text
    assert "not scored" in render_sweep_markdown(points, "rougeL")
    assert sweep_table(points, "rougeL") == text.split("\n")[4:4 + 2 + len(points)]


# ---------------------------------------------------------------- end to end


def test_sweep_end_to_end_then_resume_reads_back(tiny_model_dirs, tiny_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_model_dirs["gpt2"]), "--random-init", "--data", str(tiny_data),
            "--out", str(out), "--methods", "lora,prompt", "--vary", "lora.rank=1,2", *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    sweep = json.loads((out / "sweep.json").read_text())
    points = sweep["points"]
    assert [(p["method"], p["value"]) for p in points] == [("lora", 1), ("lora", 2), ("prompt", None)]
    assert points[0]["trainable_params"] < points[1]["trainable_params"]
    assert all(0 <= p["rougeL"] <= 100 and p["eval_loss"] > 0 for p in points)
    assert sweep["baseline"] is not None and sweep["metric"] == "rougeL"
    assert (out / "lora" / "rank-2" / "lora" / "adapter_model.safetensors").is_file()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert "| lora | lora.rank | 2 |" in table and "| prompt | – | configured |" in table
    assert "| lora | lora.rank | 1 |" in printed

    weights = out / "lora" / "rank-1" / "lora" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(args) == 2  # a finished sweep is not overwritten by accident
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier; results read back") == 3
    assert "untouched model (plain): scores read back" in printed
    assert weights.stat().st_mtime_ns == stamp
    assert json.loads((out / "sweep.json").read_text())["points"] == points
