"""The KV cache reaches every layer under either keyword and comes back out, on the installed transformers.

The suite runs on the newest and the oldest transformers ``pyproject.toml`` allows (``make test-latest``,
``make test-oldest``), which name the cache differently: these tests cover both paths there.
"""

import logging
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import ALL_CACHE_NAMES

from unimoe import UniMoeForCausalLM, UniMoeTextConfig
from unimoe.compat import CACHE_NAME, pop_cache
from unimoe.modeling.modeling_unimoe_text import UniMoeCausalLMOutput, UniMoeModelOutput
from unimoe.presets import build_tiny

KEYWORDS = ["cache", "past_key_values"]


def tiny_lm(seed: int = 0) -> UniMoeForCausalLM:
    torch.manual_seed(seed)
    config = UniMoeTextConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        pad_token_id=0,
    )
    return UniMoeForCausalLM(config).eval()


@pytest.mark.parametrize("keyword", KEYWORDS)
@pytest.mark.parametrize("output_class", [UniMoeModelOutput, UniMoeCausalLMOutput])
def test_output_keeps_the_cache_under_either_keyword(output_class, keyword):
    cache = DynamicCache()
    out = output_class(**{keyword: cache})
    assert out.cache is cache
    assert out[CACHE_NAME] is cache  # where generate looks for it
    assert CACHE_NAME in ALL_CACHE_NAMES


def test_pop_cache_takes_either_name_and_refuses_two():
    a, b = DynamicCache(), DynamicCache()
    kwargs = {"past_key_values": a, "other": 1}
    assert pop_cache(None, kwargs) is a and kwargs == {"other": 1}
    assert pop_cache(b, {}) is b
    assert pop_cache(a, {"past_key_values": a}) is a
    with pytest.raises(ValueError, match="not both"):
        pop_cache(a, {"past_key_values": b})


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_decoder_layer_writes_the_cache_under_either_keyword(keyword):
    model = tiny_lm()
    text = model.model
    hidden = torch.randn(2, 5, 64)
    position_ids = torch.arange(5).unsqueeze(0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        text.layers[0](
            hidden,
            position_ids=position_ids,
            position_embeddings=text.rotary_emb(hidden, position_ids=position_ids),
            **{keyword: cache},
        )
    assert cache.get_seq_length(0) == 5


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_incremental_decoding_equals_full_forward(keyword):
    """A step fed only the new token must see the prefix through the cache: the logits then match the
    full sequence's. A cache lost in ``**kwargs`` would leave the step with no prefix at all."""
    model = tiny_lm()
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        assert prefix.cache.get_seq_length() == 8
        step = model(ids[:, -1:], use_cache=True, **{keyword: prefix.cache})
        fresh = model(ids[:, -1:], use_cache=False).logits[:, -1]
    assert step.cache is prefix.cache and step.cache.get_seq_length() == 9
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)
    assert (fresh - full).abs().max() > 1e-3  # the check above can fail


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_multimodal_model_passes_the_cache_through(keyword):
    model, _ = build_tiny(seed=0)
    model.eval()
    ids = torch.randint(3, 200, (1, 7))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], use_cache=True, **{keyword: prefix.cache})
    assert step.cache is prefix.cache and step.cache.get_seq_length() == 7
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_no_cache_deprecation_warnings_from_our_calls(caplog):
    """transformers 5.24 warns (once per process, through its logger or ``warnings``) when a cache is
    passed or read under its old name; forward, incremental decoding and generate must not do so."""
    logging.Logger.warning_once.cache_clear()  # transformers' once-only log cache
    model = tiny_lm()
    ids = torch.randint(3, 96, (2, 6))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(ids, use_cache=True)
            model(ids[:, -1:], use_cache=True, cache=out.cache)
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "past_key_values" in m or "deprecated" in m.lower()], messages
