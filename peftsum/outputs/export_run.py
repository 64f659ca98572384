"""The export flow: a trained run (or a peft adapter) merged into its base weights for good, then written as a
transformers folder (export.py) and/or one GGUF file (gguf_export.py), both prompted as the run was.

`peftsum export` parses its flags and calls, in order: `check_mergeable` before anything loads (a soft prompt cannot
become weights), `merge_for_export` once the source is loaded, then `write_gguf_file` and/or `write_folder`, saying
what each wrote as it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import RunConfig
from ..core.prompts import Format, prompt_format
from ..core.session import Session
from ..errors import UserError
from ..methods import adapters
from ..methods.base import Adapted
from ..methods.registry import by_peft_type, method_named
from . import gguf_export
from .export import merged_model, prompted_like_the_run, write_model
from .model_card import export_card, write_card


def check_mergeable(source: Path, flag: str, run_method: str | None) -> None:
    """Refuse, before anything loads, a source whose method cannot merge into the weights: the method of a run
    (`run_method`, from its config), else of the peft adapter in `source` (its peft_type; one peft names but peftsum
    does not train is left to the loading to refuse). `flag` is how the source was given (--run, --adapter)."""
    if run_method is not None:
        method = method_named(run_method)
    else:
        method = by_peft_type().get(str(adapters.read_adapter_config(source).get("peft_type") or "").upper())
    if method is not None and not method.can_merge:
        raise UserError(f"{source} is a {method.title} result, which cannot be exported as a plain model: "
                        f"{method.merge_refusal}; use 'peftsum summarize {flag} {source}' (or load the adapter with "
                        f"peft) instead")


@dataclass
class Merged:
    """A source merged for export: the plain model on the CPU, its tokenizer with the chat template that builds the
    run's prompt (`fmt`) around the document, and what the written files record of the run."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fmt: Format
    cfg: RunConfig
    method: str
    what: str  # e.g. "LoRA merged into the base weights"


def merge_for_export(cfg: RunConfig, session: Session, adapted: Adapted) -> Merged:
    """The loaded source (`open_source`, in fp32) merged into its base weights, prompted as the run was."""
    model = merged_model(adapted)
    fmt = prompt_format(session.tokenizer, cfg.data)
    # Both files are prompted as the run was: the chat template builds the run's prompt around the document.
    tokenizer = prompted_like_the_run(model, fmt, cfg.eval)
    return Merged(model, tokenizer, fmt, cfg, adapted.name, f"{adapted.method.title} merged into the base weights")


def write_gguf_file(merged: Merged, path: Path, gguf_type: str) -> gguf_export.Written:
    """The merged model as one GGUF file at `path` (llama.cpp, Ollama)."""
    return gguf_export.write_gguf(merged.model, merged.tokenizer, path, gguf_type,
                                  name=f"{merged.cfg.model.name} {merged.method} (peftsum)", progress=True)


def write_folder(merged: Merged, out: Path, source: Path) -> None:
    """The merged model as a transformers folder `out`, with the settings it came from and its model card."""
    note = yaml.safe_dump({"exported_from": str(source), "method": merged.method, "prompt": merged.fmt.describe(),
                           **merged.cfg.to_dict()}, sort_keys=False)
    write_model(merged.model, merged.tokenizer, out, note)
    write_card(out, export_card(out, source, merged.cfg, merged.method))
