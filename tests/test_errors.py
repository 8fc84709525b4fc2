"""Bad arguments to compress: each names the bad value and the allowed ones, and leaves the model as it was."""

import pytest

import ntkkv
from tiny import tiny_model


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="snapKV2"), "unknown method 'snapKV2'; choose one of: " + ", ".join(sorted(ntkkv.METHODS))),
    (dict(method="snapkv", max_capacity_prompt=8, window_size=8), "larger than window_size=8 (or a list of one per "
                                                                  "layer), got 8"),
    (dict(method="snapkv", max_capacity_prompt=64.5), "max_capacity_prompt must be an integer larger than "
                                                      "window_size=8 (or a list of one per layer), got 64.5; for a "
                                                      "share of the prompt use max_capacity_prompt_ratio"),
    (dict(method="snapkv", max_capacity_prompt=-3), "max_capacity_prompt must be an integer larger than window_size=8"),
    (dict(method="snapkv", max_capacity_prompt_ratio=1.5), "max_capacity_prompt_ratio must be a share of the prompt "
                                                           "in (0, 1], got 1.5"),
    (dict(method="streamingllm", max_capacity_prompt=5), "max_capacity_prompt must be an integer larger than 5 for "
                                                         "streamingllm"),
    (dict(method="fullkv", summary="merge"), "summary 'merge' needs a compressing method"),
    (dict(method="snapkv", state_budget=0.5), "state_budget applies to a summary named by a string; no summary"),
    (dict(method="snapkv", window_size=0), "window_size must be a positive integer, got 0"),
    (dict(method="snapkv", kernel_size=-1), "kernel_size must be a positive integer, got -1"),
    (dict(method="snapkv", pooling="sumpool"), "unknown pooling 'sumpool'; choose one of: avgpool, maxpool"),
    (dict(method="h2o", gqa_reduce="median"), "unknown gqa_reduce 'median'; choose one of: mean, max"),
    (dict(method="pyramidkv", max_capacity_prompt=[64, 64]), "max_capacity_prompt has 2 per-layer budgets; this model "
                                                             "has 4 layers"),
])
def test_bad_arguments_are_named(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError) as error:
        with ntkkv.compress(model, **kwargs):
            pass
    assert message in str(error.value)
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)


def test_unsupported_model_class_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        with ntkkv.compress(model, "snapkv", max_capacity_prompt=64):
            pass


def test_unknown_or_missing_backend_is_refused(monkeypatch):
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    message = "unknown attn_implementation 'flex_attention'; choose one of: sdpa, eager, flash_attention_2"
    with pytest.raises(ValueError, match=message):
        with ntkkv.compress(model, "snapkv"):
            pass
    model.config._attn_implementation = "flash_attention_2"
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="'flash_attention_2' needs the flash-attn package, which is not installed"):
        with ntkkv.compress(model, "snapkv"):
            pass


def test_nested_compress_is_refused():
    model = tiny_model()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32):
        with pytest.raises(RuntimeError, match="already patched"):
            with ntkkv.compress(model, "h2o", max_capacity_prompt=32):
                pass
