"""The static decode path (fixed-capacity cache, in-place writes) against the dynamic one, which is
model.generate over the compressed cache: the same tokens and logits for every method and summary,
with and without the ratchet, batched with left padding and alone; and the cache's own rules."""

import math

import pytest
import torch

import ntkkv
from ntkkv.cache import CompressedCache, StaticCache
from ntkkv.generation import StaticDecoder, _prefill_rows
from ntkkv.summaries import SUMMARIES, ClusterSummary, Exact, Learned, LearnedFeatures, build_summary
from tiny import batch_with_padding, random_prompt, tiny_model

OPTIONS = dict(max_new_tokens=9, min_new_tokens=9, output_logits=True, return_dict_in_generate=True)


def learned_map(seed=0):
    """A small learned map for the tiny model (4 layers, 2 KV heads, head_dim 16), moved off its init."""
    features = LearnedFeatures(4, 2, 16, 4, seed=seed, init="merge")
    with torch.no_grad():
        features.query_weight.add_(0.05 * torch.randn(features.query_weight.shape,
                                                      generator=torch.Generator().manual_seed(seed)))
    return features.requires_grad_(False)


def summary_options(name):
    if name == "none":
        return {}
    if name == "exact":
        return {"summary": Exact()}
    if name == "learned":
        return {"summary": Learned(0.5, features=learned_map())}
    if not isinstance(build_summary(name), ClusterSummary):  # refits the kept slots: no state share
        return {"summary": name}
    return {"summary": name, "state_budget": 32 if name in ("taylor2", "taylor2_diag") else 0.5}


def assert_same(dynamic, static):
    assert static.decode == "static" and dynamic.decode == "dynamic"
    assert static.new_tokens == dynamic.new_tokens
    assert torch.equal(static.sequences, dynamic.sequences)
    assert static.kv_kept == dynamic.kv_kept
    for ours, theirs in zip(static.state_tokens, dynamic.state_tokens):
        assert ours == pytest.approx(theirs)
    assert len(static.output.logits) == len(dynamic.output.logits)
    for step, (ours, theirs) in enumerate(zip(static.output.logits, dynamic.output.logits)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=f"step {step}")


SUMMARY_NAMES = [name for name in SUMMARIES if name != "taylor2"] + ["exact"]  # taylor2 fits no layer at d = 16


# kvzip's own file is test_kvzip.py; the head-wise methods' (which take only summaries that refit the kept
# slots) test_headwise.py
UNIFORM_METHODS = [m for m in ntkkv.METHODS if "kvzip" not in m and m not in ("adakv", "ada_pyramidkv", "headkv")]


@pytest.mark.parametrize("method", UNIFORM_METHODS)
@pytest.mark.parametrize("summary", SUMMARY_NAMES)
@pytest.mark.parametrize("ratchet", [None, 3])
def test_static_decode_equals_dynamic_batched_with_left_padding(method, summary, ratchet):
    if method == "fullkv" and (summary != "none" or ratchet is not None):
        pytest.skip("full KV keeps every token: no summary, no ratchet")
    model = tiny_model()
    prompt, mask = batch_with_padding()
    budget = 56 if summary in ("taylor1", "taylor2_diag", "seed_taylor") else 32
    with ntkkv.compress(model, method, max_capacity_prompt=budget, ratchet=ratchet, **summary_options(summary)):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", **OPTIONS)
        static = ntkkv.generate(model, prompt, mask, decode="static", **OPTIONS)
    assert_same(dynamic, static)


@pytest.mark.parametrize("method, options", [
    ("snapkv", {}),
    ("pyramidkv", {"ratchet": 2}),  # its 38-token sample gets the uniform budget, alone and in the batch
    # with a summary the batch's longest prompt decides between the ramp and the uniform budget: every prompt
    # here is past the ramp's bottom share (16: 8 + 15)
    ("pyramidkv", {"summary": "merge", "state_budget": 0.25, "ratchet": 2, "max_capacity_prompt": 16}),
    ("streamingllm", {"summary": "merge_variance", "state_budget": 0.5, "ratchet": 3}),
    ("h2o", {"summary": "learned", "ratchet": 2}),
    ("fullkv", {}),
])
def test_a_sample_in_a_batch_decodes_as_alone(method, options):
    model = tiny_model("qwen2")
    prompt, mask = batch_with_padding()
    if options.get("summary") == "learned":
        options = {**options, "summary": Learned(0.5, features=learned_map(1))}
    options = {"max_capacity_prompt": 32, **options}
    with ntkkv.compress(model, method, **options):
        together = ntkkv.generate(model, prompt, mask, decode="static", **OPTIONS)
        for row in range(3):
            real = mask[row].bool()
            alone = ntkkv.generate(model, prompt[row:row + 1, real], decode="static", **OPTIONS)
            assert alone.new_tokens[0] == together.new_tokens[row]
            assert alone.kv_kept[0] == together.kv_kept[row]
            for ours, theirs in zip(alone.output.logits, together.output.logits):
                torch.testing.assert_close(ours[0], theirs[row], rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"summary": "merge", "state_budget": 0.25, "ratchet": 2}])
def test_question_read_after_the_compression_and_prefill_in_pieces(options):
    """prefill_length (the question read over the compressed context) and prefill_batch_size (samples
    prefilled a few at a time, then decoded together) give the dynamic path's output."""
    model = tiny_model("mistral")
    prompt, mask = batch_with_padding()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32, **options):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", prefill_length=80, **OPTIONS)
        for pieces in (None, 1, 2):
            static = ntkkv.generate(model, prompt, mask, decode="static", prefill_length=80,
                                    prefill_batch_size=pieces, **OPTIONS)
            assert_same(dynamic, static)


def test_stop_tokens_and_min_new_tokens_as_generate_has_them():
    model = tiny_model()
    prompt, mask = batch_with_padding()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32):
        free = ntkkv.generate(model, prompt, mask, decode="dynamic", max_new_tokens=20)
        # each sample's third token becomes a stop token: generation ends there (and later samples pad)
        stops = sorted({row[2] for row in free.new_tokens})
        for minimum in (0, 4):
            options = dict(max_new_tokens=20, min_new_tokens=minimum, eos_token_id=stops, pad_token_id=0)
            dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", **options)
            static = ntkkv.generate(model, prompt, mask, decode="static", **options)
            assert static.new_tokens == dynamic.new_tokens
            assert torch.equal(static.sequences, dynamic.sequences)
            assert all(len(row) >= max(minimum, 1) for row in static.new_tokens)


def prefilled_static_cache(model, compressor_options, room, prompt, mask):
    """A StaticCache straight from a compressed prefill, and the logits of the prompts' last tokens."""
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32, **compressor_options):
        cache = CompressedCache(config=model.config)
        logits = _prefill_rows(model, prompt, mask, None, cache)
        ratchet = compressor_options.get("ratchet")
        static = StaticCache.from_compressed([cache], room=room, ratchet=ratchet,
                                             merges_slots=compressor_options.get("summary") == "merge")
    return static, logits


@pytest.mark.parametrize("options", [{}, {"summary": "merge", "state_budget": 0.25, "ratchet": 3}])
def test_writes_go_only_to_the_room_for_new_tokens(options):
    """The prefill's slots, masked padding included, are never written; new tokens land in the room in
    order (a ring of the ratchet's window, whose oldest token folds into the merged slots)."""
    model = tiny_model()
    prompt, mask = batch_with_padding()
    mask[2, :70] = 0  # 20 real tokens: fewer than the 32 kept, so this sample holds masked slots
    static, logits = prefilled_static_cache(model, options, room=8, prompt=prompt, mask=mask)
    before = [(layer.keys.clone(), layer.bias.clone()) for layer in static.layers]
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32, **options):
        decoder = StaticDecoder(model, static, logits.float(), mask.sum(dim=1), max_new=8, min_new=8, stop_ids=[],
                                pad_id=0)
        decoder.run()
    for layer, (keys, bias) in zip(static.layers, before):
        start, merged = layer.prefill_slots, layer.merged_slots
        kept = slice(merged, start)
        assert torch.equal(layer.keys[:, :, kept], keys[:, :, kept])  # kept tokens and masked padding alike
        assert torch.equal(layer.bias[:, :, kept], bias[:, :, kept])
        assert bool((bias[2, :, kept] == -math.inf).any())  # the short sample has masked slots there
        written = min(7, layer.region)  # max_new - 1 tokens were fed back
        assert bool((layer.bias[:, :, start: start + written] == 0).all())
        assert bool((layer.bias[:, :, start + written:] == -math.inf).all())
        if options:
            folded = layer.bias[:, :, :merged].exp().sum(dim=-1) - bias[:, :, :merged].exp().sum(dim=-1)
            # 4 tokens left the ring (counts are exp of the log-count bias: float rounding)
            torch.testing.assert_close(folded, torch.full_like(folded, 7.0 - 3.0), rtol=0, atol=1e-4)
        else:
            assert torch.equal(layer.keys[:, :, :merged], keys[:, :, :merged])


def test_running_past_the_room_is_a_clear_error():
    model = tiny_model()
    prompt, mask = batch_with_padding()
    static, _ = prefilled_static_cache(model, {}, room=2, prompt=prompt, mask=mask)
    for _ in range(2):
        static.before_step()
        static.after_step()
    with pytest.raises(ValueError, match=r"room for 2 new tokens per layer and all are written; build it with more "
                                         r"room \(generate's max_new_tokens\) or pass ratchet=W"):
        static.before_step()


def test_the_ratchet_ring_never_runs_out_of_room():
    model = tiny_model()
    prompt, mask = batch_with_padding()
    static, _ = prefilled_static_cache(model, {"ratchet": 2}, room=2, prompt=prompt, mask=mask)
    for step in range(6):
        static.before_step()
        assert static.folding == (step >= 2)
        static.after_step()


def test_decode_modes_and_arguments_the_static_path_cannot_reproduce():
    model = tiny_model()
    prompt = random_prompt(40)
    with pytest.raises(ValueError, match="unknown decode 'fast'; choose one of: auto, static, dynamic"):
        ntkkv.generate(model, prompt, decode="fast", max_new_tokens=2)
    with pytest.raises(ValueError, match="decode='static' cannot reproduce generate argument.s. repetition_penalty"):
        ntkkv.generate(model, prompt, decode="static", max_new_tokens=2, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="prefill_batch_size and cuda_graph apply to decode='static'"):
        ntkkv.generate(model, prompt, decode="dynamic", max_new_tokens=2, prefill_batch_size=1)
    # auto is dynamic on the CPU (the reference), and takes what only generate can do
    result = ntkkv.generate(model, prompt, max_new_tokens=3, repetition_penalty=1.2)
    assert result.decode == "dynamic" and len(result.new_tokens[0]) == 3


# -- what the review of the static path asked for --------------------------------------------------------

def test_every_fold_updates_its_state_in_place():
    """A captured decode step replays the tensors it was captured with: a fold that rebinds an attribute
    to a new tensor would be lost after the first replay. Every state's fold must write in place."""
    from ntkkv.summaries import LinearState, build_summary

    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 40, 16, generator=generator), torch.randn(1, 2, 40, 16, generator=generator)
    evicted = torch.ones(1, 2, 40, dtype=torch.bool)
    states = [build_summary(name, state_budget=80).summarise(keys, values, evicted, build_summary(
        name, state_budget=80).plan(200, 16), 0).state for name in ("seed_taylor", "taylor2_lowrank", "merge_variance")]
    states.append(Learned(80, features=learned_map()).summarise(
        keys, values, evicted, Learned(80, features=learned_map()).plan(200, 16), 0).state)
    linear = LinearState(lambda x, scaling: torch.nn.functional.elu(x * scaling**0.5) + 1)
    linear.fold(keys, values, evicted.float())
    states.append(linear)
    for state in states:
        before = {name: (value, value.clone()) for name, value in vars(state).items()
                  if isinstance(value, torch.Tensor)}
        state.fold(keys[:, :, :1] + 3.0, values[:, :, :1] + 3.0, torch.ones(1, 2, 1))
        after = {name: value for name, value in vars(state).items() if isinstance(value, torch.Tensor)}
        assert after.keys() == before.keys(), type(state).__name__
        for name, (tensor, copy) in before.items():
            assert after[name] is tensor, f"{type(state).__name__}.{name} was rebound"
        assert any(not torch.equal(tensor, copy) for tensor, copy in before.values()), type(state).__name__


def test_what_the_static_path_does_not_take_goes_dynamic():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    prompt = random_prompt(40)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cases = [(Qwen3ForCausalLM(config).eval(), "the model class Qwen3ForCausalLM")]
    windowed = tiny_model("mistral")
    windowed.config.sliding_window = 16
    cases.append((windowed, "a sliding window of 16 tokens"))
    split = tiny_model()
    split.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1}
    cases.append((split, "a model split across devices or offloaded"))
    dynamic_rope = tiny_model()
    dynamic_rope.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cases.append((dynamic_rope, "RoPE type 'dynamic'"))
    for model, reason in cases:
        model.generation_config.pad_token_id = 0
        with pytest.raises(ValueError, match=f"decode='static' cannot reproduce {reason}"):
            ntkkv.generate(model, prompt, decode="static", max_new_tokens=3)
        assert ntkkv.generate(model, prompt, max_new_tokens=3).decode == "dynamic"


def test_a_ratchet_keeps_at_least_one_new_token():
    with pytest.raises(ValueError, match="ratchet must be a number of generated tokens ≥ 1 kept exact, or None, got 0"):
        with ntkkv.compress(tiny_model(), "snapkv", max_capacity_prompt=32, ratchet=0):
            pass


@pytest.mark.parametrize("options", [{}, {"summary": "merge", "state_budget": 8, "ratchet": 2}])
def test_what_the_static_cache_holds_is_counted_as_the_dynamic_one(options):
    """kv_lengths and state_sizes after generation: the static cache gives the dynamic cache's numbers
    (merged slots reserved for the ratchet count once it has folded into them)."""
    model = tiny_model()
    prompt, mask = batch_with_padding()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, **options):
        for steps in (2, 9):
            results = [ntkkv.generate(model, prompt[:, -40:], mask[:, -40:], decode=mode, max_new_tokens=steps,
                                      min_new_tokens=steps) for mode in ("dynamic", "static")]
            dynamic, static = (result.cache for result in results)
            assert ntkkv.kv_lengths(static) == ntkkv.kv_lengths(dynamic)
            assert ntkkv.kv_lengths(static, per_sample=True) == ntkkv.kv_lengths(dynamic, per_sample=True)
            assert ntkkv.state_sizes(static) == ntkkv.state_sizes(dynamic)
            assert results[0].state_tokens == results[1].state_tokens


def test_pyramidkv_plans_by_the_longest_real_prompt_not_the_padded_width():
    model = tiny_model()
    prompt = random_prompt(60, batch=2, seed=5)
    mask = torch.ones_like(prompt)
    mask[:, :25] = 0  # every row starts with the same padding
    with ntkkv.compress(model, "pyramidkv", max_capacity_prompt=32):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", **OPTIONS)
        static = ntkkv.generate(model, prompt, mask, decode="static", **OPTIONS)
        unpadded = ntkkv.generate(model, prompt[:, 25:], decode="dynamic", **OPTIONS)
    assert_same(dynamic, static)
    assert dynamic.kv_kept == unpadded.kv_kept and dynamic.new_tokens == unpadded.new_tokens


def test_any_head_dim_and_an_integer_stop_token():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=24)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    prompt = random_prompt(50)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=20):
        free = ntkkv.generate(model, prompt, decode="dynamic", max_new_tokens=8)
        stop = free.new_tokens[0][3]
        for mode in ("dynamic", "static"):
            result = ntkkv.generate(model, prompt, decode=mode, max_new_tokens=8, eos_token_id=stop)
            assert result.new_tokens[0] == free.new_tokens[0][: free.new_tokens[0].index(stop) + 1]
