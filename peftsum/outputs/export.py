"""Export a trained result as a standalone transformers folder: the method folded into the base weights.

The folder (safetensors, config, tokenizer) loads with `AutoModelForCausalLM.from_pretrained` alone, without peftsum
or peft. Each method says how it merges (methods/: LoRA folds its update into the weights, fine-tuning's weights
are the model's own) or why it cannot (a soft prompt is input, not weights). The folder is prompted as the run was:
its chat template puts a user message (the document) into the run's prompt format, and its generation_config.json
stops at the format's end (EOS, or the end of turn) with the run's decoding settings.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from ..config import EvalConfig
from ..core.prompts import MARK, ChatFormat, PlainFormat, bos_prefix
from ..errors import UserError
from ..infra.files import fsync, os_error, remove_abandoned, write_problem
from ..methods.base import Adapted

EXPORT_NOTE = "peftsum_config.yaml"  # the settings the export came from, beside the weights
# Files transformers would load as model weights: removed from an export folder on --overwrite, so that nothing stale
# from an earlier export shadows or mixes with the new weights.
STALE_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse to export over a file, or into a non-empty folder without --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--merged {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--merged {out} is not empty; choose a new folder or pass --overwrite")


def merged_model(adapted: Adapted):
    """The adapted model as a plain transformers model on the CPU, for export (the method merged for good)."""
    model = adapted.method.merge_for_export(adapted)
    leftovers = [k for k in model.state_dict() if any(part in k for part in adapted.method.attached_keys)]
    if leftovers:
        raise RuntimeError(f"adapter tensors left in the merged state dict: {leftovers[:3]}")
    model.to("cpu")
    model.requires_grad_(False)
    return model


def write_model(model, tokenizer, out: Path, note: str | None = None) -> None:
    """save_pretrained model and tokenizer into `out`: staged beside it, flushed to disk, then moved in (stale weight
    files removed). A write that fails (a full disk) fails while staging, so the previous export stays whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out.parent, rf"\.{re.escape(out.name)}-(\d+)-\w{{8}}")  # a killed export's staging
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-{os.getpid()}-", dir=out.parent))
    try:
        try:
            model.save_pretrained(staging)  # safetensors
            tokenizer.save_pretrained(staging)
            if note is not None:
                (staging / EXPORT_NOTE).write_text(note, encoding="utf-8")
            for item in staging.iterdir():
                fsync(item)  # before the renames: after a crash, a name never points at a file not yet on disk
        except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error type
            if os_error(error) is None:
                raise
            raise UserError(f"cannot write {out}: {write_problem(error)}; {out} is as it was") from None
        out.mkdir(exist_ok=True)
        for pattern in STALE_WEIGHTS:
            for stale in out.glob(pattern):
                if stale.is_file():
                    stale.unlink()
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summarization_template(fmt: PlainFormat | ChatFormat) -> str:
    """A chat template that builds the run's prompt around the last user message's content (the document): the
    plain template, or the chat prompt with its instruction (and system turn). The generation prompt is always
    there: the exported model answers a document with its summary; a final assistant message (a training pair)
    follows it with the format's end (EOS, or the end of turn)."""
    tokenizer = fmt.tokenizer
    if isinstance(fmt, ChatFormat):
        text, ((start, end),) = fmt.conversation([], MARK.format(0))
        prefix, suffix = text[:start], text[end:]
        reply = MARK.format(1)
        answered = fmt.render([("user", "Hello"), ("assistant", reply)], generation_prompt=False)
        opening, closing = "", answered[answered.index(reply) + len(reply):]
    else:
        prefix, suffix = fmt.template.split("{document}", 1)
        prefix = (tokenizer.bos_token if bos_prefix(tokenizer) else "") + prefix
        opening, closing = ("" if suffix[-1:].isspace() else " "), tokenizer.eos_token
    return ("{#- peftsum: the run's summarization prompt around the last user message (the document) -#}\n"
            "{%- set document = (messages | selectattr('role', 'equalto', 'user') | list | last)['content'] -%}\n"
            f"{{{{- {json.dumps(prefix)} ~ (document | trim) ~ {json.dumps(suffix)} -}}}}\n"
            "{%- if messages[-1]['role'] == 'assistant' -%}"
            f"{{{{- {json.dumps(opening)} ~ messages[-1]['content'] ~ {json.dumps(closing)} -}}}}{{%- endif -%}}")


def prompted_like_the_run(model, fmt: PlainFormat | ChatFormat, eval_cfg: EvalConfig):
    """A copy of the run's tokenizer whose chat template builds the run's prompt, with the model's generation config
    set to the run's decoding (greedy or beams, stopping at the format's stop tokens); for `write_model`."""
    from transformers import GenerationConfig

    tokenizer = copy.deepcopy(fmt.tokenizer)
    tokenizer.chat_template = summarization_template(fmt)
    stops = list(fmt.stop_ids)
    model.generation_config = GenerationConfig(
        eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, do_sample=False, num_beams=eval_cfg.num_beams,
        max_new_tokens=eval_cfg.max_new_tokens, no_repeat_ngram_size=eval_cfg.no_repeat_ngram_size,
        repetition_penalty=eval_cfg.repetition_penalty)
    return tokenizer
