"""Seeing and sharing results: `report` re-renders a comparison's report (also for runs of older versions), `push`
uploads a trained method folder or an export to the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def add_report(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="the comparison's folder (holding results.json)")


def report(args) -> int:
    from ..infra import runs
    from ..outputs.model_card import write_cards
    from ..outputs.report import write_report
    from ..study.analysis import upgrade

    run = Path(args.run)
    if not (run / runs.RESULTS).is_file():
        raise UserError(f"{run} holds no comparison (no {runs.RESULTS})")
    results = upgrade(runs.read_results(run / runs.RESULTS))
    path = write_report(results, run)
    cards = write_cards(results, run)
    print(f"report: {path}, {run / runs.REPORT_HTML}; {len(cards)} model cards ({runs.MODEL_CARD})")
    return 0


def add_push(parser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="a trained method folder (adapter or fine-tuned weights) or an export (export --merged)")
    parser.add_argument("--repo", required=True, metavar="ID",
                        help="the hub model repository, e.g. me/smollm2-xsum-lora")
    parser.add_argument("--private", action="store_true", help="create the repository as private")


def push(args) -> int:
    from ..outputs.push import push

    url, names = push(Path(args.run), args.repo, private=args.private)
    print(f"pushed {len(names)} files ({', '.join(names)}) from {args.run} to {url}")
    return 0
