"""Model cards: the README.md of every trained method folder and every export, in the Hugging Face format.

A card is YAML front matter (base_model, library_name, tags, datasets, metrics and, where the data set is on the
hub, a model-index with this run's eval scores) and a body: method and settings, data, budget, scores with 95%
intervals against the untouched base model, how to load the result with peft / transformers / peftsum.

`render_card` is pure: it turns a `CardInfo` into text, reading every number it shows (the paired tests against the
untouched model are the comparison's analysis, analysis.py's `against_untouched`). The builders gather a CardInfo from
what a command has at hand (a comparison's results dict, a `train` run, an export and the run it came from);
`write_card` writes it. What a card says of a method comes from the method protocol (its title, tags, peft form,
whether it merges), never from its name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..evaluation.metrics import ROUGE_KEYS
from ..infra.files import looks_like_path, write_text
from ..infra.runs import MODEL_CARD, RESULTS, read_results
from ..methods.registry import method_named
from ..study.analysis import ALPHA, DEFAULT_SAMPLES, trained_runs, upgrade
from .formatting import ci, duration, epochs_done, p_value, signed

__all__ = ["CardInfo", "card_from_results", "export_card", "render_card", "train_card", "write_card",
           "write_cards"]

CARD = MODEL_CARD
# The embedded models are GGUF files of these hub models, dequantized (models.py): the hub id is the closest base,
# beside the quantization the embedded copy went through.
EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
EMBEDDED_QUANTS = {"smollm2-135m": "Q4_1", "gemma3-270m": "Q4_K_M"}
# Base models whose terms travel with what is trained on them (NOTICE): the hub's license id and the notice that
# every shared derivative must carry.
BASE_TERMS = {"gemma3-270m": ("gemma", "Gemma is provided under and subject to the Gemma Terms of Use found at "
                                       "ai.google.dev/gemma/terms. This is a Model Derivative of Gemma: whoever "
                                       "shares it passes on those terms and their use restrictions "
                                       "(ai.google.dev/gemma/prohibited_use_policy).")}
LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
KINDS = ("adapter", "tensors", "merged")  # peft adapter folder, finetuned.safetensors, standalone export


@dataclass
class CardInfo:
    """What a card states. Only method, kind, config and where are required; every other fact is optional."""

    method: str  # a registered method's name
    kind: str  # one of KINDS
    config: dict  # the run's RunConfig.to_dict()
    where: str  # the folder the card sits in (its load snippets use it)
    params: dict | None = None  # {"total", "trainable", "trainable_percent", "description"}
    training: dict | None = None  # train.train's facts: steps, epochs, tokens, tokens_per_s, budget...
    after: dict | None = None  # {"train": split, "eval": split} after training
    baseline: dict | None = None  # the same for the untouched model
    paired: dict | None = None  # this run minus the untouched model, from the analysis (analysis.against_untouched)
    data: dict | None = None  # data facts of the comparison (source, columns, sizes)
    environment: dict | None = None  # hardware and software of the run
    seeds: dict | None = None  # {"seed", "n", "across": seed_summary} for one of several seeds
    source_run: str | None = None  # for an export: the run folder it was made from
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- facts that several parts need


def base_model_id(config: dict) -> str | None:
    """The base model's hub id for the front matter; None for a local folder or random weights."""
    model = config.get("model") or {}
    name = str(model.get("name") or "")
    if model.get("random_init"):
        return None
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    return None if looks_like_path(name) else name or None


def base_terms(config: dict) -> tuple[str, str] | None:
    """(license id, notice) of a base model whose terms bind what is trained on it; None otherwise (random weights
    are no derivative)."""
    model = config.get("model") or {}
    return None if model.get("random_init") else BASE_TERMS.get(str(model.get("name")))


def dataset_id(config: dict) -> tuple[str, str | None] | None:
    """(hub id, hub config) of the data set, or None for local data."""
    from ..core.data import PRESETS

    data = config.get("data") or {}
    source = str(data.get("source") or "")
    if source in PRESETS:
        preset = PRESETS[source]
        return preset.path, data.get("hub_config") or preset.config
    return None if looks_like_path(source) or not source else (source, data.get("hub_config"))


def library_name(kind: str) -> str:
    return "peft" if kind == "adapter" else "transformers"


def merges_an_adapter(method: str) -> bool:
    """Whether a merged export of `method` is an adapter (a method with a peft form: LoRA, (IA)³...) merged into the
    base weights, rather than weights fine-tuned in place."""
    return method_named(method).peft_type is not None


# ---------------------------------------------------------------- the card


def _front_matter(info: CardInfo) -> dict:
    base, dataset = base_model_id(info.config), dataset_id(info.config)
    meta: dict = {}
    terms = base_terms(info.config)
    if terms:
        meta["license"] = terms[0]
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if info.kind == "adapter" else "finetune"
    meta["library_name"] = library_name(info.kind)
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["peftsum", "summarization", *method_named(info.method).tags,
                    *(["merged"] if info.kind == "merged" else [])]
    if dataset:
        meta["datasets"] = [dataset[0]]
    evaluation = (info.after or {}).get("eval")
    if evaluation:
        meta["metrics"] = ["rouge"]
    if evaluation and dataset:
        data = info.config.get("data") or {}
        meta["model-index"] = [{
            "name": Path(info.where).name or info.method,
            "results": [{
                "task": {"type": "summarization", "name": "Summarization"},
                "dataset": {"type": dataset[0], "name": str(data.get("source")),
                            **({"config": dataset[1]} if dataset[1] else {}),
                            "split": data.get("eval_split", "validation")},
                "metrics": [{"type": "rouge", "name": f"{LABELS[k]} (F1 × 100, {evaluation['n']} documents)",
                             "value": round(evaluation["rouge"][k]["mean"], 2)} for k in ROUGE_KEYS],
            }],
        }]
    return meta


def _short(name) -> str:
    """"HuggingFaceTB/SmolLM2-135M" and "/data/xsum" -> their last part."""
    return Path(str(name)).name or str(name)


def _title(info: CardInfo) -> str:
    model = base_model_id(info.config) or (info.config.get("model") or {}).get("name", "?")
    what = {"adapter": f"{method_named(info.method).title} adapter", "tensors": "fine-tuned weights",
            "merged": f"{method_named(info.method).title}-merged model" if merges_an_adapter(info.method)
            else "fine-tuned model"}[info.kind]
    source = (info.config.get("data") or {}).get("source", "?")
    return f"{_short(model)}: {what} for summarization ({_short(source)})"


def _settings(info: CardInfo) -> list[str]:
    cfg, train = info.config, info.config.get("train") or {}
    section = cfg.get(info.method) or {}
    lines = [f"- **Method**: {method_named(info.method).title}" + (f" ({info.params['description']})" if info.params else "")]
    if info.params:
        p = info.params
        lines.append(f"- **Trainable parameters**: {p['trainable']:,} of {p['total']:,} "
                     f"({p['trainable_percent']:.4g} %)")
    settings = ", ".join(f"{k}={'default' if v is None else repr(v)}" for k, v in section.items())
    lines.append(f"- **Method settings**: {settings}")
    lines.append(f"- **Optimizer**: AdamW, learning rate {section.get('lr')}, {train.get('schedule', 'linear')} "
                 f"schedule with warmup {train.get('warmup_ratio', '–')}, batch {train.get('batch_size')} "
                 f"(gradient accumulation {train.get('grad_accum', 1)}), "
                 f"weight decay {train.get('weight_decay', '–')}")
    model = cfg.get("model") or {}
    lines.append(f"- **Base model**: {model.get('name')}" + (" (random weights from the seed: a test model)"
                                                             if model.get("random_init") else ""))
    if model.get("name") in EMBEDDED_HUB_IDS:
        lines.append(f"  (peftsum's embedded copy: the {EMBEDDED_QUANTS[model['name']]} GGUF of "
                     f"{EMBEDDED_HUB_IDS[model['name']]}, dequantized; "
                     "on the original hub weights the results can differ slightly)")
    precision = (info.environment or {}).get("precision") or model.get("precision")  # what "auto" chose, if known
    lines.append(f"- **Precision**: {precision}; seed {train.get('seed')}"
                 + (f" (one of {info.seeds['n']} seeds)" if info.seeds else ""))
    return lines


def _data(info: CardInfo) -> list[str]:
    data_cfg, facts = info.config.get("data") or {}, info.data or {}
    lines = [f"- **Source**: {data_cfg.get('source')}"
             + (f", columns `{facts['document_column']}` → `{facts['summary_column']}`" if facts else "")]
    if facts:
        lines.append(f"- **Examples**: {facts['train_examples']:,} for training, {facts['eval_examples']:,} eval "
                     f"({data_cfg.get('eval_split', 'validation')} split) for the scores below")
    else:
        lines.append(f"- **Examples**: train_size {data_cfg.get('train_size')} (0 = all), seed "
                     f"{(info.config.get('train') or {}).get('seed')}")
    if data_cfg.get("format") == "chat":
        system = f", after the system message {data_cfg['system']!r}" if data_cfg.get("system") else ""
        prompt = (f"the model's chat template, a user turn holding the instruction {data_cfg.get('instruction')!r} "
                  f"and the document{system}; the summary ends with the template's end of turn")
    else:
        prompt = f"the template `{data_cfg.get('template')!r}` (the document replaces `{{document}}`)"
    lines.append(f"- **Prompt**: {prompt}, at most {data_cfg.get('max_length')} tokens with the summary; summaries "
                 f"capped at {data_cfg.get('max_summary_tokens')} tokens")
    return lines


def _budget(info: CardInfo) -> list[str]:
    train, t = info.config.get("train") or {}, info.training
    if train.get("budget_seconds"):
        budget = f"{train['budget_seconds']:g} s of training wall-clock"
    elif train.get("budget_tokens"):
        budget = f"{train['budget_tokens']:,} training tokens"
    else:
        epochs = train.get("epochs")
        budget = f"{epochs} epoch{'' if epochs == 1 else 's'}" + (f", at most {train['max_steps']} steps"
                                                                   if train.get("max_steps") else "")
    lines = [f"- **Budget**: {budget}"]
    if t:
        seconds = sum(e["seconds"] for e in t.get("epochs") or []) or t.get("seconds") or 0.0
        lines.append(f"- **Trained**: {t.get('steps', '–'):,} optimizer steps, {epochs_done(t):.2f} epochs, "
                     f"{t.get('tokens', 0):,} tokens in {duration(seconds)} "
                     f"({t.get('tokens_per_s', 0):,.0f} tokens/s)")
        if "validation" in t:  # validation during training: where it stopped and whose weights these are
            points = t["validation"]
            stopped = ", stopped early" if t["stopped_early"] else ""
            kept = (f"; these are the weights of step {t['weights_step']:,}, the best validation loss"
                    if t["weights_step"] != t["steps"] else "")
            lines.append(f"- **Validation**: eval loss on {train.get('eval_size')} held-out examples every "
                         f"{train.get('eval_every')} steps ({len(points)} points{stopped}){kept}")
    env = info.environment
    if env:
        lines.append(f"- **Hardware**: {env.get('cpu')}; device {env.get('device')}, precision {env.get('precision')}"
                     + (f", GPU {env['gpu']}" if env.get("gpu") else "")
                     + f"; torch {env.get('torch')}, transformers {env.get('transformers')}")
    return lines


def _scores(info: CardInfo) -> list[str]:
    evaluation = (info.after or {}).get("eval")
    if not evaluation:
        return ["Not scored here: `peftsum train` trains only. Score it with `peftsum evaluate --run "
                f"{info.where}`, or compare methods with `peftsum compare` (which writes the scores into this card)."]
    base = (info.baseline or {}).get("eval")
    samples = (info.config.get("eval") or {}).get("bootstrap_samples", DEFAULT_SAMPLES)
    tests = (info.paired or {}).get("tests") or {}
    header = ["", "eval loss", *(LABELS[k] for k in ROUGE_KEYS)]
    rows = [["this model", f"{evaluation['loss']:.3f}", *(ci(evaluation["rouge"][k]) for k in ROUGE_KEYS)]]
    if base:
        rows.insert(0, ["untouched base model", f"{base['loss']:.3f}", *(ci(base["rouge"][k]) for k in ROUGE_KEYS)])
    if tests:
        change = info.paired["loss_change"]
        loss_change = "–" if change is None else f"{change:+.3f}".replace("-", "−")
        rows.append(["difference (paired)", loss_change, *(_test_cell(tests.get(k), samples) for k in ROUGE_KEYS)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"ROUGE: F1 × 100 on {evaluation['n']} eval documents, mean [95% bootstrap interval]; loss: mean "
              "cross-entropy (nats) per summary token. Summaries were generated greedily"
              f"{_decoding(info.config)}."]
    if tests:
        lines.append(f"Difference: this model minus the untouched base model on the same documents, with the 95% "
                     f"interval and p-value of a paired bootstrap ({samples:,} resamples); "
                     f"significant when p < {ALPHA}.")
    elif base:
        lines.append("No paired test: these results have no per-document scores; compare the intervals.")
    if info.seeds and info.seeds.get("across"):
        across = info.seeds["across"].get("eval") or {}
        spread = ", ".join(f"{LABELS[k]} {across[k]['mean']:.1f} ± {_std(across[k]['std'])}"
                           for k in ROUGE_KEYS if k in across)
        lines.append(f"This is seed {info.seeds['seed']} of {info.seeds['n']}; over all seeds (mean ± standard "
                     f"deviation): {spread}.")
    return lines


def _std(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _test_cell(test: dict | None, samples: int) -> str:
    if test is None or test["p_value"] is None:  # None: no resamples were drawn
        return "–" if test is None else f"{signed(test['diff'])} (not tested)"
    return (f"{signed(test['diff'])} [{signed(test['low'])}, {signed(test['high'])}], "
            f"p {p_value(test['p_value'], samples)}")


def _decoding(config: dict) -> str:
    ev = config.get("eval") or {}
    beams = ev.get("num_beams", 1)
    return ((f" (beam search, {beams} beams)" if beams and beams > 1 else "")
            + f", at most {ev.get('max_new_tokens')} new tokens, no_repeat_ngram_size {ev.get('no_repeat_ngram_size')}")


def _prompt_lines(config: dict, exported: bool) -> list[str]:
    """Python that builds the run's prompt: an export's own chat template does it from the document alone."""
    data = config.get("data") or {}
    document = "open(\"article.txt\").read()"
    if exported or data.get("format") == "chat":
        content = document if exported else f"{data.get('instruction')!r} + \"\\n\\n\" + {document}"
        system = ([f"messages.insert(0, {{\"role\": \"system\", \"content\": {data['system']!r}}})"]
                  if data.get("system") and not exported else [])
        return [f"messages = [{{\"role\": \"user\", \"content\": {content}}}]", *system,
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                "return_dict=True)"]
    return [f"prompt = {data.get('template')!r}.format(document={document})",
            "inputs = tokenizer(prompt, return_tensors=\"pt\")"]


def _generate_lines(config: dict, exported: bool = False) -> list[str]:
    ev = config.get("eval") or {}
    beams = ev.get("num_beams", 1) or 1
    return [*_prompt_lines(config, exported),
            f"output = model.generate(**inputs, max_new_tokens={ev.get('max_new_tokens')}, do_sample=False, "
            f"num_beams={beams}, no_repeat_ngram_size={ev.get('no_repeat_ngram_size')})",
            "print(tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))"]


def _usage(info: CardInfo) -> list[str]:
    base = base_model_id(info.config) or str((info.config.get("model") or {}).get("name"))
    where, lines = info.where, []
    if info.kind == "adapter":
        lines += ["With `peft` and `transformers`:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
                  f"model = PeftModel.from_pretrained(base, {where!r})  # this folder, or its hub repo",
                  *_generate_lines(info.config), "```"]
        if method_named(info.method).embeds_virtual_tokens:
            lines += ["", "Generate one document at a time with peft: in a left-padded batch it puts the virtual "
                          "tokens before the padding, which degrades the summaries; peftsum places them right."]
    elif info.kind == "tensors":
        lines += ["`finetuned.safetensors` holds only the trained tensors, under the base model's own parameter names; "
                  "load them over the base model:", "", "```python", "from safetensors.torch import load_file",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained({base!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
                  f"model.load_state_dict(load_file({where + '/finetuned.safetensors'!r}), strict=False)",
                  "model.tie_weights()  # a tied LM head and input embeddings share the trained tensor",
                  *_generate_lines(info.config), "```",
                  "", f"For a standalone model: `peftsum export --run {where} --merged out/`."]
    else:
        lines += ["A standalone transformers model (no peft, no peftsum needed):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained({where!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({where!r})", *_generate_lines(info.config, exported=True),
                  "```"]
    lines += ["", "With peftsum (the run's own prompt format and generation settings):", "", "```bash"]
    if info.kind == "merged":  # its chat template holds the run's prompt: the instruction must not come twice
        lines.append(f"peftsum summarize --model {where} --instruction '' article.txt")
    else:
        lines.append(f"peftsum summarize --run {where} article.txt")
        if info.kind == "adapter":
            lines.append(f"peftsum summarize --adapter {where} --model {base} article.txt   # an adapter alone")
    lines.append("```")
    return lines


def render_card(info: CardInfo) -> str:
    """The card's full text (front matter and body) for `info`; pure and deterministic."""
    if info.kind not in KINDS:
        raise ValueError(f"unknown card kind {info.kind!r}")
    front = yaml.safe_dump(_front_matter(info), sort_keys=False, allow_unicode=True).rstrip()
    made = {"adapter": "an adapter trained", "tensors": "weights fine-tuned", "merged": "a model trained"}[info.kind]
    intro = f"{made[0].upper()}{made[1:]} for abstractive summarization with peftsum ({method_named(info.method).title})."
    if info.source_run:
        intro += (f" Exported from the run `{info.source_run}`"
                  + (f" with the {method_named(info.method).title} weights merged into the base weights."
                     if merges_an_adapter(info.method) else "."))
    lines = ["---", front, "---", "", f"# {_title(info)}", "", intro, "",
             "## Method and settings", "", *_settings(info), "",
             "## Data", "", *_data(info), "",
             "## Training budget", "", *_budget(info), "",
             "## Scores", "", *_scores(info), "",
             "## How to use", "", *_usage(info), "",
             "## Limitations", "",
             "A small model trained briefly: summaries can state facts that are not in the document (the HTML report "
             "of the comparison highlights such words). Scores hold for this data and these settings only.",
             *(["", *info.notes] if info.notes else [])]
    terms = base_terms(info.config)
    if terms:
        lines += ["", "## License", "", terms[1]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- gathering the facts


def kind_of(method: str, merged: bool = False) -> str:
    return "merged" if merged else "adapter" if method_named(method).peft_type else "tensors"


def card_from_results(results: dict, name: str, run: dict, where: str) -> CardInfo:
    """The card of one trained run (`run`: a method's result, or one of its seed runs) of a comparison, whose
    `results` hold their analysis."""
    config = dict(results["config"])
    config["train"] = {**(config.get("train") or {}), **({"seed": run["seed"]} if "seed" in run else {})}
    method = results["methods"][name]
    seeds = None
    if len(method.get("seed_runs") or []) > 1:
        seeds = {"seed": run["seed"], "n": len(method["seed_runs"]), "across": method.get("across_seeds")}
    return CardInfo(method=name, kind=kind_of(name), config=config, where=where, params=run.get("params"),
                    training=run.get("training"), after=run.get("after"), baseline=results.get("baseline"),
                    paired=results["analysis"]["against_untouched"].get(run["dir"]), data=results.get("data"),
                    environment=results.get("environment"), seeds=seeds)


def write_card(folder: Path, info: CardInfo) -> Path:
    path = Path(folder) / CARD
    write_text(path, render_card(info))
    return path


def write_cards(results: dict, out: Path) -> list[Path]:
    """A card in every trained run folder of the comparison in `out` (skipping folders that are gone); `results`
    hold their analysis."""
    written = []
    for name, run in trained_runs(results):
        folder = Path(out) / run["dir"]
        if folder.is_dir():
            written.append(write_card(folder, card_from_results(results, name, run, str(folder))))
    return written


def train_card(cfg, method: str, params: dict, training: dict, environment: dict, folder: Path) -> CardInfo:
    """The card of a `peftsum train` run: no scores (train does not generate), everything else."""
    return CardInfo(method=method, kind=kind_of(method), config=cfg.to_dict(), where=str(folder), params=params,
                    training=training, environment=environment)


def _comparison_of(folder: Path) -> tuple[dict, str, dict] | None:
    """(results, method name, run) when `folder` is a trained run folder of a comparison (one or two levels down);
    results of an older peftsum gain their analysis (analysis.upgrade)."""
    folder = Path(folder).resolve()
    for root in (folder.parent, folder.parent.parent):
        if (root / RESULTS).is_file():
            results = upgrade(read_results(root / RESULTS))
            rel = folder.relative_to(root).as_posix()
            for name, run in trained_runs(results):
                if run.get("dir") == rel:
                    return results, name, run
    return None


def export_card(out: Path, source: Path, cfg, method: str) -> CardInfo:
    """The card of an export: the run's scores when it came from a comparison, its settings otherwise."""
    found = _comparison_of(source)
    if found is not None:
        results, name, run = found
        info = card_from_results(results, name, run, str(out))
    else:
        info = CardInfo(method=method, kind="merged", config=cfg.to_dict(), where=str(out))
    return dataclasses.replace(info, kind="merged", where=str(out), source_run=str(source))
