"""Head-wise budgets (AdaKV, Ada-PyramidKV, HeadKV): the allocations against slow references written from
the papers' definitions, the layer's (or model's) total kept at the budget, and the ragged cache (heads
packed without padding) against a padded-and-masked one, dynamic and static, batched and alone."""

import json
import math
from pathlib import Path

import pytest
import torch

import ntkkv
from ntkkv.cache import CompressedCache, RaggedPrefix, kv_lengths
from ntkkv.policies import AdaKV, HeadKV, SelectionInputs, SnapKV
from ntkkv.policies.adakv import adaptive_choice
from ntkkv.policies.base import head_rows
from ntkkv.policies.headkv import head_budgets
from tiny import batch_with_padding, random_prompt, tiny_head_scores, tiny_model

OPTIONS = dict(max_new_tokens=7, min_new_tokens=7, output_logits=True, return_dict_in_generate=True)


def slow_adaptive_choice(scores, per_head, alpha):
    """AdaKV's allocation from its definition, one sample at a time, in python: each head's
    ceil(alpha · per_head) best tokens, then the best of the rest over all heads until heads · per_head."""
    batch, heads, m = scores.shape
    per_head = min(per_head, m)
    floor = min(math.ceil(alpha * per_head), per_head)
    chosen = torch.zeros(batch, heads, m, dtype=torch.bool)
    for b in range(batch):
        picked = set()
        for h in range(heads):
            ranked = sorted(range(m), key=lambda p: (-scores[b, h, p].item(), p))
            picked.update((h, p) for p in ranked[:floor])
        rest = sorted(((h, p) for h in range(heads) for p in range(m) if (h, p) not in picked),
                      key=lambda hp: (-scores[b, hp[0], hp[1]].item(), hp[0], hp[1]))
        picked.update(rest[: heads * per_head - len(picked)])
        for h, p in picked:
            chosen[b, h, p] = True
    return chosen


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_adakv_allocation_equals_the_definition(alpha):
    generator = torch.Generator().manual_seed(0)
    # a concentrated head, a spread one, and rounded scores so that ties happen
    scores = torch.rand(2, 3, 40, generator=generator)
    scores[:, 0] = scores[:, 0] ** 8
    scores = (scores * 20).round() / 20
    chosen = adaptive_choice(scores, 10, alpha)
    assert torch.equal(chosen, slow_adaptive_choice(scores, 10, alpha))
    assert (chosen.sum(dim=(1, 2)) == 30).all()  # the layer keeps heads × per_head
    assert (chosen.sum(dim=-1) >= math.ceil(alpha * 10)).all()  # the safeguard
    if alpha == 1.0:
        assert (chosen.sum(dim=-1) == 10).all()  # all safeguard: SnapKV's even split


def test_the_heads_get_what_their_scores_ask_for():
    """A head whose attention sits on two tokens keeps little; the head whose attention is spread keeps more."""
    scores = torch.full((1, 2, 50), 1e-3)
    scores[0, 0, [5, 30]] = 1.0
    scores[0, 1] = torch.linspace(0.1, 0.2, 50)
    chosen = adaptive_choice(scores, 10, 0.2)
    assert chosen[0, 0].sum() == 2 and chosen[0, 1].sum() == 18
    assert chosen[0, 0, 5] and chosen[0, 0, 30]


def test_head_rows_pad_each_head_in_front_with_its_first_token():
    chosen = torch.tensor([[[True, False, True, False], [False, False, False, True]]])
    kept, padded = head_rows(chosen, window=2)  # n = 6: tokens 4 and 5 are the window
    assert kept.tolist() == [[[0, 2, 4, 5], [3, 3, 4, 5]]]
    assert padded.tolist() == [[[False, False, False, False], [True, False, False, False]]]


def slow_head_budgets(scores, kv_heads, per_head, beta):
    """HeadKV's rule in python floats: each query head gets per_head - floor(per_head / beta) plus its share
    (score / total) of floor(per_head / beta) · layers · heads; a KV head the mean of its query heads'."""
    layers, heads = len(scores), len(scores[0])
    total = sum(map(sum, scores))
    pool = math.floor(per_head / beta) * layers * heads
    base = per_head - math.floor(per_head / beta)
    group = heads // kv_heads
    return [[sum(base + scores[layer][h] / total * pool for h in range(k * group, (k + 1) * group)) / group
             for k in range(kv_heads)] for layer in range(layers)]


@pytest.mark.parametrize("beta", [1.01, 1.5, 4.0])
def test_headkv_budgets_equal_the_definition_and_keep_the_models_total(beta):
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 6, generator=generator, dtype=torch.float64) ** 4
    budgets = head_budgets(scores, 2, 24, beta)
    exact = torch.tensor(slow_head_budgets(scores.tolist(), 2, 24, beta), dtype=torch.float64)
    assert int(budgets.sum()) == 4 * 2 * 24
    assert ((budgets - exact).abs() < 1).all()  # whole tokens, rounded by largest remainders
    assert (budgets >= torch.floor(exact)).all()


def head_scores_file(path, layers=4):
    return tiny_head_scores(path, layers=layers)


class PaddedAdaKV(AdaKV):
    """AdaKV's choice held padded-and-masked: every head padded to the largest with bias -inf."""

    head_wise = False

    def select(self, inputs, layer_idx, exact_tokens):
        return self.select_heads(inputs, layer_idx, exact_tokens)[0]

    def select_heads(self, inputs, layer_idx, exact_tokens):
        return AdaKV.select_heads(self, inputs, layer_idx, exact_tokens)


def assert_same_logits(ours, theirs):
    assert ours.new_tokens == theirs.new_tokens
    for step, (a, b) in enumerate(zip(ours.output.logits, theirs.output.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_a_ragged_cache_gives_the_padded_and_masked_cache_outputs(decode):
    model = tiny_model()
    prompt, mask = batch_with_padding()
    with ntkkv.compress(model, PaddedAdaKV(24, alpha_safeguard=0.1)):
        padded = ntkkv.generate(model, prompt, mask, decode="dynamic", **OPTIONS)
    with ntkkv.compress(model, AdaKV(24, alpha_safeguard=0.1)):
        ragged = ntkkv.generate(model, prompt, mask, decode=decode, **OPTIONS)
    assert_same_logits(ragged, padded)


@pytest.mark.parametrize("method", ["adakv", "ada_pyramidkv", "headkv"])
def test_static_decode_equals_dynamic_and_a_sample_in_a_batch_as_alone(method, tmp_path):
    model = tiny_model("qwen2")
    prompt, mask = batch_with_padding()
    options = {"head_scores": head_scores_file(tmp_path / "scores.json")} if method == "headkv" else {}
    with ntkkv.compress(model, method, max_capacity_prompt=24, **options):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", **OPTIONS)
        static = ntkkv.generate(model, prompt, mask, decode="static", **OPTIONS)
        assert_same_logits(static, dynamic)
        assert static.kv_kept == dynamic.kv_kept
        for row in range(3):
            alone = ntkkv.generate(model, prompt[row:row + 1, mask[row].bool()], decode="static", **OPTIONS)
            assert alone.new_tokens[0] == static.new_tokens[row]
            assert alone.kv_kept[0] == static.kv_kept[row]
            for ours, theirs in zip(alone.output.logits, static.output.logits):
                torch.testing.assert_close(ours[0], theirs[row], rtol=0, atol=1e-5)


def test_the_question_read_after_a_head_wise_compression_and_prefill_in_pieces():
    model = tiny_model("mistral")
    prompt, mask = batch_with_padding()
    with ntkkv.compress(model, "adakv", max_capacity_prompt=24):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", prefill_length=80, **OPTIONS)
        for pieces in (None, 1):
            static = ntkkv.generate(model, prompt, mask, decode="static", prefill_length=80,
                                    prefill_batch_size=pieces, **OPTIONS)
            assert_same_logits(static, dynamic)


def test_the_heads_hold_the_budget_in_total_not_the_largest_head_times_the_heads():
    model = tiny_model()
    prompt = random_prompt(120, seed=5)
    cache = CompressedCache(config=model.config)
    with ntkkv.compress(model, AdaKV(32, alpha_safeguard=0.0)):
        model(prompt, cache=cache, use_cache=True)
    uneven = False
    for layer in cache.layers:
        prefix = layer.ragged
        assert isinstance(prefix, RaggedPrefix)
        assert prefix.keys.shape[1] == 2 * 32 and int(prefix.counts.sum()) == 2 * 32  # kv_heads × budget
        uneven |= prefix.most > 32
        # the memory held is the packed run: nothing keeps the compressor's padded rows alive
        held = sum(t.untyped_storage().nbytes() for t in (layer.keys, layer.values, layer.bias,
                                                          prefix.keys, prefix.values, prefix.bias))
        packed = (2 * 32 + 1) * (2 * prefix.keys.shape[-1] * prefix.keys.element_size() + 4)
        assert held == packed
    assert uneven  # some head kept more than the even share: padding would have cost more
    assert kv_lengths(cache) == [32] * 4 and kv_lengths(cache, per_sample=True) == [[32] * 4]
    with ntkkv.compress(model, SnapKV(32)):
        snap = ntkkv.generate(model, prompt, decode="static", max_new_tokens=3)
    with ntkkv.compress(model, AdaKV(32)):
        ada = ntkkv.generate(model, prompt, decode="static", max_new_tokens=3)
    assert ada.kv_kept == snap.kv_kept


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_adakv_with_the_whole_share_as_safeguard_is_snapkv(decode):
    """alpha_safeguard 1 gives every head its even share: SnapKV's choice, held ragged instead of uniform."""
    model = tiny_model()
    prompt, mask = batch_with_padding()
    with ntkkv.compress(model, SnapKV(24)):
        snap = ntkkv.generate(model, prompt, mask, decode="dynamic", **OPTIONS)
    with ntkkv.compress(model, AdaKV(24, alpha_safeguard=1.0)):
        ada = ntkkv.generate(model, prompt, mask, decode=decode, **OPTIONS)
    assert_same_logits(ada, snap)


def test_with_a_budget_past_the_prompt_head_wise_methods_equal_the_unpatched_model(tmp_path):
    model = tiny_model()
    prompt = random_prompt(40, seed=6)
    reference = model.generate(prompt, max_new_tokens=6, do_sample=False)
    scores = head_scores_file(tmp_path / "scores.json")
    for method, options in (("adakv", {}), ("headkv", {"head_scores": scores})):
        with ntkkv.compress(model, method, max_capacity_prompt=64, **options):
            ours = ntkkv.generate(model, prompt, decode="static", max_new_tokens=6)
        assert torch.equal(ours.sequences, reference)


def test_bad_head_wise_settings_are_one_line_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="alpha_safeguard must be a share"):
        AdaKV(32, alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="head_beta must be a number ≥ 1"):
        HeadKV(32, head_scores=head_scores_file(tmp_path / "a.json"), head_beta=0.5)
    with pytest.raises(ValueError, match="no such file"):
        HeadKV(32, head_scores=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a head-score file"):
        HeadKV(32, head_scores=str(tmp_path / "bad.json"))
    zeros = json.loads(Path(head_scores_file(tmp_path / "zeros.json")).read_text())
    (tmp_path / "zeros.json").write_text(json.dumps({**zeros, "scores": [[0.0] * 4] * 4}))
    with pytest.raises(ValueError, match="every score is 0"):
        HeadKV(32, head_scores=str(tmp_path / "zeros.json"))
    wrong = head_scores_file(tmp_path / "wrong.json", layers=3)
    with pytest.raises(ValueError, match="is for a model of 3 layers and 2 KV heads; this one has 4 and 2"):
        with ntkkv.compress(model, "headkv", max_capacity_prompt=32, head_scores=wrong):
            pass
    with pytest.raises(ValueError, match="summary 'merge' makes merged slots or a state"):
        with ntkkv.compress(model, "adakv", max_capacity_prompt=32, summary="merge"):
            pass
    with pytest.raises(ValueError, match="option alpha_safeguard does not apply to method 'snapkv'"):
        with ntkkv.compress(model, "snapkv", max_capacity_prompt=32, alpha_safeguard=0.3):
            pass


def test_the_window_stays_in_every_head():
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 30, 16, generator=generator)
    queries = torch.randn(1, 2, 2, 30, 16, generator=generator) * 3
    inputs = SelectionInputs(queries, keys, keys, torch.ones(1, 30, dtype=torch.bool), 0.25)
    kept, padded = AdaKV(12, window_size=4, alpha_safeguard=0.0).select_heads(inputs, 0, 12)
    for head in range(2):
        real = kept[0, head][~padded[0, head]].tolist()
        assert real == sorted(set(real)) and real[-4:] == [26, 27, 28, 29]
    assert int((~padded).sum()) == 24
