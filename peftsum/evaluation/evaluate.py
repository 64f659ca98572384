"""Score a model (untouched or adapted) on a list of examples: mean summary loss, generated summaries, ROUGE.

Generation is batched over prompts sorted by length (little padding), left-padded, with the KV cache; LoRA is merged
into the weights while generating.

Started as several processes, each rank takes every world-th batch (the same batches as one process makes, so each
example gets the same padding and the same summary); loss sums and summaries are then gathered on every rank, each
example exactly once, in input order. Only rank 0 scores ROUGE and writes the predictions file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import fast
from ..config import DataConfig, EvalConfig
from ..core.data import Example
from ..core.forward import autocast, collate, generate_batch, summary_loss
from ..core.prompts import prompt_format
from ..infra import distributed
from ..infra.files import write_jsonl
from ..methods.base import Adapted
from .metrics import ROUGE_KEYS, bootstrap_interval, rouge_intervals, rouge_per_document


def _by_length(items: list[list[int]], batch_size: int) -> list[list[int]]:
    """Index batches over items sorted by length, so each batch pads little."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def mean_loss(adapted: Adapted, tokenizer, examples: list[Example], data_cfg: DataConfig, batch_size: int,
              device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """Mean cross-entropy (nats) over every summary token (its end included) of every example, in the run's prompt
    format, and the number of those tokens."""
    fmt = prompt_format(tokenizer, data_cfg)
    encoded = [fmt.example(e, data_cfg, reserved=adapted.virtual_tokens) for e in examples]
    total, count = 0.0, 0
    batches = _by_length([e.input_ids for e in encoded], batch_size)
    for batch_indices in (batches[i] for i in distributed.shard(batches)):
        batch = collate([encoded[i] for i in batch_indices], tokenizer.pad_token_id)
        with autocast(device, dtype):
            loss_sum, n = summary_loss(adapted, {k: v.to(device) for k, v in batch.items()})
        total, count = total + loss_sum.item(), count + n
    if distributed.world() > 1:
        sums = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
        total, count = sums[0].item(), int(sums[1])
    return total / max(count, 1), count


def generate(adapted: Adapted, tokenizer, documents: list[str], data_cfg: DataConfig, eval_cfg: EvalConfig,
             device: torch.device, dtype: torch.dtype, progress: bool = False, desc: str = "generate") -> list[str]:
    """Summaries for documents in the run's prompt format, in input order (with several processes: on every rank,
    each made by one)."""
    fmt = prompt_format(tokenizer, data_cfg)
    budget = fmt.budget(data_cfg, reserved=adapted.virtual_tokens)
    prompts = [fmt.prompt(d, budget) for d in documents]
    return generate_from(adapted, tokenizer, prompts, eval_cfg, fmt.stop_ids, device, dtype, progress=progress,
                         desc=desc)


@torch.no_grad()
def generate_from(adapted: Adapted, tokenizer, prompts: list[list[int]], eval_cfg: EvalConfig,
                  stop_ids: tuple[int, ...], device: torch.device, dtype: torch.dtype, progress: bool = False,
                  desc: str = "generate", batch_size: int | None = None) -> list[str]:
    """Summaries for tokenized prompts, each ending at the first of `stop_ids`, in input order; `batch_size`
    (default eval.batch_size) prompts at a time."""
    made: list[tuple[int, str]] = []
    batches = _by_length(prompts, batch_size or eval_cfg.batch_size)
    adapted.model.eval()
    int8 = eval_cfg.quantize == "int8"
    if int8:
        fast.check_int8(device)
    with adapted.for_generation(), autocast(device, dtype):
        # For the model as it generates (LoRA merged): the lean decoder where it is exact, int8 where asked.
        with fast.generation(adapted.model, device, dtype, batch_size or eval_cfg.batch_size,
                             lean=eval_cfg.num_beams == 1, int8=int8) as decoder:
            for batch_indices in tqdm([batches[i] for i in distributed.shard(batches)], desc=desc,
                                      disable=not progress or not distributed.is_main(), dynamic_ncols=True):
                texts = generate_batch(adapted, tokenizer, [prompts[i] for i in batch_indices],
                                       max_new_tokens=eval_cfg.max_new_tokens, num_beams=eval_cfg.num_beams,
                                       no_repeat_ngram_size=eval_cfg.no_repeat_ngram_size,
                                       repetition_penalty=eval_cfg.repetition_penalty, stop_ids=stop_ids,
                                       decoder=decoder)
                made.extend(zip(batch_indices, texts))
    made = distributed.gather_objects(made)
    if sorted(i for i, _ in made) != list(range(len(prompts))):  # a bug, not a user error: never write such a file
        raise RuntimeError(f"generation covered {len(made)} summaries for {len(prompts)} documents")
    predictions: list[str] = [""] * len(prompts)
    for i, text in made:
        predictions[i] = text
    return predictions


def _rouge_scores(predictions: list[str], references: list, samples: int, seed: int) -> tuple[dict, dict]:
    """ROUGE intervals and the per-document scores they come from, scored once.

    The intervals use the exact scores; the stored per-document ones are rounded to 3 decimals, which keeps
    results.json small and is far below any difference a paired test could resolve.
    """
    per_document = rouge_per_document(predictions, references)
    rounded = {key: [round(v, 3) for v in per_document[key]] for key in ROUGE_KEYS}
    return rouge_intervals(per_document, samples, seed), rounded


def score_predictions(examples: list[Example], predictions: list[str], samples: int, seed: int,
                      predictions_path: Path | None = None, loss: float | None = None,
                      tokens: int | None = None) -> dict:
    """{"loss", "n", "tokens", "rouge", "per_document"} of predictions for `examples` (loss and tokens as given:
    None for a system that has no loss, such as lead-k), with the predictions saved as JSONL."""
    references = [e.references or e.summary for e in examples]
    scores = None
    if distributed.is_main():
        scores = _rouge_scores(predictions, references, samples, seed)
    rouge, per_document = distributed.broadcast_object(scores)
    if predictions_path is not None and distributed.is_main():
        write_jsonl(predictions_path, [{"id": e.id, "prediction": p, "reference": e.summary,
                                        **({"references": e.references} if e.references else {})}
                                       for e, p in zip(examples, predictions)])
    return {"loss": loss, "n": len(examples), "tokens": tokens, "rouge": rouge, "per_document": per_document}


def evaluate(adapted: Adapted, tokenizer, examples: list[Example], data_cfg: DataConfig, eval_cfg: EvalConfig,
             device: torch.device, dtype: torch.dtype, predictions_path: Path | None = None, seed: int = 0,
             progress: bool = False, desc: str = "evaluate") -> dict | None:
    """{"loss", "n", "tokens", "rouge", "per_document"} for the examples (None when there are none), in the prompt
    format of data_cfg.

    "per_document" holds each example's ROUGE F1 x 100 per key, in input order, for paired tests between models.
    Predictions are saved as JSONL.
    """
    if not examples:
        return None
    loss, tokens = mean_loss(adapted, tokenizer, examples, data_cfg, eval_cfg.batch_size, device, dtype)
    predictions = generate(adapted, tokenizer, [e.document for e in examples], data_cfg, eval_cfg, device, dtype,
                           progress=progress, desc=desc)
    return score_predictions(examples, predictions, eval_cfg.bootstrap_samples, seed, predictions_path, loss, tokens)


def validation(tokenizer, examples: list[Example], data_cfg: DataConfig, eval_cfg: EvalConfig, device: torch.device,
               dtype: torch.dtype, rouge: bool = False) -> Callable[[Adapted], dict]:
    """The training loop's validation function: a model's mean loss on `examples` ({"loss", "tokens"}), and with
    `rouge` the mean ROUGE F1 x 100 of summaries generated with the eval settings ({"rouge1", ...}).

    A collective with several processes (every rank calls it, each scores its share); every rank gets the numbers.
    """
    references = [e.references or e.summary for e in examples]

    def score(adapted: Adapted) -> dict:
        loss, tokens = mean_loss(adapted, tokenizer, examples, data_cfg, eval_cfg.batch_size, device, dtype)
        point = {"loss": loss, "tokens": tokens}
        if rouge:
            predictions = generate(adapted, tokenizer, [e.document for e in examples], data_cfg, eval_cfg, device,
                                   dtype)
            means = None
            if distributed.is_main():
                per_document = rouge_per_document(predictions, references)  # the mean as evaluate takes it:
                means = {key: bootstrap_interval(per_document[key], 0)["mean"] for key in ROUGE_KEYS}
            point.update(distributed.broadcast_object(means))
        return point

    return score
