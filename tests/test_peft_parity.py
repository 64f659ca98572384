"""Numerical parity with the real Hugging Face `peft` package (0.21.x) on tiny random-init GPT-2, Llama and Gemma 3
models.

Everything runs in fp32 on CPU and never touches the network. Each check prints its measured max abs difference
(run `pytest -s tests/test_peft_parity.py` to see them).

What is checked:
  * LoRA forward: peftsum's hook-based LoRA == peft's LoRA layers carrying the same A/B (padded batch).
  * LoRA files, both ways: adapters.save -> peft.PeftModel.from_pretrained, and peft.save_pretrained -> load_into,
    including a peft adapter on a subset of the default targets.
  * LoRA merge/unmerge: merged outputs == hooked outputs; unmerge restores the base weights.
  * Soft prompt on unpadded input == peft prompt tuning (logits of the real tokens), and the saved prompt adapter
    loads in peft with the same logits; the text init equals peft's TEXT init (Gemma's scaled embeddings included).
  * Placement: with peftsum, left padding does not change a row's logits (peft's layout does; printed only).
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import tiny_model

from peftsum.config import RunConfig
from peftsum.core.forward import model_inputs
from peftsum.methods import adapters
from peftsum.methods.base import adapt
from peftsum.methods.lora import method as lora
from peftsum.methods.lora.config import LoraConfig
from peftsum.methods.lora.method import LoRA
from peftsum.methods.prompt.config import PromptConfig

KINDS = ["gpt2", "llama", "gemma3"]
RANK, ALPHA = 4, 8.0
N_VIRTUAL = 5
SUBSET_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "gemma3": ["q_proj", "v_proj"]}


# ---------------------------------------------------------------- helpers

def _run_config(targets=None, init="random") -> RunConfig:
    cfg = RunConfig()
    cfg.model.precision = "fp32"  # exact parity: keep the frozen weights in fp32
    cfg.lora = LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=targets)
    cfg.prompt = PromptConfig(num_virtual_tokens=N_VIRTUAL, init=init)
    cfg.train.seed = 3
    return cfg


def load_in_peft(base, folder):
    """PeftModel.from_pretrained, asserting that peft warned about no missing or unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    key_warnings = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                    or "unexpected" in str(w.message).lower()]
    assert key_warnings == []
    return peft_model


def _peft_lora_config(kind: str, targets: list[str]) -> peft.LoraConfig:
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
                           fan_in_fan_out=(kind == "gpt2"), task_type="CAUSAL_LM")


def _peftsum_loras(model) -> dict[str, LoRA]:
    return {n: m.lora for n, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoRA)}


def _peft_lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """{base module name (peftsum's naming): peft LoRA layer}."""
    base = peft_model.base_model.model
    return {n: m for n, m in base.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


@torch.no_grad()
def _randomize_b(loras: dict[str, LoRA], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in loras.values():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.2)


@torch.no_grad()
def _randomize_peft_b(peft_model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, layer in sorted(_peft_lora_layers(peft_model).items()):
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def _padded_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask (peftsum's layout)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


TEXTS = ["the council said on monday that new rules for city buses will start next year",
         "drivers asked for cheaper fares"]


def _masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@torch.no_grad()
def _peftsum_logits(adapted, ids, mask) -> torch.Tensor:
    embeds, m, pos, _ = model_inputs(adapted, ids, mask)
    return adapted.model(inputs_embeds=embeds, attention_mask=m, position_ids=pos, use_cache=False).logits


def _report(what: str, kind: str, value: float) -> None:
    print(f"\n[peft parity] {what} ({kind}): max abs diff = {value:.3e}")


# ---------------------------------------------------------------- 1. LoRA forward parity

@pytest.mark.parametrize("kind", KINDS)
def test_lora_forward_matches_peft(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    base_copy = copy.deepcopy(base)
    cfg = _run_config()
    targets = lora.chosen_targets(base, cfg.lora.targets)
    ids, mask = _padded_batch(tokenizer, TEXTS)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits

    adapted = adapt(base, tokenizer, "lora", cfg)
    ours = _peftsum_loras(adapted.model)
    _randomize_b(ours)

    peft_model = peft.get_peft_model(base_copy, _peft_lora_config(kind, targets)).eval()
    theirs = _peft_lora_layers(peft_model)
    assert sorted(theirs) == sorted(ours)
    with torch.no_grad():
        for name, layer in theirs.items():
            assert layer.lora_A["default"].weight.shape == ours[name].lora_A.shape
            assert layer.lora_B["default"].weight.shape == ours[name].lora_B.shape
            assert layer.scaling["default"] == pytest.approx(ours[name].scale)
            layer.lora_A["default"].weight.copy_(ours[name].lora_A)
            layer.lora_B["default"].weight.copy_(ours[name].lora_B)

    with torch.no_grad():
        a = adapted.model(input_ids=ids, attention_mask=mask).logits
        b = peft_model(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape
    diff = _masked_max_diff(a, b, mask)
    _report("LoRA forward, padded batch (real tokens)", kind, diff)
    assert diff < 1e-5
    # The comparison is not vacuous: the update moves the logits well away from the base model's.
    assert _masked_max_diff(a, base_logits, mask) > 1e-2


# ---------------------------------------------------------------- 2. peftsum file -> peft

@pytest.mark.parametrize("kind", KINDS)
def test_lora_saved_by_peftsum_loads_in_peft(kind, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    fresh = copy.deepcopy(base)
    cfg = _run_config()
    adapted = adapt(base, tokenizer, "lora", cfg)
    ours = _peftsum_loras(adapted.model)
    _randomize_b(ours, seed=5)
    folder = tmp_path / "adapter"
    adapters.save(adapted, folder, f"tiny-{kind}", cfg)

    config = peft.PeftConfig.from_pretrained(str(folder))
    assert isinstance(config, peft.LoraConfig)
    assert config.r == RANK and config.lora_alpha == ALPHA and config.lora_dropout == 0.0
    assert config.fan_in_fan_out == (kind == "gpt2")
    assert sorted(config.target_modules) == sorted(lora.chosen_targets(adapted.model, None))

    peft_model = load_in_peft(fresh, folder)
    # Loading once more through load_adapter exposes the key check directly.
    result = peft_model.load_adapter(str(folder), adapter_name="again")
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert result.unexpected_keys == []
    peft_model.set_adapter("default")

    theirs = _peft_lora_layers(peft_model)
    assert sorted(theirs) == sorted(ours)
    for name, layer in theirs.items():
        assert torch.equal(layer.lora_A["default"].weight, ours[name].lora_A)
        assert torch.equal(layer.lora_B["default"].weight, ours[name].lora_B)

    ids, mask = _padded_batch(tokenizer, TEXTS)
    with torch.no_grad():
        a = adapted.model(input_ids=ids, attention_mask=mask).logits
        b = peft_model(input_ids=ids, attention_mask=mask).logits
    diff = _masked_max_diff(a, b, mask)
    _report("LoRA peftsum file -> peft", kind, diff)
    assert diff < 1e-4


# ---------------------------------------------------------------- 3. peft file -> peftsum

@pytest.mark.parametrize("subset", [False, True], ids=["default-targets", "subset-targets"])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_saved_by_peft_loads_in_peftsum(kind, subset, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    peft_base = copy.deepcopy(base)
    targets = SUBSET_TARGETS[kind] if subset else lora.chosen_targets(base, None)

    torch.manual_seed(11)  # peft's kaiming init of A
    peft_model = peft.get_peft_model(peft_base, _peft_lora_config(kind, targets)).eval()
    _randomize_peft_b(peft_model)
    folder = tmp_path / "peft-adapter"
    peft_model.save_pretrained(str(folder))
    saved = json.loads((folder / adapters.ADAPTER_CONFIG).read_text())
    assert saved["peft_type"] == "LORA"

    cfg = _run_config(targets=SUBSET_TARGETS[kind] if subset else None)
    adapted = adapt(base, tokenizer, "lora", cfg)
    ours = _peftsum_loras(adapted.model)
    theirs = _peft_lora_layers(peft_model)
    assert sorted(ours) == sorted(theirs)
    adapters.load_into(adapted, folder)
    for name, layer in theirs.items():
        assert torch.equal(ours[name].lora_A, layer.lora_A["default"].weight)
        assert torch.equal(ours[name].lora_B, layer.lora_B["default"].weight)

    ids, mask = _padded_batch(tokenizer, TEXTS)
    with torch.no_grad():
        a = adapted.model(input_ids=ids, attention_mask=mask).logits
        b = peft_model(input_ids=ids, attention_mask=mask).logits
    diff = _masked_max_diff(a, b, mask)
    _report(f"LoRA peft file -> peftsum, {'subset' if subset else 'default'} targets", kind, diff)
    assert diff < 1e-4


# ---------------------------------------------------------------- 4. merge / unmerge

@pytest.mark.parametrize("kind", KINDS)
def test_lora_merge_and_unmerge(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    cfg = _run_config()
    adapted = adapt(base, tokenizer, "lora", cfg)
    ours = _peftsum_loras(adapted.model)
    _randomize_b(ours, seed=7)
    original = {n: adapted.model.get_submodule(n).weight.detach().clone() for n in ours}

    ids, mask = _padded_batch(tokenizer, TEXTS)
    with torch.no_grad():
        hooked = adapted.model(input_ids=ids, attention_mask=mask).logits
        lora.merge(adapted.model)
        assert all(m.merged for m in ours.values())
        assert any(not torch.equal(adapted.model.get_submodule(n).weight, w) for n, w in original.items())
        merged = adapted.model(input_ids=ids, attention_mask=mask).logits
        with adapted.for_generation():  # merge is idempotent: nothing is added twice
            merged_again = adapted.model(input_ids=ids, attention_mask=mask).logits
        lora.unmerge(adapted.model)
        assert not any(m.merged for m in ours.values())
        unmerged = adapted.model(input_ids=ids, attention_mask=mask).logits

    merge_diff = _masked_max_diff(hooked, merged, mask)
    weight_diff = max((adapted.model.get_submodule(n).weight - w).abs().max().item() for n, w in original.items())
    rerun_diff = _masked_max_diff(hooked, unmerged, mask)
    _report("LoRA merged vs hooked logits", kind, merge_diff)
    _report("LoRA unmerge vs original weights", kind, weight_diff)
    _report("LoRA unmerged vs hooked logits", kind, rerun_diff)
    assert merge_diff < 1e-5
    assert torch.equal(merged, merged_again)
    assert weight_diff < 1e-6
    assert rerun_diff < 1e-5


# ---------------------------------------------------------------- 5. soft prompt parity (unpadded)

def _peft_prompt_model(base):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="RANDOM")
    return peft.get_peft_model(base, config).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_soft_prompt_matches_peft_unpadded(kind, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    peft_base = copy.deepcopy(base)
    adapted = adapt(base, tokenizer, "prompt", _run_config(init="random"))
    assert adapted.virtual_tokens == N_VIRTUAL

    peft_model = _peft_prompt_model(peft_base)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(adapted.prompt_encoder.embeddings)

    # Equal-length rows: no padding at all.
    ids = torch.stack([torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][:6]) for t in TEXTS])
    assert ids.shape == (2, 6)
    mask = torch.ones_like(ids)
    a = _peftsum_logits(adapted, ids, mask)
    with torch.no_grad():
        b = peft_model(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape == (2, N_VIRTUAL + 6, len(tokenizer))  # both include the virtual positions
    diff = (a[:, N_VIRTUAL:] - b[:, N_VIRTUAL:]).abs().max().item()
    _report("soft prompt vs peft prompt tuning, real tokens", kind, diff)
    assert diff < 1e-5
    # Not vacuous: the prompt changes the real tokens' logits relative to the base model.
    with torch.no_grad():
        plain = tiny_model(kind, tokenizer, seed=0)(input_ids=ids, attention_mask=mask).logits
    assert (a[:, N_VIRTUAL:] - plain).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_text_init_matches_peft(kind, tokenizer, tmp_path):
    """peft's TEXT init embeds the text with the model's embedding module, as peftsum does: for Gemma that output
    is the table row times sqrt(hidden size), not the raw row."""
    base = tiny_model(kind, tokenizer, seed=0)
    peft_base = copy.deepcopy(base)
    cfg = _run_config(init="text")
    adapted = adapt(base, tokenizer, "prompt", cfg)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=cfg.prompt.init_text,
                                     tokenizer_name_or_path=str(tmp_path / "tokenizer"))
    theirs = peft.get_peft_model(peft_base, config).prompt_encoder["default"].embedding.weight
    diff = (adapted.prompt_encoder.embeddings - theirs).abs().max().item()
    _report("soft prompt text init vs peft TEXT init", kind, diff)
    assert diff < 1e-6


@pytest.mark.parametrize("init", ["random", "text"])
@pytest.mark.parametrize("kind", KINDS)
def test_soft_prompt_saved_by_peftsum_loads_in_peft(kind, init, tokenizer, tmp_path):
    base = tiny_model(kind, tokenizer, seed=0)
    fresh = copy.deepcopy(base)
    cfg = _run_config(init=init)
    adapted = adapt(base, tokenizer, "prompt", cfg)
    with torch.no_grad():  # as if trained: move away from the initial values
        g = torch.Generator().manual_seed(4)
        adapted.prompt_encoder.embeddings.add_(torch.randn(adapted.prompt_encoder.embeddings.shape, generator=g) * 0.05)
    folder = tmp_path / "prompt-adapter"
    adapters.save(adapted, folder, f"tiny-{kind}", cfg)

    config = peft.PeftConfig.from_pretrained(str(folder))
    assert isinstance(config, peft.PromptTuningConfig)
    assert config.num_virtual_tokens == N_VIRTUAL

    peft_model = load_in_peft(fresh, folder)
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, adapted.prompt_encoder.embeddings)

    ids = torch.tensor([tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    a = _peftsum_logits(adapted, ids, mask)
    with torch.no_grad():
        b = peft_model(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape
    diff = (a[:, N_VIRTUAL:] - b[:, N_VIRTUAL:]).abs().max().item()
    _report(f"soft prompt ({init} init) peftsum file -> peft", kind, diff)
    assert diff < 1e-5


# ---------------------------------------------------------------- 6. placement: padding does not change results

@pytest.mark.parametrize("method", ["prompt", "lora"])
@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_does_not_change_logits(kind, method, tokenizer):
    base = tiny_model(kind, tokenizer, seed=0)
    peft_base = copy.deepcopy(base) if method == "prompt" else None
    adapted = adapt(base, tokenizer, method, _run_config(init="random"))
    if method == "lora":
        _randomize_b(_peftsum_loras(adapted.model), seed=9)
    n = adapted.virtual_tokens

    ids, mask = _padded_batch(tokenizer, TEXTS)
    lengths = mask.sum(1).tolist()
    assert lengths[0] > lengths[1]  # the second row is the shorter, left-padded one
    batch_logits = _peftsum_logits(adapted, ids, mask)
    assert batch_logits.shape[1] == ids.shape[1] + n

    diffs = []
    for row, length in enumerate(lengths):
        alone_ids = ids[row:row + 1, -length:]
        alone = _peftsum_logits(adapted, alone_ids, torch.ones_like(alone_ids))
        # In the batch this row's real tokens are its last `length` slots (virtual tokens sit just before them).
        diffs.append((batch_logits[row, -length:] - alone[0, -length:]).abs().max().item())
        if method == "prompt":  # and its virtual tokens too
            diffs.append((batch_logits[row, -length - n:-length] - alone[0, :n]).abs().max().item())
    diff = max(diffs)
    _report(f"{method}: left-padded batch vs each row alone", kind, diff)
    assert diff < 1e-5

    if method == "prompt":
        # For contrast (printed, not asserted): peft puts the virtual tokens before the padding, so the shorter
        # row's logits change with padding.
        peft_model = _peft_prompt_model(peft_base)
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(adapted.prompt_encoder.embeddings)
            short = 1
            length = lengths[short]
            batched = peft_model(input_ids=ids, attention_mask=mask).logits[short, -length:]
            alone_ids = ids[short:short + 1, -length:]
            alone = peft_model(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids)).logits[0, -length:]
        _report("peft (for contrast): left-padded shorter row vs alone", kind, (batched - alone).abs().max().item())
