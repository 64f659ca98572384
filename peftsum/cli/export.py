"""`export`: a trained LoRA or fine-tuning run (or a peft LoRA adapter) as a standalone transformers folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .flags import add_config_flags, add_source_flags

DESCRIPTION = ("Write a transformers folder (safetensors, config, tokenizer) that AutoModelForCausalLM loads without "
               "peftsum or peft: LoRA merged into the weights, or the fine-tuned weights.")


def add_export(parser) -> None:
    add_config_flags(parser)
    add_source_flags(parser)
    parser.add_argument("--merged", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--overwrite", action="store_true", help="write into DIR even if it is not empty")


def _cannot_merge(source: Path, flag: str, method: str) -> UserError:
    return UserError(f"{source} is a {method} result, which cannot be exported as a plain model: its soft prompt "
                     f"is input embeddings placed before every document, not a change of the model's weights; use "
                     f"'peftsum summarize {flag} {source}' (or load the adapter with peft) instead")


def export(args) -> int:
    import yaml

    from .. import adapters
    from ..export import check_target, merged_model, write_model
    from ..methods import BY_PEFT_TYPE, REGISTRY, method_named
    from .source import open_source, source_config

    out = Path(args.merged)
    check_target(out, args.overwrite)
    if not args.run and not args.adapter:
        mergeable = ", ".join(m.name for m in REGISTRY.values() if m.can_merge)
        raise UserError(f"export needs --run DIR (a trained run of {mergeable}) or --adapter DIR (a peft adapter of "
                        f"one of those)")
    source, flag = (Path(args.run), "--run") if args.run else (Path(args.adapter), "--adapter")
    if out.resolve() == source.resolve():
        raise UserError(f"--merged {out} is the {flag} folder itself; choose a new folder")
    # Refused before anything loads: a method that cannot merge.
    if args.run:
        method = method_named(source_config(args).methods[0])
    else:
        method = BY_PEFT_TYPE.get(str(adapters.read_adapter_config(source).get("peft_type") or "").upper())
    if method is not None and not method.can_merge:
        raise _cannot_merge(source, flag, "prompt-tuning" if method.name == "prompt" else method.name)
    setattr(args, "model.precision", "fp32")  # merge into, and write, full-precision weights
    cfg, session, adapted = open_source(args)
    model = merged_model(adapted)
    note = yaml.safe_dump({"exported_from": str(source), "method": adapted.name, **cfg.to_dict()}, sort_keys=False)
    write_model(model, session.tokenizer, out, note)
    print(f"exported {source} ({adapted.description}, merged) to {out}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}); prompt it with the template {cfg.data.template!r}")
    return 0
