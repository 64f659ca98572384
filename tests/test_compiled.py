"""`--compile`: the transformer blocks compiled for training give the same training as the plain model (fp32, tiny
Llama, so only float reassociation differs), and the model is plain again afterwards; the rest of peftsum reaches the
speed paths through their one door (peftsum.fast)."""

import re
from pathlib import Path

import pytest
import torch
from conftest import max_diff, step_losses, tiny_model, trained_weights

from peftsum.cli import main
from peftsum.core.models import transformer_blocks
from peftsum.errors import UserError
from peftsum.fast import training_blocks

TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "0", "--train.checkpoint_every", "0",
        "--max-steps", "3", "--prompt.num_virtual_tokens", "4"]


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_compiled_training_matches_the_plain_loop(method, tiny_model_dirs, tiny_data, tmp_path):
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for name, extra in (("plain", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        before = counters["stats"]["unique_graphs"]
        assert main(["train", "--method", method, "--model", str(tiny_model_dirs["llama"]), "--data", str(tiny_data),
                     "--out", str(out), *TINY, *extra]) == 0
        runs[name], graphs[name] = out, counters["stats"]["unique_graphs"] - before
    assert graphs == {"plain": 0, "compiled": graphs["compiled"]} and graphs["compiled"] >= 1
    plain, compiled = step_losses(runs["plain"]), step_losses(runs["compiled"])
    assert len(plain) == len(compiled) == 3
    assert compiled == pytest.approx(plain, rel=1e-4)
    weights = trained_weights(runs["plain"])
    assert max_diff(weights, trained_weights(runs["compiled"])) < 1e-4
    assert max_diff(weights, {k: torch.zeros_like(v) for k, v in weights.items()}) > 1e-3  # they did train


def test_the_model_is_plain_again_after_the_compiled_block(tokenizer):
    model = tiny_model("llama", tokenizer)
    model.set_attn_implementation("sdpa")
    with training_blocks(model, torch.device("cpu"), max_length=64):
        assert model.config._attn_implementation == "eager"  # the fused formulation on the CPU
        assert all(block._compiled_call_impl is not None for block in transformer_blocks(model))
    assert model.config._attn_implementation == "sdpa"
    assert all(block._compiled_call_impl is None for block in transformer_blocks(model))
    with training_blocks(model, torch.device("cpu"), max_length=2048):  # long sequences keep SDPA (memory)
        assert model.config._attn_implementation == "sdpa"


def test_compile_without_a_cpp_compiler_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    model = tiny_model("llama", tokenizer)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        with training_blocks(model, torch.device("cpu"), max_length=64):
            pass


@pytest.mark.parametrize("kind, extra", [("llama", []), ("gpt2", []), ("llama", ["--compile"])])
def test_gradient_checkpointing_trains_the_same(kind, extra, tiny_model_dirs, tiny_data, tmp_path):
    runs = {}
    # Dropout on: the recomputed forward must draw the very masks of the first (compiled: inductor's own RNG).
    for name, flags in (("kept", extra), ("recomputed", ["--train.gradient_checkpointing", "true", *extra])):
        runs[name] = tmp_path / name
        assert main(["train", "--method", "lora", "--model", str(tiny_model_dirs[kind]), "--data", str(tiny_data),
                     "--out", str(runs[name]), *TINY, "--lora.dropout", "0.1", *flags]) == 0
    kept, recomputed = step_losses(runs["kept"]), step_losses(runs["recomputed"])
    assert len(kept) == 3 and recomputed == pytest.approx(kept, rel=1e-5)
    assert max_diff(trained_weights(runs["kept"]), trained_weights(runs["recomputed"])) < 1e-5


def test_checkpointed_blocks_keep_fewer_activations(tokenizer):
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(checkpointing: bool) -> int:
        model = tiny_model("llama", tokenizer).train()
        model.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)
        x = torch.randint(2, 250, (4, 48))
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with training_blocks(model, torch.device("cpu"), 48, compile=False, gradient_checkpointing=checkpointing):
            embeds = model.get_input_embeddings()(x).requires_grad_(True)
            with saved_tensors_hooks(pack, lambda t: t):
                model(inputs_embeds=embeds, use_cache=False).logits.sum().backward()
        return total

    assert saved_bytes(True) < 0.6 * saved_bytes(False)


def test_auto_compiles_only_past_the_measured_break_even(monkeypatch):
    from peftsum.fast import compiled

    cpu = torch.device("cpu")
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    # The demo plans ~45k tokens: under every break-even measured on the CPUs (44-104k), so it trains plain.
    assert not compiled.should_compile("auto", cpu, planned_tokens=45_000)
    assert compiled.should_compile("auto", cpu, planned_tokens=compiled.CPU_BREAK_EVEN_TOKENS)
    # In fp32 compiled steps were 0.99-1.05x plain ones on the CPU: auto never compiles there, whatever the length.
    assert not compiled.should_compile("auto", cpu, planned_tokens=10**9, dtype=torch.float32)
    assert not compiled.should_compile("auto", cpu, planned_tokens=None, budget_seconds=10**5, dtype=torch.float32)
    assert compiled.should_compile("true", cpu, planned_tokens=10, dtype=torch.float32)
    assert compiled.should_compile("auto", cpu, planned_tokens=None)  # epochs of unknown length: a long run
    assert not compiled.should_compile("auto", cpu, planned_tokens=None, budget_seconds=200)
    assert compiled.should_compile("auto", cpu, planned_tokens=None, budget_seconds=800)
    assert compiled.should_compile("true", cpu, planned_tokens=10) and not compiled.should_compile("false", cpu, None)
    monkeypatch.setattr(compiled, "has_compiler", lambda: False)
    assert not compiled.should_compile("auto", cpu, planned_tokens=10**9)  # no C++ compiler: nothing to compile with


def test_the_plain_path_reaches_the_speed_paths_through_their_door():
    """Outside peftsum/fast, modules import the package (its __init__: training_blocks, paused, generation...), never
    one of its modules, so that the plain path can be read without them."""
    import peftsum

    root = Path(peftsum.__file__).parent
    inside = re.compile(r"^\s*(from|import)\s+[\w.]*\bfast\.\w", re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if root / "fast" not in p.parents and inside.search(p.read_text())]
    assert offenders == []
    assert inside.search("from ..fast.decode import LeanDecoder") and not inside.search("from .. import fast")
