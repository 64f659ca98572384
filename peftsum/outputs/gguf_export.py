"""GGUF export: a plain transformers causal LM and its tokenizer as one file for llama.cpp / Ollama.

`write_gguf` takes a merged model (LoRA folded into the weights, fine-tuned weights, or any other method that ends
in plain weights) and writes it with the `gguf` package's writer, under llama.cpp's tensor names (the `gguf`
package's own name map), metadata keys and tokenizer layout: byte-level BPE as `tokenizer.ggml.model = "gpt2"` with
tokens, token types, merges, the special token ids, add_bos/add_eos and the chat template.

Two architectures: Llama (and every model transformers runs as `LlamaForCausalLM`, the embedded SmolLM2 among them)
and GPT-2. llama.cpp's converter reorders the rows of each Llama q/k projection per head (the interleaved rotary
layout of Meta's original checkpoints); llama.cpp expects that order, and transformers' GGUF loader undoes it on
load, so it is reproduced here. GPT-2's Conv1D weights are stored [in, out] and are transposed to nn.Linear's
[out, in]. One-dimensional tensors (norms, biases) stay float32, as in llama.cpp's converter; the rest take the
chosen type. The file is written beside its target and renamed into place, so a failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..infra.files import fsync, remove_abandoned, write_problem

GGUF_TYPES = ("f16", "bf16", "q8_0")
OUTPUT = "output.weight"  # llama.cpp's name for an untied LM head
# The pre-tokenizers written, under llama.cpp's names (`tokenizer.ggml.pre`); `_pre_tokenizer` recognises them.
PRE_TOKENIZERS = {"gpt-2": "GPT-2's byte-level split", "smollm": "single digits, then GPT-2's split",
                  "llama-bpe": "Llama 3's split regex"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Written:
    """What write_gguf wrote: the file, the type of its matrices, the number of tensors and the file's size."""
    path: Path
    gguf_type: str
    tensors: int
    bytes: int


# ---------------------------------------------------------------- architectures

def _llama_metadata(writer, config) -> None:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # llama.cpp assumes hidden_size / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _rope(config) -> dict:
    """transformers 5's rope settings, with LlamaConfig's defaults where a config leaves them out."""
    return {"rope_type": "default", "rope_theta": 10000.0, **(getattr(config, "rope_parameters", None) or {})}


def _llama_refusal(config) -> str | None:
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope['rope_type']!r} (only plain rotary positions are exported so far)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases (not exported so far)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (llama.cpp's Llama uses silu)"
    return None


def _permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, the rotary halves interleaved (transformers' loader inverts this)."""
    rows = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _llama_tensor(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    if name.endswith("self_attn.q_proj.weight"):
        return _permute_rows(tensor, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return _permute_rows(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def _gpt2_metadata(writer, config) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))


def _gpt2_refusal(config) -> str | None:
    if config.activation_function != "gelu_new":
        return f"activation {config.activation_function!r} (llama.cpp's GPT-2 uses the tanh GELU, gelu_new)"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        return "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn (not in llama.cpp's GPT-2)"
    return None


def _gpt2_tensor(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
        return tensor.t()  # Conv1D keeps [in, out]
    return tensor


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # gguf.MODEL_ARCH member name
    metadata: Callable
    refusal: Callable  # config -> reason it cannot be exported, or None
    tensor: Callable  # (hf name, tensor, config) -> tensor in llama.cpp's layout


ARCHITECTURES = {  # transformers model_type -> how to write it
    "llama": Architecture("LLAMA", _llama_metadata, _llama_refusal, _llama_tensor),
    "gpt2": Architecture("GPT2", _gpt2_metadata, _gpt2_refusal, _gpt2_tensor),
}


def _architecture(model) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export does not support {model_type!r} models yet; supported: "
                        f"{', '.join(ARCHITECTURES)} (use --merged for a transformers folder)")
    arch = ARCHITECTURES[model_type]
    reason = arch.refusal(model.config)
    if reason:
        raise UserError(f"GGUF export does not support this {model_type} model: it has {reason}; use --merged for a "
                        f"transformers folder")
    return arch


# ---------------------------------------------------------------- tensors

def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor in llama.cpp's layout) for every weight; a tied LM head is written once."""
    import gguf

    arch = _architecture(model)
    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_name), config.num_hidden_layers)
    tied = _tied(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for name, tensor in model.state_dict().items():
        if name not in params:
            continue  # buffers (rotary frequencies, causal masks) are rebuilt from the metadata
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export does not know where the {config.model_type} tensor {name} goes in "
                            f"llama.cpp's layout; use --merged for a transformers folder")
        if tied and gguf_name == OUTPUT:
            continue  # a tied LM head is token_embd: llama.cpp and transformers reuse it when output.weight is absent
        out.append((gguf_name, arch.tensor(name, tensor.detach().to("cpu", torch.float32), config).contiguous()))
    return out


def _encoded(tensor: torch.Tensor, gguf_type: str):
    """(array, raw ggml type or None) as the writer takes it: 1-D tensors float32, the rest the chosen type."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if tensor.ndim <= 1:
        return tensor.numpy(), None
    if gguf_type == "f16":
        return tensor.to(torch.float16).numpy(), None
    if gguf_type == "bf16":  # numpy has no bfloat16: the bits travel as uint16 (torch rounds to nearest even)
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), Q.BF16
    return gguf.quants.quantize(tensor.numpy(), Q.Q8_0), Q.Q8_0


def _check_quantizable(tensors, gguf_type: str) -> None:
    if gguf_type != "q8_0":
        return
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    bad = [(n, tuple(t.shape)) for n, t in tensors if t.ndim > 1 and t.shape[-1] % block]
    if bad:
        name, shape = bad[0]
        raise UserError(f"--gguf-type q8_0 needs rows that are a multiple of {block} values; {len(bad)} tensors are "
                        f"not, e.g. {name} {list(shape)}; use --gguf-type f16 or bf16")


# ---------------------------------------------------------------- tokenizer

@dataclass(frozen=True)
class Vocab:
    """A tokenizer as GGUF's tokenizer.ggml.* keys hold it (one token, and one type, per embedding row)."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos / eos / unk / pad
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _pre_tokenizer(spec: dict | None) -> str | None:
    """llama.cpp's name for a tokenizers pre-tokenizer, or None when it has none of the same split."""
    if spec is None:
        return None
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]

    def byte_level(part, use_regex):
        return (part.get("type") == "ByteLevel" and part.get("use_regex", True) is use_regex
                and not part.get("add_prefix_space", False))

    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and byte_level(parts[1], True)):
        return "smollm"
    split = parts[0] if parts[0].get("type") == "Split" else {}
    if (len(parts) == 2 and split.get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and str(split.get("behavior", "")).lower() == "isolated" and not split.get("invert")
            and byte_level(parts[1], False)):
        return "llama-bpe"
    return None


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding puts token_id first (BOS) or last (EOS): what llama.cpp's add_bos/add_eos flags say."""
    if token_id is None:
        return False
    with_special = tokenizer("a b")["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(plain)
    return extra and (with_special[0] if first else with_special[-1]) == token_id


def gguf_vocab(tokenizer, vocab_size: int, config=None) -> Vocab:
    """The tokenizer as GGUF stores a byte-level BPE vocabulary (llama.cpp's `gpt2` tokenizer model)."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or spec.get("normalizer") is not None or pre is None:
        kind = model.get("type") or "unknown"
        raise UserError(f"GGUF export supports byte-level BPE tokenizers with one of the splits llama.cpp knows "
                        f"({'; '.join(f'{k}: {v}' for k, v in PRE_TOKENIZERS.items())}); this tokenizer is {kind} "
                        f"with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} and normalizer "
                        f"{json.dumps(spec.get('normalizer'))[:60]}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has token ids up to {max(vocab.values())} but the model's vocabulary has "
                        f"{vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocabularies): llama.cpp needs a name each
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.CONTROL if i in added and added[i].special
                             else TokenType.USER_DEFINED if i in added else TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(attr):  # the tokenizer's id, else the model config's, as llama.cpp's converter reads them
        value = getattr(tokenizer, f"{attr}_token_id", None)
        return getattr(config, f"{attr}_token_id", None) if value is None and attr != "unk" else value

    ids = {attr: special(attr) for attr in ("bos", "eos", "unk", "pad")}
    ids = {k: int(v) for k, v in ids.items() if isinstance(v, int) and 0 <= v < vocab_size}
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(tokens, types, merges, pre, ids, _adds(tokenizer, tokenizer.bos_token_id, True),
                 _adds(tokenizer, tokenizer.eos_token_id, False), template if isinstance(template, str) else None)


def _write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for attr, value in vocab.special_ids.items():
        getattr(writer, f"add_{attr}_token_id")(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------- the file

def check_target(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target that is a folder, or an existing file without --overwrite."""
    if path.is_dir():
        raise UserError(f"--gguf {path} is a folder; give a file name, e.g. {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise UserError(f"--gguf {path} exists; choose a new file name or pass --overwrite")


def write_gguf(model, tokenizer, path: Path, gguf_type: str = "f16", name: str | None = None,
               progress: bool = False) -> Written:
    """Write a plain (merged) causal LM and its tokenizer to one GGUF file at `path`; returns what was written.

    `gguf_type`: f16, bf16 or q8_0 for the matrices (one-dimensional tensors stay float32). User-caused problems
    (an architecture or tokenizer this cannot express, q8_0 on rows that are not a multiple of 32) raise UserError
    before anything is written.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    arch = _architecture(model)
    tensors = gguf_tensors(model)
    _check_quantizable(tensors, gguf_type)
    vocab = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0], model.config)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path.parent, rf"\.{re.escape(path.name)}-(\d+)\.partial")  # a killed export's staging
    staging = path.with_name(f".{path.name}-{os.getpid()}.partial")  # opened by the writer: the umask applies
    writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_name)])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        arch.metadata(writer, model.config)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_vocab(writer, vocab)
        for tensor_name, tensor in tensors:
            array, raw_type = _encoded(tensor, gguf_type)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
            writer.close()
            fsync(staging)  # before the rename: after a crash, the name never points at a file not yet on disk
        except OSError as error:  # a full disk: the previous file is untouched
            # numpy's tofile reports a short write without an errno: "9600 requested and 4416 written"
            problem = write_problem(error) if error.errno else (f"only part of it could be written ({error}): the "
                                                                f"disk is full or a file size limit is reached")
            raise UserError(f"cannot write {path}: {problem}; {path} is as it was") from None
        os.replace(staging, path)
        fsync(path.parent)
    finally:
        with contextlib.suppress(OSError):  # a no-op once closed; after a failed write, its flush fails again
            writer.close()
        if staging.exists():
            os.unlink(staging)
    return Written(path, gguf_type, len(tensors), path.stat().st_size)
