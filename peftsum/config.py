"""Typed run configuration: dataclasses, loadable from YAML, overridable from the command line.

Every knob lives in exactly one section (`model`, `data`, `train`, `eval`, and one per method) and is
reachable as `--section.field VALUE` on the command line; `validate` checks the whole config once, at the boundary.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .infra.files import read_text
from .methods import registry
from .methods.rules import require

METHODS = registry.NAMES  # every method, in the registry's order (each one's settings section comes from it)
DEFAULT_METHODS = ("lora", "prompt", "finetune")  # what a comparison runs unless told: `--methods all` runs every one
BASELINES = ("zero-shot", "lead", "few-shot")  # what eval.baselines may list (baselines.py)
FORMATS = ("plain", "chat", "auto")  # data.format (prompts.py)
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")  # train.report_to (trackers.py)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # 'smollm2-135m' (embedded), a hub id, or a local folder
    random_init: bool = False  # build from the configuration alone, with random weights
    precision: str = "auto"  # compute precision: auto (bf16 where the hardware has it) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | mps


@dataclass
class DataConfig:
    source: str = "cnn_dailymail"  # preset (cnn_dailymail, xsum, samsum), hub id, or local file/folder
    hub_config: str | None = None  # hub data set configuration, e.g. 3.0.0 for cnn_dailymail
    document_column: str | None = None  # default: inferred from known column pairs
    summary_column: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    train_size: int = 0  # training examples drawn (seeded) from the train split; 0 = all
    train_eval_size: int = 32  # training examples scored for the "train" rows of the report
    eval_size: int = 32  # evaluation examples scored for the "eval" rows of the report
    # The prompt format (prompts.py): plain = `template`; chat = the tokenizer's chat template with `instruction` and
    # the document in the user turn (and `system`, if given); auto = chat where the tokenizer has a chat template.
    format: str = "auto"
    instruction: str = "auto"  # the chat format's instruction ("" = none); auto = the data set kind's (data.KINDS)
    system: str | None = None  # the chat format's system message; None = none (the template's own default, if any)
    template: str = "{document}\nTL;DR:"  # the plain format's prompt; the summary follows it after a space
    max_length: int = 256  # tokens per example, virtual tokens included; the document is truncated to fit
    max_summary_tokens: int = 64  # the summary's own cap (the only way a summary is ever cut)
    hub_stream_limit: int = 2000  # rows streamed from a hub split before subsetting


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    # Equal budgets: train until this much training wall-clock (or real tokens) is spent, however many epochs that
    # takes (train.epochs is then ignored); the schedule's warmup and decay follow the share of the budget spent.
    budget_seconds: float = 0.0
    budget_tokens: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps between checkpoints (0 = only at the end of each epoch)
    keep_checkpoints: int = 2  # the newest K checkpoints are kept
    # torch.compile the transformer blocks for training (compiled.py): faster steps after a one-off compile. auto:
    # on where it was measured to pay (a GPU; a CPU in bf16 once the planned work passes the break-even of
    # compiled.should_compile; never a CPU in fp32, where it bought 0.99-1.05x); true | false to choose.
    compile: str = "auto"
    # Recompute each block's activations in the backward instead of keeping them: less memory, ~1/3 more compute.
    gradient_checkpointing: bool = False
    # Validation during training: every `eval_every` optimizer steps (and at the last step) the eval loss on
    # `eval_size` examples of the eval split, disjoint from the scored eval subset where the split has the rows;
    # `eval_rouge` also generates and scores them. Time spent validating is not training time.
    eval_every: int = 0  # 0 = off
    eval_size: int = 32
    eval_rouge: bool = False
    early_stopping_patience: int = 0  # stop once this many validation points in a row did not improve (0 = off)
    keep_best: bool = False  # the result is the weights of the best validation point, not of the last step
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, mlflow, trackio, wandb

    @property
    def validation_size(self) -> int:
        """Validation examples to draw: train.eval_size when validation is on, else none."""
        return self.eval_size if self.eval_every else 0


@dataclass
class EvalConfig:
    # Decoding one token costs a pass over all the weights whatever the batch, so wider batches amortise it:
    # SmolLM2-135M on a 2-core CPU made 4.8 summaries/s at 16, 7.0 at 64 (BENCHMARKS.md), with less memory than
    # transformers' generate at 16.
    batch_size: int = 64
    max_new_tokens: int = 64
    num_beams: int = 1  # 1 = greedy
    no_repeat_ngram_size: int = 3  # greedy decoding of small models loops without it
    repetition_penalty: float = 1.0
    bootstrap_samples: int = 1000  # resamples for the 95% ROUGE intervals
    # int8: generation multiplies by int8 weights, the activations quantized per token (quantized.py; CPU only; the
    # report says so); none: in the training precision.
    quantize: str = "none"
    before: bool = True  # score the baselines (below) before training; false skips them all
    # What every method is measured against (baselines.py): zero-shot (the untouched model in the run's format, and
    # in the other one too when data.format auto chose chat), lead (the document's first lead_k sentences), few-shot
    # (the untouched model shown up to `shots` training examples, as many as fit the model's context).
    baselines: list[str] = field(default_factory=lambda: ["zero-shot", "lead"])
    lead_k: int = 0  # sentences (or lines) the lead baseline copies; 0 = the data set kind's (data.KINDS)
    lead_unit: str = "auto"  # sentence | line (one turn a line: dialogues) | auto = the data set kind's
    shots: int = 3  # most training examples in a few-shot prompt (fewer where they do not fit the context)


class _RunConfigMethods:
    """What RunConfig (made below from its sections) does besides holding them."""

    def method_lr(self, method: str) -> float:
        return getattr(self, method).lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section(name: str, cls: type) -> tuple:
    return name, cls, field(default_factory=cls)


# Built with make_dataclass so that the method sections need no line here; the fields' order is the order a saved
# config.yaml lists them in.
RunConfig = dataclasses.make_dataclass("RunConfig", [
    _section("model", ModelConfig),
    _section("data", DataConfig),
    ("methods", list[str], field(default_factory=lambda: list(DEFAULT_METHODS))),  # "all": every method
    ("seeds", int, 1),  # train each method this many times (seeds train.seed, train.seed + 1, ...); report mean ± std
    *[_section(name, registry.settings_class(name)) for name in METHODS],
    _section("train", TrainConfig),
    _section("eval", EvalConfig),
    ("out", str, "runs/latest"),
], bases=(_RunConfigMethods,), namespace={
    "__module__": __name__,
    "__doc__": "The whole run: model and data, which methods run, one settings section per method (from the registry: "
               "a new method brings its own), training and evaluation.",
})


# ---------------------------------------------------------------- building from dicts, YAML and flags

def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _convert(value, tp, where: str):
    """Convert a YAML or command-line value to the annotated type, or say which key is wrong.

    Text (every command-line value, a quoted YAML value) is parsed: "2", "true", "1e-4". A value YAML already typed
    must have the field's type: `epochs: true` or `rank: 2.5` is refused, not read as 1 or 2, and `hub_config: 1.10`
    (a number to YAML) is refused rather than turned into "1.1".
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item, where) for v in value]
    if not isinstance(value, str):
        return _typed(value, tp, where)
    try:
        if tp is bool:
            text = value.lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}") from None


# What a YAML value of each Python type is called in an error message.
YAML_KINDS = {bool: "a boolean", int: "a whole number", float: "a number", list: "a list", dict: "a mapping",
              type(None): "empty"}


def _typed(value, tp, where: str):
    """A value that YAML (or a caller) already typed: taken only where its type is the field's (an int for a float)."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        kind = YAML_KINDS.get(type(value), type(value).__name__)
        hint = "; quote it to give it as text" if tp is str and isinstance(value, (bool, int, float)) else ""
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r} ({kind}){hint}")
    return tp(value)


# Settings given in any case and stored in lower case: train.compile TRUE and True are true.
LOWERCASE = ("train.compile",)


def _apply(obj, updates: dict, prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key {where!r}; known: {', '.join(sorted(names))}")
        tp = _field_type(type(obj), key)
        if _is_section(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a mapping of settings, got {value!r}")
            _apply(getattr(obj, key), value, prefix=f"{where}.")
        else:
            value = _convert(value, tp, where)
            setattr(obj, key, value.lower() if where in LOWERCASE and isinstance(value, str) else value)


# Settings an older peftsum did not write, and the value they had then where it differs from today's default: a saved
# config (a run's config.yaml, results.json) that lacks one was made with this value.
LEGACY = {"data": {"format": "plain"}, "eval": {"baselines": ["zero-shot"]}}


def fill_legacy(saved: dict) -> dict:
    """`saved` (a config dict peftsum wrote) with the LEGACY value of every setting it lacks; in place."""
    for section, values in LEGACY.items():
        if isinstance(saved.setdefault(section, {}), dict):
            for key, value in values.items():
                saved[section].setdefault(key, value)
    return saved


def complete_saved(saved: dict) -> dict:
    """A whole config dict from one an older peftsum wrote (results.json's "config"): LEGACY values, then today's
    defaults for the settings that did not exist then (they keep the old behaviour); in place."""
    _fill_missing(fill_legacy(saved), RunConfig().to_dict())
    return saved


def _fill_missing(config: dict, defaults: dict) -> None:
    for key, value in defaults.items():
        if key not in config:
            config[key] = value
        elif isinstance(value, dict) and isinstance(config[key], dict):
            _fill_missing(config[key], value)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> dict:
    """A YAML config file as a mapping: duplicate keys and malformed YAML are refused in one line naming the file."""
    text = read_text(path, "config file")
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except _DuplicateKey as exc:
        raise UserError(f"config file {path}: {exc}; give each key once") from None
    except yaml.YAMLError as exc:
        parts = [f"{text} (line {mark.line + 1})" for text, mark in ((getattr(exc, "context", None),
                                                                       getattr(exc, "context_mark", None)),
                                                                      (getattr(exc, "problem", None),
                                                                       getattr(exc, "problem_mark", None)))
                 if text and mark is not None]
        raise UserError(f"config file {path} is not valid YAML: {': '.join(parts) or str(exc).splitlines()[0]}") \
            from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: dict | None = None, saved: bool = False) -> RunConfig:
    """Defaults, then the YAML file (if any), then dotted overrides such as {'train.epochs': 2}.

    `saved`: the file is a config peftsum wrote (a run's config.yaml), whose missing settings mean their LEGACY values.
    """
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        data = load_yaml(path)
        try:
            _apply(cfg, fill_legacy(data) if saved else data)
        except UserError as exc:
            raise UserError(f"config file {path}: {exc}") from None
    for dotted, value in (overrides or {}).items():
        nested: dict = {}
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        _apply(cfg, nested)
    if cfg.methods == ["all"]:
        cfg.methods = list(METHODS)
    validate(cfg)
    return cfg


def config_from_args(args, base: str | Path | None = None) -> RunConfig:
    """Defaults, then --config FILE (else `base`, e.g. a run's saved config.yaml), then every config flag given."""
    overrides = {k: v for k, v in vars(args).items() if "." in k or k in ("methods", "out", "seeds")}
    given = getattr(args, "config", None)
    return load_config(given or base, overrides, saved=not given and base is not None)


def flag_names() -> list[tuple[str, object]]:
    """Every settable key as ('section.field', type), for building command-line flags."""
    out = []
    for f in dataclasses.fields(RunConfig):
        tp = _field_type(RunConfig, f.name)
        if _is_section(tp):
            for sub in dataclasses.fields(tp):
                out.append((f"{f.name}.{sub.name}", _field_type(tp, sub.name)))
        else:
            out.append((f.name, tp))
    return out


def validate(cfg: RunConfig) -> None:
    """Refuse impossible settings with one line naming the value and what would be accepted."""
    for m in cfg.methods:
        require(m in METHODS, f"unknown method {m!r}; choose from {', '.join(METHODS)}, or all")
    require(len(cfg.methods) > 0, "no methods given; choose from " + ", ".join(METHODS))
    require(bool(cfg.out.strip()), f"out must name a folder, got {cfg.out!r}")
    require(cfg.model.precision in ("auto", "bf16", "fp32"),
            f"model.precision must be auto, bf16 or fp32, got {cfg.model.precision!r}")
    require(cfg.model.device in ("auto", "cpu", "cuda", "mps") or bool(re.fullmatch(r"cuda:\d+", cfg.model.device)),
            f"model.device must be auto, cpu, cuda, cuda:N or mps, got {cfg.model.device!r}")
    d = cfg.data
    require(d.format in FORMATS, f"data.format must be {', '.join(FORMATS)}, got {d.format!r}")
    require("{document}" in d.template, f"data.template must contain '{{document}}', got {d.template!r}")
    for name in ("train_size", "train_eval_size", "eval_size", "hub_stream_limit"):
        require(getattr(d, name) >= 0, f"data.{name} must be >= 0, got {getattr(d, name)}")
    require(d.max_summary_tokens >= 1, f"data.max_summary_tokens must be >= 1, got {d.max_summary_tokens}")
    require(d.max_length > d.max_summary_tokens + 1,
            f"data.max_length ({d.max_length}) must exceed data.max_summary_tokens + 1 ({d.max_summary_tokens + 1})")
    for name in METHODS:
        section = getattr(cfg, name)
        require(section.lr > 0, f"{name}.lr must be > 0, got {section.lr}")
        section.check(cfg)
    t = cfg.train
    require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    require(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    require(t.max_steps >= 0, f"train.max_steps must be >= 0, got {t.max_steps}")
    require(t.budget_seconds >= 0, f"train.budget_seconds must be >= 0 (0 = no time budget), got {t.budget_seconds}")
    require(t.budget_tokens >= 0, f"train.budget_tokens must be >= 0 (0 = no token budget), got {t.budget_tokens}")
    require(not (t.budget_seconds and t.budget_tokens),
            "give one budget: train.budget_seconds or train.budget_tokens, not both")
    require(cfg.seeds >= 1, f"seeds must be >= 1, got {cfg.seeds}")
    require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    require(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    require(t.schedule in ("linear", "cosine", "constant"),
            f"train.schedule must be linear, cosine or constant, got {t.schedule!r}")
    require(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 = off), got {t.max_grad_norm}")
    require(t.checkpoint_every >= 0,
            f"train.checkpoint_every must be >= 0 (0 = at epoch ends only), got {t.checkpoint_every}")
    require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    require(t.compile in ("auto", "true", "false"), f"train.compile must be auto, true or false, got {t.compile!r}")
    require(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = no validation during training), got {t.eval_every}")
    require(t.eval_size >= 1, f"train.eval_size must be >= 1, got {t.eval_size}")
    require(t.early_stopping_patience >= 0,
            f"train.early_stopping_patience must be >= 0 (0 = off), got {t.early_stopping_patience}")
    for name, on in (("early_stopping_patience", t.early_stopping_patience), ("keep_best", t.keep_best),
                     ("eval_rouge", t.eval_rouge)):
        require(not on or t.eval_every > 0, f"train.{name} needs validation points: set train.eval_every N (steps)")
    for name in t.report_to:
        require(name in (*TRACKERS, "none"), f"unknown tracker {name!r} in train.report_to; choose from "
                                             f"{', '.join(TRACKERS)} (or none)")
    e = cfg.eval
    require(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    require(e.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {e.max_new_tokens}")
    require(e.num_beams >= 1, f"eval.num_beams must be >= 1, got {e.num_beams}")
    require(e.no_repeat_ngram_size >= 0, f"eval.no_repeat_ngram_size must be >= 0, got {e.no_repeat_ngram_size}")
    require(e.repetition_penalty > 0, f"eval.repetition_penalty must be > 0, got {e.repetition_penalty}")
    require(e.bootstrap_samples >= 0, f"eval.bootstrap_samples must be >= 0, got {e.bootstrap_samples}")
    require(e.quantize in ("none", "int8"), f"eval.quantize must be none or int8, got {e.quantize!r}")
    for b in e.baselines:
        require(b in BASELINES, f"unknown baseline {b!r} in eval.baselines; choose from {', '.join(BASELINES)}")
    require(len(set(e.baselines)) == len(e.baselines), f"eval.baselines lists a baseline twice: {e.baselines}")
    require(e.lead_k >= 0, f"eval.lead_k must be >= 0 (0 = the data set's default), got {e.lead_k}")
    require(e.lead_unit in ("auto", "sentence", "line"),
            f"eval.lead_unit must be auto, sentence or line, got {e.lead_unit!r}")
    require(e.shots >= 1, f"eval.shots must be >= 1, got {e.shots}")
