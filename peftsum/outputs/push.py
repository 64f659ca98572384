"""`peftsum push`: upload a trained method folder (an adapter, or fine-tuned tensors) or an export to the hub.

`upload_files` decides what goes up, without any network: for a method folder its model card, weights, adapter
config, run config, scores, step and validation logs (never the checkpoints, and never the prediction files, which
carry the data set's reference summaries); for an export every file `export` wrote. `push` creates the repository if
needed and uploads exactly those files with huggingface_hub.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..infra.runs import METRICS, RESULTS, RUN_CONFIG, TRAIN_LOG, VALIDATION_LOG, WEIGHT_FILES
from ..infra.runs import MODEL_CARD as CARD
from ..methods import adapters
from .export import EXPORT_NOTE

# A method folder's files that are worth sharing, in upload order; the weights are required, the others optional.
METHOD_FILES = (CARD, adapters.ADAPTER_CONFIG, *WEIGHT_FILES, RUN_CONFIG, METRICS, TRAIN_LOG, VALIDATION_LOG)


def _is_export(folder: Path) -> bool:
    exported = (folder / "config.json").is_file() and not (folder / RUN_CONFIG).is_file()
    return (folder / EXPORT_NOTE).is_file() or exported


def upload_files(folder: Path) -> list[str]:
    """The names (relative to `folder`) that `push` uploads, or a UserError saying why the folder is not pushable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--run {folder}: no such folder")
    if (folder / RESULTS).is_file() and not (folder / RUN_CONFIG).is_file():
        inside = sorted(p.name for p in folder.iterdir() if (p / RUN_CONFIG).is_file())
        raise UserError(f"{folder} is a whole comparison; push one of its method folders"
                        + (f": {', '.join(str(folder / m) for m in inside)}" if inside else ""))
    seeds = sorted(p.name for p in folder.glob("seed-*") if (p / RUN_CONFIG).is_file())
    if seeds and not (folder / RUN_CONFIG).is_file():
        runs = ", ".join(str(folder / s) for s in seeds)
        raise UserError(f"{folder} holds one run per seed; push one of them: {runs}")
    if (folder / "checkpoints").is_dir():
        raise UserError(f"{folder} holds an unfinished run (checkpoints left); finish it with --resume first")
    if _is_export(folder):
        names = sorted(p.name for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix not in adapters.PICKLE_SUFFIXES)
        if not any(n.endswith(".safetensors") for n in names):
            raise UserError(f"{folder} has no safetensors weights to push")
    elif (folder / RUN_CONFIG).is_file():
        names = [n for n in METHOD_FILES if (folder / n).is_file()]
        if not set(WEIGHT_FILES) & set(names):
            raise UserError(f"{folder} has no trained weights ({' or '.join(WEIGHT_FILES)}) to push")
    else:
        raise UserError(f"{folder} is neither a trained method folder (no {RUN_CONFIG}) nor an export "
                        f"(no {EXPORT_NOTE})")
    if CARD not in names:
        raise UserError(f"{folder} has no model card ({CARD}): for a comparison's method folder run "
                        f"`peftsum report <comparison>`, for an export export again")
    return names


def push(folder: Path, repo: str, private: bool = False) -> tuple[str, list[str]]:
    """Upload `upload_files(folder)` to the hub model repository `repo` (created if missing); returns its URL and
    the names uploaded."""
    folder = Path(folder)
    names = upload_files(folder)
    from huggingface_hub import HfApi  # only here: nothing else in peftsum talks to the hub this way

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder), allow_patterns=names,
                          commit_message=f"peftsum push of {folder.name}")
    except Exception as exc:  # the hub raises many types: connection, offline mode, authentication, bad repo id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot push {folder} to the hub repository {repo!r}: {first} (needs a network connection "
                        "and a token with write access: `hf auth login` or HF_TOKEN)") from None
    return str(url), names
