"""`peftsum scale`: the same comparison over several models (scale.py), one sub-folder each."""

from __future__ import annotations

from pathlib import Path

from ..config import config_from_args
from ..errors import UserError
from .flags import add_config_flags, check_out, launch

DESCRIPTION = ("Run one comparison (methods, data, budget, seeds: every setting but the model) for each model given "
               "in --models, into <out>/<model>/, and chart each method's eval ROUGE-1 and loss and the "
               "prompt-minus-LoRA gap against the models' sizes (scale.md, scale.png).")


def add_scale(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--models", dest="scale_models", required=True, metavar="A,B,...",
                        help="the models compared (names, hub ids or folders), each into <out>/<model>/")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="read back finished models, continue the rest")
    group.add_argument("--overwrite", action="store_true", help="replace the models already in the output folder")


def scale(args) -> int:
    if "model.name" in vars(args):
        raise UserError("scale takes its models from --models; leave out --model")
    cfg = config_from_args(args)  # before torch is imported: a bad setting is refused at once
    check_out(Path(cfg.out))
    from ..infra import lock, runs
    from ..study.scale import parse_models, run_scale, scale_table

    models = parse_models(args.scale_models)
    launch(cfg)
    out = Path(cfg.out)
    with lock.holding(out):
        result = run_scale(cfg, models, resume=args.resume, overwrite=args.overwrite)
    print("\n".join(scale_table(result["models"])))
    print(f"scale: {out / runs.SCALE_REPORT}, {out / runs.SCALE_PLOT}")
    return 0
