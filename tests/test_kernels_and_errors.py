"""The kernel seam (merge, linear state, accounting) and the errors bad input gets."""

import math

import pytest
import torch
from tiny import random_prompt, tiny_model

import ntkkv
from ntkkv.attention import reference_attention
from ntkkv.kernels import ExactState, LinearKernel, LinearState, merge_attention


def test_merge_of_two_halves_is_attention_over_the_whole():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=generator), torch.randn(1, 2, 20, 8, generator=generator),
               torch.randn(1, 2, 20, 8, generator=generator))
    scale = 8**-0.5
    full = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    lse_a, out_a = reference_attention(q, k[:, :, :7], v[:, :, :7], torch.zeros(1, 2, 3, 7), scale)
    state = ExactState()
    state.fold(k[:, :, 7:], v[:, :, 7:], torch.ones(1, 2, 13))
    log_mass, mean = state.read(q, scale)
    torch.testing.assert_close(merge_attention(lse_a, out_a, log_mass, mean), full, rtol=1e-5, atol=1e-5)


def test_merge_by_hand():
    # kept part: total weight 3, mean 1.0; state: total weight 1, mean 5.0 -> (3*1 + 1*5) / 4 = 2
    merged = merge_attention(torch.tensor([math.log(3.0)]), torch.tensor([[1.0]]),
                             torch.tensor([0.0]), torch.tensor([[5.0]]))
    assert merged.item() == pytest.approx(2.0)
    empty = merge_attention(torch.tensor([0.3]), torch.tensor([[1.5]]), torch.tensor([-math.inf]), torch.tensor([[9.0]]))
    assert empty.item() == 1.5


def elu_features(x, scaling):
    return torch.nn.functional.elu(x * math.sqrt(scaling)) + 1


def test_linear_state_reads_phi_q_s_over_phi_q_z():
    generator = torch.Generator().manual_seed(1)
    k, v, q = torch.randn(1, 1, 5, 4, generator=generator), torch.randn(1, 1, 5, 4, generator=generator), torch.randn(1, 1, 2, 4, generator=generator)
    weights = torch.tensor([[[1.0, 0.0, 1.0, 1.0, 0.0]]])
    state = LinearState(elu_features)
    state.fold(k[:, :, :2], v[:, :, :2], weights[:, :, :2])
    state.fold(k[:, :, 2:], v[:, :, 2:], weights[:, :, 2:])
    log_mass, mean = state.read(q, 0.25)
    for i in range(2):
        phi_q = elu_features(q[0, 0, i], 0.25)
        w = [float(phi_q @ elu_features(k[0, 0, j], 1.0)) * float(weights[0, 0, j]) for j in range(5)]
        expected_mean = sum(w[j] * v[0, 0, j] for j in range(5)) / sum(w)
        assert log_mass[0, 0, i].item() == pytest.approx(math.log(sum(w)), rel=1e-5)
        torch.testing.assert_close(mean[0, 0, i], expected_mean, rtol=1e-5, atol=1e-5)
    assert state.size_in_tokens() == (4 * 4 + 4) / 8  # F·d + F numbers, a token is 2·d


def test_kernel_with_empty_state_equals_eviction():
    model = tiny_model()
    prompt = random_prompt(40)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64):
        evicting = ntkkv.generate(model, prompt, max_new_tokens=6).new_tokens
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, kernel=LinearKernel(elu_features)):
        result = ntkkv.generate(model, prompt, max_new_tokens=6)
    assert result.new_tokens == evicting
    assert all(layer.state is not None and float(layer.state.normaliser.abs().sum()) == 0
               for layer in result.cache.layers)


def test_a_linear_state_holds_the_evicted_tokens_and_is_read_at_decode():
    model = tiny_model()
    prompt = random_prompt(120)
    options = dict(max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=16):
        evicting = ntkkv.generate(model, prompt, **options)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=25, kernel=LinearKernel(elu_features)):
        merged = ntkkv.generate(model, prompt, **options)  # 16 exact tokens + 8.5 of state
    assert all(layer.state.size_in_tokens() == (16 * 16 + 16) / 32 for layer in merged.cache.layers)
    assert all(float(layer.state.normaliser.sum()) > 0 for layer in merged.cache.layers)
    # the prefill's own logits come from full attention in both; the decode steps read the state
    assert torch.equal(merged.output.logits[0], evicting.output.logits[0])
    assert not torch.allclose(merged.output.logits[1], evicting.output.logits[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="snapKV2"), "unknown method 'snapKV2'; choose one of: fullkv, h2o, pyramidkv, snapkv, streamingllm"),
    (dict(method="snapkv", max_capacity_prompt=8, window_size=8), "larger than window_size=8, got 8"),
    (dict(method="snapkv", window_size=0), "window_size must be a positive integer, got 0"),
    (dict(method="snapkv", kernel_size=-1), "kernel_size must be a positive integer, got -1"),
    (dict(method="snapkv", pooling="sumpool"), "unknown pooling 'sumpool'; choose one of: avgpool, maxpool"),
    (dict(method="h2o", gqa_reduce="median"), "unknown gqa_reduce 'median'; choose one of: mean, max"),
    (dict(method="pyramidkv", max_capacity_prompt=[64, 64]), "got 2 per-layer budgets for a model of 4 layers"),
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
    with pytest.raises(ValueError, match="unknown attn_implementation 'flex_attention'; choose one of: sdpa, eager, flash_attention_2"):
        with ntkkv.compress(model, "snapkv"):
            pass
    model.config._attn_implementation = "flash_attention_2"
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="'flash_attention_2' needs the flash-attn package, which is not installed"):
        with ntkkv.compress(model, "snapkv"):
            pass


def test_nested_compress_is_refused():
    model = tiny_model()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32):
        with pytest.raises(RuntimeError, match="already patched"):
            with ntkkv.compress(model, "h2o", max_capacity_prompt=32):
                pass
