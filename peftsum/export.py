"""Export a trained result as a standalone transformers folder: the method folded into the base weights.

The folder (safetensors, config, tokenizer) loads with `AutoModelForCausalLM.from_pretrained` alone, without peftsum
or peft. Each method says how it merges (methods/: LoRA folds its update into the weights, fine-tuning's weights
are the model's own) or why it cannot (a soft prompt is input, not weights).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .methods import Adapted

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
    leftovers = [k for k in model.state_dict() if ".lora." in k or "lora_A" in k or "lora_B" in k or ".ia3." in k]
    if leftovers:
        raise RuntimeError(f"adapter tensors left in the merged state dict: {leftovers[:3]}")
    model.to("cpu")
    model.requires_grad_(False)
    return model


def write_model(model, tokenizer, out: Path, note: str | None = None) -> None:
    """save_pretrained model and tokenizer into `out`: staged beside it, then moved in (stale weight files removed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        if note is not None:
            (staging / EXPORT_NOTE).write_text(note, encoding="utf-8")
        out.mkdir(exist_ok=True)
        for pattern in STALE_WEIGHTS:
            for stale in out.glob(pattern):
                if stale.is_file():
                    stale.unlink()
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
