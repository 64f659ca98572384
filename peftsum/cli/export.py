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


def export(args) -> int:
    from ..infra.files import check_writable
    from ..outputs.export_run import merge_for_export, write_folder, write_gguf_file
    from .source import open_source

    source, out = _request(args)
    setattr(args, "model.precision", "fp32")  # merge into, and write, full-precision weights
    if out is not None:
        check_writable(out, "--merged")  # before the model loads and merges
    merged = merge_for_export(*open_source(args))
    prompting = (f"its chat template builds the run's {merged.fmt.name}-format prompt around a user message holding "
                 f"the document")
    if args.gguf:
        written = write_gguf_file(merged, Path(args.gguf), args.gguf_type)
        print(f"exported {source} ({merged.what}) to {written.path} ({written.gguf_type}, "
              f"{written.bytes / 2 ** 20:.1f} MiB); run it with llama.cpp (llama-cli -m {written.path}); {prompting}")
    if out is not None:
        write_folder(merged, out, source)
        print(f"exported {source} ({merged.what}) to {out}; load it with "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r}); {prompting} (apply_chat_template([{{'role': "
              f"'user', 'content': document}}], add_generation_prompt=True)), and generate() decodes as the run did "
              f"(transformers' n-gram ban and repetition penalty also see the prompt)")
    return 0


def _request(args) -> tuple[Path, Path | None]:
    """(the source folder, the --merged folder or None), with every refusal that needs no model: no or an empty
    target, targets that exist (without --overwrite), no source, a target that is the source, a method that cannot
    merge."""
    from ..methods.registry import all_methods
    from ..outputs import gguf_export
    from ..outputs.export import check_target
    from ..outputs.export_run import check_mergeable
    from .source import source_config

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
    check_mergeable(source, flag, source_config(args).methods[0] if args.run else None)
    return source, out
