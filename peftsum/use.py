"""Using a trained result: `summarize` with a run or a peft adapter, and `export` of a merged model.

Not built yet: the commands exist so that they answer clearly rather than pretend.
"""

from __future__ import annotations

from .errors import UserError


def add_commands(commands, add_config_flags) -> None:
    for name, text in (("summarize", "summarize documents with a trained run or adapter"),
                       ("export", "write a standalone merged model from a trained run")):
        parser = commands.add_parser(name, help=f"{text} (not yet available)")
        parser.set_defaults(handler=_not_yet)


def _not_yet(args) -> int:
    raise UserError(f"'peftsum {args.command}' is not available yet")
