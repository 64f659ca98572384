"""`export`: a trained run (or a peft adapter) merged into the weights, as a standalone transformers folder
(`--merged`) and/or one GGUF file for llama.cpp and Ollama (`--gguf`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .flags import add_config_flags, add_source_flags

GGUF_TYPES = ("f16", "bf16", "q8_0")  # gguf_export.GGUF_TYPES, here so that the parser does not import torch
DESCRIPTION = ("Write a transformers folder (safetensors, config, tokenizer) that AutoModelForCausalLM loads without "
               "peftsum or peft, and/or one GGUF file for llama.cpp / Ollama: the method merged into the weights "
               "(LoRA, ...), or the fine-tuned weights.")


def add_export(parser) -> None:
    add_config_flags(parser)
    add_source_flags(parser)
    parser.add_argument("--merged", metavar="DIR", help="the transformers folder to write")
    parser.add_argument("--gguf", metavar="FILE", help="the GGUF file to write (Llama-family and GPT-2 models)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                        help="GGUF type of the weight matrices (norms and biases stay f32); default f16")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into DIR even if it is not empty, and replace an existing FILE")


def _cannot_merge(source: Path, flag: str, method) -> UserError:
    return UserError(f"{source} is a {method.title} result, which cannot be exported as a plain model: "
                     f"{method.merge_refusal}; use 'peftsum summarize {flag} {source}' (or load the adapter with "
                     f"peft) instead")


def export(args) -> int:
    import yaml

    from ..core.prompts import prompt_format
    from ..infra.files import check_writable
    from ..methods import adapters
    from ..methods.registry import all_methods, by_peft_type, method_named
    from ..outputs import gguf_export
    from ..outputs.export import check_target, merged_model, prompted_like_the_run, write_model
    from ..outputs.model_card import export_card, write_card
    from .source import open_source, source_config

    if args.merged is not None and not args.merged.strip():
        raise UserError("--merged is empty; give the folder to write")
    if not args.merged and not args.gguf:
        raise UserError("export needs --merged DIR (a transformers folder) and/or --gguf FILE (one GGUF file)")
    out = Path(args.merged) if args.merged else None
    if out is not None:
        check_target(out, args.overwrite)
    if args.gguf:
        gguf_export.check_target(Path(args.gguf), args.overwrite)
    if not args.run and not args.adapter:
        mergeable = ", ".join(m.name for m in all_methods().values() if m.can_merge)
        raise UserError(f"export needs --run DIR (a trained run of {mergeable}) or --adapter DIR (a peft adapter of "
                        f"one of those)")
    source, flag = (Path(args.run), "--run") if args.run else (Path(args.adapter), "--adapter")
    if out is not None and out.resolve() == source.resolve():
        raise UserError(f"--merged {out} is the {flag} folder itself; choose a new folder")
    # Refused before anything loads: a method that cannot merge.
    if args.run:
        method = method_named(source_config(args).methods[0])
    else:
        method = by_peft_type().get(str(adapters.read_adapter_config(source).get("peft_type") or "").upper())
    if method is not None and not method.can_merge:
        raise _cannot_merge(source, flag, method)
    setattr(args, "model.precision", "fp32")  # merge into, and write, full-precision weights
    if out is not None:
        check_writable(out, "--merged")  # before the model loads and merges
    cfg, session, adapted = open_source(args)
    model = merged_model(adapted)
    what = f"{adapted.method.title} merged into the base weights"
    fmt = prompt_format(session.tokenizer, cfg.data)
    # Both files are prompted as the run was: the chat template builds the run's prompt around the document.
    tokenizer = prompted_like_the_run(model, fmt, cfg.eval)
    prompting = (f"its chat template builds the run's {fmt.name}-format prompt around a user message holding the "
                 f"document")
    if args.gguf:
        written = gguf_export.write_gguf(model, tokenizer, Path(args.gguf), args.gguf_type,
                                         name=f"{cfg.model.name} {adapted.name} (peftsum)", progress=True)
        print(f"exported {source} ({what}) to {written.path} ({written.gguf_type}, {written.bytes / 2 ** 20:.1f} MiB); "
              f"run it with llama.cpp (llama-cli -m {written.path}); {prompting}")
    if out is not None:
        note = yaml.safe_dump({"exported_from": str(source), "method": adapted.name, "prompt": fmt.describe(),
                               **cfg.to_dict()}, sort_keys=False)
        write_model(model, tokenizer, out, note)
        write_card(out, export_card(out, source, cfg, adapted.name))
        print(f"exported {source} ({what}) to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); "
              f"{prompting} (apply_chat_template([{{'role': 'user', 'content': document}}], "
              f"add_generation_prompt=True)), and generate() decodes as the run did (transformers' n-gram ban and "
              f"repetition penalty also see the prompt)")
    return 0
