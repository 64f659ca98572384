"""Using a trained result: `summarize` with a run or a peft adapter, and `export` of a merged model.

`summarize` rebuilds exactly what the run evaluated: the base model of its `config.yaml` (a `--random-init` run is
rebuilt from the same seed, so it gets the same weights), the template, the token budget and the generation
settings, which flags may override (`--eval.num_beams 4`). `--adapter DIR` takes an adapter folder made by Hugging
Face `peft` (LoRA on linear/Conv1D layers, prompt tuning) or by peftsum, on the base model it names or `--model`.

`export` folds a LoRA run into the base weights (or takes a fine-tuned run's weights) and writes a standalone
transformers folder. A soft prompt is not a change of weights, so a prompt run cannot be exported that way.

Only safetensors are ever read: a folder holding pickled weights (.bin, .pt...) is refused, not unpickled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import adapters, gguf_export
from .methods import lora
from .config import config_from_args, validate
from .errors import UserError

SUPPORTED_PEFT_TYPES = ("LORA", "PROMPT_TUNING")
PEFT_METHOD = {"LORA": "lora", "PROMPT_TUNING": "prompt"}
# peft LoRA options that change what the adapter computes and that peftsum's LoRA does not implement.
UNSUPPORTED_LORA_OPTIONS = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                            "lora_bias", "exclude_modules", "layer_replication", "target_parameters",
                            "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                            "kasa_config", "velora_config", "monteclora_config")
# Files transformers would load as model weights: removed from an export folder on --overwrite, so that nothing stale
# from an earlier export shadows or mixes with the new weights.
STALE_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
EXPORT_NOTE = "peftsum_config.yaml"
STDIN = "-"


# ---------------------------------------------------------------- command line

def add_commands(commands, add_config_flags) -> None:
    summarize = commands.add_parser(
        "summarize", help="summarize documents with a trained run, a peft adapter, or the base model",
        description="Summarize plain-text files (- reads standard input) and/or the rows of a JSONL file with a "
                    "trained run (its own model, template and generation settings) or an adapter folder.")
    add_config_flags(summarize)
    _add_source_flags(summarize)
    summarize.add_argument("files", nargs="*", metavar="FILE", help="a plain-text document per file; - = stdin")
    summarize.add_argument("--input", metavar="FILE",
                           help="JSONL (or CSV) rows with a document column (inferred, or --document-column)")
    summarize.add_argument("--output", metavar="FILE",
                           help="write JSONL rows {id, prediction} to FILE (- = stdout) instead of printing")
    summarize.set_defaults(handler=cmd_summarize)

    export = commands.add_parser(
        "export", help="write a standalone merged model from a trained LoRA or fine-tuning run",
        description="Write a transformers folder (safetensors, config, tokenizer) that AutoModelForCausalLM "
                    "loads without peftsum or peft, and/or one GGUF file for llama.cpp / Ollama: LoRA merged into "
                    "the weights, or the fine-tuned weights.")
    add_config_flags(export)
    _add_source_flags(export)
    export.add_argument("--merged", metavar="DIR", help="the transformers folder to write")
    export.add_argument("--gguf", metavar="FILE", help="the GGUF file to write (Llama-family and GPT-2 models)")
    export.add_argument("--gguf-type", choices=gguf_export.GGUF_TYPES, default="f16",
                        help="GGUF type of the weight matrices (norms and biases stay f32); default f16")
    export.add_argument("--overwrite", action="store_true",
                        help="write into DIR even if it is not empty, and replace an existing FILE")
    export.set_defaults(handler=cmd_export)


def _add_source_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", metavar="DIR", help="a trained method folder (from train or compare)")
    source.add_argument("--adapter", metavar="DIR",
                        help="an adapter folder (adapter_config.json + adapter_model.safetensors) made by peft or "
                             "peftsum; base model: --model, else the adapter's base_model_name_or_path")


# ---------------------------------------------------------------- loading a result

def _run_config_path(run: Path) -> Path:
    from .compare import RUN_CONFIG

    path = run / RUN_CONFIG
    if path.is_file():
        return path
    inside = sorted(p.name for p in run.iterdir() if (p / RUN_CONFIG).is_file()) if run.is_dir() else []
    hint = f"; the comparison's method folders are: {', '.join(str(run / m) for m in inside)}" if inside else ""
    raise UserError(f"{run} is not a trained run folder (no {RUN_CONFIG}){hint}")


def load_run(cfg, run: Path, progress: bool = True):
    """(session, adapted) for a trained run folder, with cfg already built from its config.yaml (+ flags)."""
    from .compare import open_session
    from .methods import adapt

    method = cfg.methods[0]
    adapters.weights_path(run, method)  # refuse a missing or pickled-only weights file before loading the model
    session = open_session(cfg, progress)
    adapted = adapt(session.loaded.model, session.loaded.tokenizer, method, cfg)
    adapters.load_into(adapted, run)
    adapted.model.eval()  # the new LoRA modules start in training mode (dropout on)
    return session, adapted


def apply_adapter_config(cfg, config: dict, folder: Path, model_given: bool = False) -> str:
    """Set cfg (model, method, LoRA or prompt settings) from a peft adapter_config.json; returns the method."""
    where = folder / adapters.ADAPTER_CONFIG
    if not isinstance(config, dict):
        raise UserError(f"{where} must hold a JSON object")
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_PEFT_TYPES)}")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UserError(f"{where}: task_type {task!r} is not supported; peftsum adapts causal LMs (CAUSAL_LM)")
    if not model_given:
        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{where} names no base model (base_model_name_or_path); pass --model")
        cfg.model.name = str(base)
    method = PEFT_METHOD[peft_type]
    cfg.methods = [method]
    if method == "lora":
        targets = config.get("target_modules")
        if isinstance(targets, str):
            raise UserError(f"{where}: target_modules is the regular expression {targets!r}; peftsum matches a list "
                            f"of module names (suffixes) only; list the modules instead, e.g. [\"q_proj\", \"v_proj\"]")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise UserError(f"{where}: target_modules must be a non-empty list of module names, got {targets!r}")
        unsupported = [k for k in UNSUPPORTED_LORA_OPTIONS if config.get(k) not in (None, False, {}, [], "")]
        if config.get("bias", "none") != "none":
            unsupported.append(f"bias={config['bias']}")
        if unsupported:
            raise UserError(f"{where}: LoRA options not supported by peftsum: {', '.join(unsupported)} "
                            f"(supported: r, lora_alpha, lora_dropout, target_modules as a list, use_rslora)")
        cfg.lora.rank = _number(config.get("r", 8), int, where, "r")  # peft's defaults where a key is absent
        cfg.lora.alpha = _number(config.get("lora_alpha", 8), float, where, "lora_alpha")
        cfg.lora.dropout = _number(config.get("lora_dropout", 0.0), float, where, "lora_dropout")
        cfg.lora.targets = list(targets)
        # fan_in_fan_out needs no setting: like peft, peftsum transposes for Conv1D layers and not for nn.Linear.
    else:
        if config.get("num_transformer_submodules", 1) not in (None, 1):
            raise UserError(f"{where}: num_transformer_submodules {config['num_transformer_submodules']} is for "
                            f"encoder-decoder models; peftsum supports 1 (causal LMs)")
        cfg.prompt.num_virtual_tokens = _number(config.get("num_virtual_tokens"), int, where, "num_virtual_tokens")
        cfg.prompt.init = "random"  # replaced by the saved embeddings; avoids tokenizing an init text
    validate(cfg)
    return method


def _number(value, kind, where: Path, key: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise UserError(f"{where}: {key} must be a number{' (whole)' if kind is int else ''}, got {value!r}")
    return kind(value)


def adapted_from_adapter_dir(cfg, folder: Path, model_given: bool = False, progress: bool = True):
    """(session, adapted) for an adapter folder made by peft or peftsum (LoRA, prompt tuning).

    cfg carries everything else (data settings, template, generation, device); its model becomes the adapter's
    base_model_name_or_path unless `model_given` (the user passed --model). cfg is updated in place.
    """
    from .compare import RUN_CONFIG, open_session
    from .methods import adapt

    folder = Path(folder)
    if not (folder / adapters.ADAPTER_CONFIG).is_file():
        if (folder / RUN_CONFIG).is_file():
            raise UserError(f"{folder} has no {adapters.ADAPTER_CONFIG} but is a peftsum run folder: use --run {folder}")
        if not folder.is_dir():
            raise UserError(f"adapter folder not found: {folder}")
        raise UserError(f"{folder} is not an adapter folder (no {adapters.ADAPTER_CONFIG})")
    method = apply_adapter_config(cfg, adapters.read_adapter_config(folder), folder, model_given)
    adapters.weights_path(folder, method)  # before the (possibly long) model load
    try:
        session = open_session(cfg, progress)
    except UserError as exc:
        if (folder / RUN_CONFIG).is_file():  # e.g. a random-init run: its base model is a config-only folder
            raise UserError(f"{exc} (this adapter is a peftsum run: --run {folder} rebuilds its base model)") from None
        raise
    adapted = adapt(session.loaded.model, session.loaded.tokenizer, method, cfg)
    adapters.load_into(adapted, folder)
    unused = adapters.unused_keys(adapted, folder)
    if unused:
        raise UserError(f"{folder / adapters.ADAPTER_WEIGHTS}: {len(unused)} tensors belong to layers peftsum does not "
                        f"adapt (LoRA on linear/Conv1D layers only), e.g. {unused[0]}")
    if method == "lora" and adapters.read_adapter_config(folder).get("use_rslora"):
        for module in adapters._lora_modules(adapted.model).values():
            module.scale = cfg.lora.alpha / math.sqrt(cfg.lora.rank)  # rank-stabilised scaling, as peft
    adapted.model.eval()  # the new LoRA modules start in training mode (dropout on)
    return session, adapted


def open_result(args, progress: bool = True):
    """(cfg, session, adapted) for --run, --adapter, or neither (the untouched base model)."""
    if args.run:
        run = Path(args.run)
        cfg = config_from_args(args, base=_run_config_path(run))
        session, adapted = load_run(cfg, run, progress)
    elif args.adapter:
        cfg = config_from_args(args)
        session, adapted = adapted_from_adapter_dir(cfg, Path(args.adapter), model_given="model.name" in vars(args),
                                                    progress=progress)
    else:
        from .compare import open_session
        from .methods import untouched

        cfg = config_from_args(args)
        session = open_session(cfg, progress)
        adapted = untouched(session.loaded.model, session.dtype)
    return cfg, session, adapted


# ---------------------------------------------------------------- summarize

@dataclass
class Document:
    id: object  # file name, or the row's id (its 0-based index where it has none)
    text: str


def _read_document(name: str) -> Document:
    if name == STDIN:
        text, label = sys.stdin.read(), "<stdin>"
    else:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"document not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        label = name
    if not text.strip():
        raise UserError(f"{label} is empty")
    return Document(label, text.strip())


def document_column(rows: list[dict], configured: str | None, explicit: bool, where: str) -> str:
    """The column holding the documents: --document-column, else the run's, else a known name (article, document...)."""
    from .data import KNOWN_COLUMNS

    available = list(dict.fromkeys(k for row in rows for k in row))
    if configured and (configured in available or explicit):
        if configured not in available:
            raise UserError(f"{where}: no column {configured!r}; available: {', '.join(available)}")
        return configured
    for column in dict.fromkeys(doc for doc, _ in KNOWN_COLUMNS):
        if column in available:
            return column
    raise UserError(f"{where}: cannot tell which column holds the documents; pass --document-column "
                    f"(available: {', '.join(available)})")


def read_input(path: Path, configured: str | None, explicit: bool) -> list[Document]:
    from .data import EXTENSIONS, read_rows

    if path.suffix not in EXTENSIONS:
        raise UserError(f"--input {path}: expected JSONL rows (.jsonl, .json) or CSV (.csv); for a plain-text "
                        f"document pass the file itself: peftsum summarize ... {path}")
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    column = document_column(rows, configured, explicit, str(path))
    documents = []
    for index, row in enumerate(rows):
        value = row.get(column)
        text = " ".join(str(v) for v in value) if isinstance(value, list) else ("" if value is None else str(value))
        if not text.strip():
            raise UserError(f"{path}: row {index + 1} has no text in column {column!r}")
        documents.append(Document(row.get("id", index), text.strip()))
    return documents


def _truncated(tokenizer, documents: list[Document], data_cfg, reserved: int) -> int:
    from .data import encode_prompt, prompt_budget

    budget = prompt_budget(data_cfg, reserved=reserved)
    template = data_cfg.template
    return sum(len(encode_prompt(tokenizer, d.text, template, budget))
               < len(encode_prompt(tokenizer, d.text, template, budget + 10 ** 9)) for d in documents)


def cmd_summarize(args) -> int:
    from .evaluate import generate
    from .files import write_jsonl

    names = list(args.files)
    if names.count(STDIN) > 1:
        raise UserError("standard input (-) can be read only once")
    if not names and not args.input:
        raise UserError("nothing to summarize: give document files (- for standard input) or --input FILE.jsonl")
    documents = [_read_document(n) for n in names]  # read (and checked) before the model loads
    if args.input:
        configured = vars(args).get("data.document_column")
        documents += read_input(Path(args.input), configured, explicit=configured is not None)
    cfg, session, adapted = open_result(args)
    tokenizer = session.loaded.tokenizer
    cut = _truncated(tokenizer, documents, cfg.data, adapted.virtual_tokens)
    if cut:
        print(f"peftsum: note: {cut} of {len(documents)} documents were truncated to fit data.max_length "
              f"({cfg.data.max_length} tokens with the template and the summary's room)", file=sys.stderr)
    predictions = generate(adapted, tokenizer, [d.text for d in documents], cfg.data, cfg.eval, session.device,
                           session.dtype, progress=len(documents) > 1, desc="summarize")
    if args.output:
        rows = [{"id": d.id, "prediction": p} for d, p in zip(documents, predictions)]
        if args.output == STDIN:
            sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        else:
            write_jsonl(Path(args.output), rows)
            print(f"{len(rows)} summaries written to {args.output}", file=sys.stderr)
    elif len(documents) == 1:
        print(predictions[0])
    else:
        print("\n\n".join(f"==> {d.id} <==\n{p}" for d, p in zip(documents, predictions)))
    return 0


# ---------------------------------------------------------------- export

def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--merged {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--merged {out} is not empty; choose a new folder or pass --overwrite")


def _prompt_refusal(source: Path, flag: str) -> UserError:
    return UserError(f"{source} is a prompt-tuning result, which cannot be exported as a plain model: its soft prompt "
                     f"is input embeddings placed before every document, not a change of the model's weights; use "
                     f"'peftsum summarize {flag} {source}' (or load the adapter with peft) instead")


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


def cmd_export(args) -> int:
    import yaml

    if not args.merged and not args.gguf:
        raise UserError("export needs --merged DIR (a transformers folder) and/or --gguf FILE (one GGUF file)")
    out = Path(args.merged) if args.merged else None
    if out is not None:
        _check_target(out, args.overwrite)
    if args.gguf:
        gguf_export.check_target(Path(args.gguf), args.overwrite)
    if not args.run and not args.adapter:
        raise UserError("export needs --run DIR (a trained lora or finetune run) or --adapter DIR (a LoRA adapter)")
    source, flag = (Path(args.run), "--run") if args.run else (Path(args.adapter), "--adapter")
    if out is not None and out.resolve() == source.resolve():
        raise UserError(f"--merged {out} is the {flag} folder itself; choose a new folder")
    if args.run:
        cfg = config_from_args(args, base=_run_config_path(source))
        if cfg.methods[0] == "prompt":  # refused before loading anything
            raise _prompt_refusal(source, flag)
    elif adapters.read_adapter_config(source).get("peft_type") == "PROMPT_TUNING":
        raise _prompt_refusal(source, flag)
    setattr(args, "model.precision", "fp32")  # merge into, and write, full-precision weights
    cfg, session, adapted = open_result(args)
    if adapted.method not in ("lora", "finetune"):
        raise _prompt_refusal(source, flag)
    model = adapted.model
    if adapted.method == "lora":
        lora.remove(model)
    leftovers = [k for k in model.state_dict() if ".lora." in k or "lora_A" in k or "lora_B" in k]
    if leftovers:
        raise RuntimeError(f"LoRA tensors left in the merged state dict: {leftovers[:3]}")
    model.to("cpu")
    model.requires_grad_(False)
    what = "LoRA merged into the base weights" if adapted.method == "lora" else "fine-tuned weights"
    if args.gguf:
        written = gguf_export.write_gguf(model, session.loaded.tokenizer, Path(args.gguf), args.gguf_type,
                                         name=f"{cfg.model.name} {adapted.method} (peftsum)", progress=True)
        print(f"exported {source} ({what}) to {written.path} ({written.gguf_type}, {written.bytes / 2 ** 20:.1f} MiB); "
              f"run it with llama.cpp (llama-cli -m {written.path}); prompt it with the template "
              f"{cfg.data.template!r}")
    if out is not None:
        note = yaml.safe_dump({"exported_from": str(source), "method": adapted.method, **cfg.to_dict()},
                              sort_keys=False)
        write_model(model, session.loaded.tokenizer, out, note)
        print(f"exported {source} ({what}) to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); "
              f"prompt it with the template {cfg.data.template!r}")
    return 0
