"""KVzip: the reconstruction pass's scores against the definition, its chunks and query blocks, batches,
both decode paths, the question-outside needle, PyramidKV budgets, the prompt per chat template, errors."""

import math

import pytest
import torch
from conftest import make_tiny_tokenizer
from test_headwise import slow_adaptive_choice

import ntkkv
from ntkkv.cache import CompressedCache
from ntkkv.compressor import gather_tokens
from ntkkv.generation import _prefill, cache_argument_name
from ntkkv.policies import AdaKVzip, KVzip, PyramidKV, PyramidKVzip, SelectionInputs
from ntkkv.policies.kvzip import MISSING_SCORES
from ntkkv.reconstruction import (
    FIRST_REQUEST,
    LATER_REQUEST,
    REFERENCE_POSITIONS,
    ReconstructionPrompt,
    max_attention,
    reconstructing,
    reconstruction_prompt,
    template_family,
)
from ntkkv.summaries import LayerPlan, Summarised, Summary
from tiny import random_prompt, tiny_model

PROMPT = ReconstructionPrompt(first=[5, 6, 7], later=[8, 9], closing=[10, 11])  # a request of made-up tokens


def kvzip_scores(model, input_ids, attention_mask, policy, prompt=PROMPT):
    """The reconstruction pass's scores (per layer, (batch, kv_heads, n)) and the compressed cache."""
    cache = CompressedCache(config=model.config)
    with torch.no_grad(), ntkkv.compress(model, policy), reconstructing(model, cache, prompt=prompt) as run:
        _prefill(model, input_ids, attention_mask, cache)
    return run.scores, cache


def reference_scores(model, context: list[int], prompt: ReconstructionPrompt, sinks: int, chunk_size: int):
    """(layers, kv_heads, n) from the definition, with the unpatched eager model and explicit loops: for each
    chunk of the context after the sinks, the model reads the context and then the chunk's reconstruction
    input (request, the previous chunk's last tokens, closing, the chunk) in one pass, returning its attention
    weights; a row of the reconstruction input, renormalised over the sinks, the chunk and the reconstruction
    input up to the row (the softmax over those keys), gives each chunk key a weight; the key's score is the
    largest over the rows and over the query heads of its KV head."""
    config = model.config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    group, n = heads // kv_heads, len(context)
    scores = torch.zeros(layers, kv_heads, n)
    for start in range(sinks, n, chunk_size):
        stop = min(start + chunk_size, n)
        request = prompt.first if start == sinks else prompt.later + context[max(start - prompt.overlap, 0): start]
        read = request + prompt.closing + context[start:stop]
        with torch.no_grad():
            attentions = model(torch.tensor([context + read]), output_attentions=True).attentions
        for layer in range(layers):
            for kv_head in range(kv_heads):
                for head in range(kv_head * group, (kv_head + 1) * group):
                    for row in range(n, n + len(read)):
                        weights = attentions[layer][0, head, row].double()
                        columns = list(range(sinks)) + list(range(start, stop)) + list(range(n, row + 1))
                        total = weights[columns].sum()
                        for key in range(start, stop):
                            scores[layer, kv_head, key] = max(scores[layer, kv_head, key], weights[key] / total)
    return scores


@pytest.mark.parametrize("chunk_size", [64, 10])  # one chunk; several, the later ones after the previous' tail
@pytest.mark.parametrize("family, backend", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa")])
def test_scores_are_the_most_attention_from_the_reconstruction(family, backend, chunk_size):
    model = tiny_model(family, backend, layers=2)
    context = random_prompt(37)
    scores, _ = kvzip_scores(model, context, torch.ones_like(context), KVzip(16, chunk_size=chunk_size))
    eager = tiny_model(family, "eager", layers=2)
    expected = reference_scores(eager, context[0].tolist(), PROMPT, sinks=4, chunk_size=chunk_size)
    torch.testing.assert_close(torch.stack([layer[0] for layer in scores]), expected, rtol=1e-4, atol=1e-6)
    assert (expected[..., 4:] > 0).all()  # every token after the sinks was scored


def test_query_blocks_give_the_scores_of_all_queries_at_once():
    model = tiny_model("llama", "sdpa", layers=2)
    context = random_prompt(45)
    mask = torch.ones_like(context)
    whole, _ = kvzip_scores(model, context, mask, KVzip(16, chunk_size=20, query_block=10**6))
    for block in (3, 7, None):
        blocked, _ = kvzip_scores(model, context, mask, KVzip(16, chunk_size=20, query_block=block))
        for expected, got in zip(whole, blocked):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_max_attention_is_the_softmax_over_sinks_chunk_and_own_keys():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 5, 8, generator=generator)
    sinks, chunk, own = (torch.randn(1, 2, count, 8, generator=generator) for count in (2, 3, 5))
    got = max_attention(queries, sinks, chunk, own, 0.5)
    expected = torch.zeros(1, 2, 3)
    for head in range(4):
        for row in range(5):
            keys = torch.cat([sinks[0, head // 2], chunk[0, head // 2], own[0, head // 2, : row + 1]])
            weights = (keys @ queries[0, head, row] * 0.5).softmax(dim=0)[2:5]
            expected[0, head // 2] = torch.maximum(expected[0, head // 2], weights)
    torch.testing.assert_close(got, expected)


def kept_positions(cache, full_keys):
    """Per layer, (kv_heads, slots) the prompt position of each kept key of sample 0."""
    positions = []
    for layer, full in zip(cache.layers, full_keys):
        distance = (layer.keys[0][:, :, None, :] - full[0][:, None, :, :]).abs().amax(-1)
        nearest = distance.min(-1)
        assert (nearest.values < 1e-5).all()
        positions.append(nearest.indices)
    return positions


def test_each_head_keeps_its_sinks_top_scores_and_window():
    model = tiny_model("llama", "sdpa", layers=2)
    context = random_prompt(50)
    policy = KVzip(20, window_size=6, sinks=3, chunk_size=16)
    scores, cache = kvzip_scores(model, context, torch.ones_like(context), policy)
    full = CompressedCache(config=model.config)
    with torch.no_grad():
        model(context, **{cache_argument_name(model): full})
    for positions, layer_scores in zip(kept_positions(cache, [layer.keys for layer in full.layers]), scores):
        for head in range(positions.shape[0]):
            top = layer_scores[0, head, 3:44].topk(20 - 6 - 3).indices + 3
            expected = sorted([0, 1, 2] + top.tolist() + list(range(44, 50)))
            assert positions[head].tolist() == expected


def test_a_wider_kernel_pools_the_scores_and_the_sinks_stay_kept_alone():
    """kernel_size 1 (the default): the scores as the pass gave them; 5 with maxpool: each score the largest of
    itself and its two neighbours on each side (by hand); the sinks kept, their neighbours not lifted by them."""
    scores = torch.tensor([[[9.0, 0.1, 0.2, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 1.0]]])
    keys = torch.zeros(1, 1, 14, 4)
    inputs = SelectionInputs(torch.zeros(1, 1, 1, 14, 4), keys, keys, torch.ones(1, 14, dtype=torch.bool), 1.0,
                             scores)
    plain = KVzip(6, window_size=2, sinks=1).selection_scores(inputs, 0)
    assert plain[0, 0].tolist() == [math.inf] + scores[0, 0, 1:12].tolist()
    pooled = KVzip(6, window_size=2, sinks=1, kernel_size=5).selection_scores(inputs, 0)
    by_hand = [math.inf, 0.2, 0.2, 5.0, 5.0, 5.0, 5.0, 5.0, 0.3, 0.3, 0.3, 0.3]
    assert pooled[0, 0].tolist() == pytest.approx(by_hand)
    kept = KVzip(6, window_size=2, sinks=1, kernel_size=5).select(inputs, 0, 6)[0, 0].tolist()
    assert kept[0] == 0 and kept[-2:] == [12, 13] and set(kept[1:4]) <= {3, 4, 5, 6, 7}  # sink, 3 of the 5.0s, window


def two_prompts():
    """Prompts of 40 and 28 tokens in one batch, the short one padded on the left."""
    long_prompt, short_prompt = random_prompt(40, seed=3), random_prompt(28, seed=4)
    batch, mask = torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long)
    batch[0], mask[0] = long_prompt[0], 1
    batch[1, 12:], mask[1, 12:] = short_prompt[0], 1
    return batch, mask, long_prompt, short_prompt


def test_a_left_padded_batch_scores_each_sample_as_alone_and_never_its_padding():
    model = tiny_model("llama", "sdpa", layers=2)
    batch, mask, long_prompt, short_prompt = two_prompts()
    policy = KVzip(16, chunk_size=9)
    together, _ = kvzip_scores(model, batch, mask, policy)
    long_alone, _ = kvzip_scores(model, long_prompt, torch.ones_like(long_prompt), policy)
    short_alone, _ = kvzip_scores(model, short_prompt, torch.ones_like(short_prompt), policy)
    for layer, long_layer, short_layer in zip(together, long_alone, short_alone):
        torch.testing.assert_close(layer[0], long_layer[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer[1, :, 12:], short_layer[0], rtol=1e-4, atol=1e-6)
        assert (layer[1, :, :12] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_ada_kvzip_allocates_the_reconstruction_scores_across_heads_as_adakv_does(alpha):
    model = tiny_model("llama", "sdpa", layers=2)
    context = random_prompt(50)
    budget, window, sinks = 20, 6, 3
    scores, _ = kvzip_scores(model, context, torch.ones_like(context), KVzip(budget, window_size=window, sinks=sinks,
                                                                              chunk_size=16))
    policy = AdaKVzip(budget, window_size=window, sinks=sinks, chunk_size=16, alpha_safeguard=alpha)
    keys = torch.randn(1, 2, 50, 16)  # only their shape matters: the scores decide
    for layer_scores in scores:
        inputs = SelectionInputs(torch.randn(1, 2, 2, 50, 16), keys, keys, torch.ones(1, 50, dtype=torch.bool),
                                 0.25, layer_scores)
        kept, padded = policy.select_heads(inputs, 0, budget)
        prefix = layer_scores[..., : 50 - window].clone()
        prefix[..., :sinks] = math.inf  # the sinks always stay
        chosen = slow_adaptive_choice(prefix, budget - window, alpha)
        total = 0
        for head in range(2):
            held = kept[0, head][~padded[0, head]].tolist()
            expected = chosen[0, head].nonzero().flatten().tolist() + list(range(50 - window, 50))
            assert held == expected
            total += len(held)
        assert total == 2 * budget  # the layer holds its budget in total, however the heads share it


@pytest.mark.parametrize("method", ["ada_kvzip", "ada_pyramid_kvzip"])
def test_ada_kvzip_decodes_alike_on_both_paths_and_a_sample_in_a_batch_as_alone(chat, method):
    model, tokenizer = chat
    batch, mask, long_prompt, short_prompt = two_prompts()
    with ntkkv.compress(model, method, max_capacity_prompt=16, chunk_size=10):
        dynamic = greedy(model, batch, mask, decode="dynamic", tokenizer=tokenizer)
        static = greedy(model, batch, mask, decode="static", tokenizer=tokenizer)
        alone = [greedy(model, prompt, torch.ones_like(prompt), decode="static", tokenizer=tokenizer)
                 for prompt in (long_prompt, short_prompt)]
    assert torch.equal(dynamic.sequences, static.sequences)
    torch.testing.assert_close(torch.stack(dynamic.output.logits), torch.stack(static.output.logits),
                               rtol=0, atol=1e-4)
    assert static.new_tokens == [alone[0].new_tokens[0], alone[1].new_tokens[0]]
    assert static.kv_kept == [alone[0].kv_kept[0], alone[1].kv_kept[0]]


# -- through ntkkv.generate -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat():
    """A tiny Llama sized to conftest's tokenizer, which gets a ChatML template (its markers as special tokens)."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = tiny_model("llama", "sdpa", layers=2)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model, tokenizer


def greedy(model, input_ids, attention_mask, **kwargs):
    return ntkkv.generate(model, input_ids, attention_mask, max_new_tokens=5, min_new_tokens=5,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("method", ["kvzip", "pyramid_kvzip"])
def test_a_budget_at_least_the_prompt_gives_the_unpatched_output(chat, method, decode):
    model, tokenizer = chat
    batch, mask, _, _ = two_prompts()
    expected = greedy(model, batch, mask, decode=decode)
    with ntkkv.compress(model, method, max_capacity_prompt=40):
        for prefill_length in (None, 30):
            got = greedy(model, batch, mask, decode=decode, tokenizer=tokenizer, prefill_length=prefill_length)
            assert torch.equal(got.sequences, expected.sequences)
            torch.testing.assert_close(torch.stack(got.output.logits), torch.stack(expected.output.logits),
                                       rtol=0, atol=1e-5)
            assert got.kv_kept == [[40] * 2, [28] * 2]


@pytest.mark.parametrize("prefill_length", [None, 32])
def test_both_decode_paths_compress_alike_and_hold_the_budget(chat, prefill_length):
    model, tokenizer = chat
    batch, mask, _, _ = two_prompts()
    with ntkkv.compress(model, "kvzip", max_capacity_prompt=16, chunk_size=10):
        dynamic = greedy(model, batch, mask, decode="dynamic", tokenizer=tokenizer, prefill_length=prefill_length)
        static = greedy(model, batch, mask, decode="static", tokenizer=tokenizer, prefill_length=prefill_length)
    assert torch.equal(dynamic.sequences, static.sequences)
    question = 0 if prefill_length is None else 40 - prefill_length
    assert dynamic.kv_kept == static.kv_kept == [[16 + question] * 2] * 2
    torch.testing.assert_close(torch.stack(dynamic.output.logits), torch.stack(static.output.logits),
                               rtol=0, atol=1e-4)


def test_a_sample_in_a_batch_gets_its_output_alone(chat):
    model, tokenizer = chat
    batch, mask, long_prompt, short_prompt = two_prompts()
    with ntkkv.compress(model, "kvzip", max_capacity_prompt=16, chunk_size=10):
        together = greedy(model, batch, mask, decode="dynamic", tokenizer=tokenizer)
        alone = [greedy(model, prompt, torch.ones_like(prompt), decode="dynamic", tokenizer=tokenizer)
                 for prompt in (long_prompt, short_prompt)]
    assert together.new_tokens == [alone[0].new_tokens[0], alone[1].new_tokens[0]]
    assert together.kv_kept == [alone[0].kv_kept[0], alone[1].kv_kept[0]]


def test_pyramid_kvzip_keeps_pyramidkv_budgets(chat):
    model, tokenizer = chat
    prompt = random_prompt(60)
    policy = PyramidKVzip(24, window_size=4, beta=4)
    budgets = PyramidKV(24, window_size=4, beta=4).layer_budgets(2, 60)
    assert policy.layer_budgets(2, 60) == budgets and budgets[0] > budgets[1]
    with ntkkv.compress(model, policy):
        out = greedy(model, prompt, torch.ones_like(prompt), decode="dynamic", tokenizer=tokenizer)
    assert out.kv_kept == [budgets]


class RecordingRefit(Summary):
    """A refitting summary that keeps the kept values and records the reference queries it was given."""

    name = "recording"
    refits_kept = True

    def __init__(self):
        self.queries = []

    def plan(self, memory, head_dim, min_exact=1):
        return LayerPlan(memory, memory)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None):
        return Summarised()

    def refit(self, keys, values, kept, kept_bias, evicted, queries, scaling, layer_idx, state=None):
        self.queries.append(queries)
        return gather_tokens(values, kept), kept_bias


def test_a_refitting_summary_fits_to_reconstruction_queries():
    model = tiny_model("llama", "sdpa", layers=2)
    batch, mask, _, _ = two_prompts()
    summary = RecordingRefit()
    cache = CompressedCache(config=model.config)
    with torch.no_grad(), ntkkv.compress(model, KVzip(16, chunk_size=10), summary=summary), \
            reconstructing(model, cache, prompt=PROMPT):
        _prefill(model, batch, mask, cache)
    # the shorter sample reads 24 tokens in 3 chunks: (request, closing, chunk) each
    reads = 3 + 2 + 10 + (2 + 8 + 2 + 10) + (2 + 8 + 2 + 4)
    assert len(summary.queries) == 2
    for queries in summary.queries:
        assert queries.shape == (2, 2, 2 * min(REFERENCE_POSITIONS, reads), 16)
        assert torch.isfinite(queries).all() and queries.abs().amax(dim=-1).gt(0).all()


# -- the needle's question outside ------------------------------------------------------------------

def test_the_needle_with_the_question_outside_runs_kvzip(tmp_path, chat):
    from ntkkv.eval import needle

    model, tokenizer = chat
    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "a.txt").write_text(". ".join(f"The fox number {i} jumps over the dog" for i in range(300)) + ".\n")
    test = needle.NeedleTest(context_lengths=[300], depth_percents=[0, 100], save_dir=str(tmp_path / "out"),
                             model_name="tiny", method="kvzip", max_capacity_prompt=48, question_outside=True,
                             eval_batch_size=2)
    records = test.run(model, tokenizer, needle.Haystack(tokenizer, folder))
    assert test.results_dir.name == "tiny_kvzip_48_qout"
    assert len(records) == 2
    for record in records:
        assert record["kv_kept"] == [48 + record["question_length"]] * 2


# -- the prompt and the errors ----------------------------------------------------------------------

TEMPLATES = {
    "llama3": ("<|start_header_id|>{{ m }}<|end_header_id|>", ["<|eot_id|>", "<|start_header_id|>",
                                                                 "<|end_header_id|>"],
               "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>{{ m }}<|im_end|>", ["<|im_start|>", "<|im_end|>"],
               "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("[INST] {{ m }} [/INST]", [], "</s>[INST] ", " [/INST]"),
    "plain": (None, [], "\n\n", "\n\n"),
}


@pytest.mark.parametrize("family", TEMPLATES)
def test_the_request_is_worded_in_the_chat_template(family):
    template, specials, opening, closing = TEMPLATES[family]
    tokenizer = make_tiny_tokenizer()
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    assert template_family(tokenizer) == family
    prompt = reconstruction_prompt(tokenizer)
    assert tokenizer.decode(prompt.first) == opening + FIRST_REQUEST
    assert tokenizer.decode(prompt.later) == opening + LATER_REQUEST
    assert tokenizer.decode(prompt.closing) == closing
    for special in specials:  # the markers are the template's own special tokens, not pieces of text
        assert tokenizer.convert_tokens_to_ids(special) in prompt.first + prompt.closing


def test_smollm2s_request_ends_with_its_generation_prompt(smollm2):
    _, tokenizer = smollm2
    assert template_family(tokenizer) == "chatml"
    prompt = reconstruction_prompt(tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.endswith(tokenizer.decode(prompt.closing))


def test_later_chunks_ask_to_start_after_the_previous_chunks_tail():
    inputs = PROMPT.chunk_inputs(list(range(100, 130)), sinks=2, chunk_size=12)
    assert [(start, stop) for start, stop, _ in inputs] == [(2, 14), (14, 26), (26, 30)]
    assert inputs[0][2] == [5, 6, 7, 10, 11] + list(range(102, 114))
    assert inputs[1][2] == [8, 9] + list(range(106, 114)) + [10, 11] + list(range(114, 126))


def test_a_method_typo_lists_kvzip():
    with pytest.raises(ValueError, match="unknown method 'kvzipp'.*kvzip.*pyramid_kvzip"):
        with ntkkv.compress(tiny_model(layers=1), "kvzipp"):
            pass


def test_kvzip_without_its_pass_says_how_to_run_it(chat):
    model, tokenizer = chat
    prompt = random_prompt(30)
    with ntkkv.compress(model, "kvzip", max_capacity_prompt=16):
        with pytest.raises(ValueError, match="kvzip needs its reconstruction pass"):
            model.generate(prompt, max_new_tokens=2)
        with pytest.raises(ValueError, match="pass tokenizer= to ntkkv.generate"):
            ntkkv.generate(model, prompt, max_new_tokens=2)
    assert MISSING_SCORES.startswith("kvzip needs its reconstruction pass")


@pytest.mark.parametrize("options, words", [
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"sinks": -1}, "sinks must be an integer ≥ 0"),
    ({"query_block": 2.5}, "query_block must be a positive integer or None"),
])
def test_bad_kvzip_options_are_named(options, words):
    with pytest.raises(ValueError, match=words):
        KVzip(64, **options)


def test_the_model_is_left_as_it_was():
    model = tiny_model(layers=2)
    prompt = random_prompt(30)
    with ntkkv.compress(model, "kvzip", max_capacity_prompt=16):
        compressor = model.model.layers[0].self_attn.kv_compressor
        cache = CompressedCache(config=model.config)
        with torch.no_grad(), reconstructing(model, cache, prompt=PROMPT):
            _prefill(model, prompt, torch.ones_like(prompt), cache)
        assert all(layer.self_attn.kv_compressor is compressor for layer in model.model.layers)
        assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert not any("kv_compressor" in vars(layer.self_attn) for layer in model.model.layers)
    assert ntkkv.kv_lengths(cache) == [16, 16]


def test_the_global_switch_runs_kvzip_and_is_restored(chat):
    model, tokenizer = chat
    prompt = random_prompt(40)
    expected = greedy(model, prompt, torch.ones_like(prompt), decode="dynamic", tokenizer=tokenizer)
    try:
        ntkkv.replace_llama("kvzip", 16, chunk_size=10)
        with_switch = greedy(model, prompt, torch.ones_like(prompt), decode="dynamic", tokenizer=tokenizer)
    finally:
        ntkkv.replace_llama("fullkv")
    with ntkkv.compress(model, "kvzip", max_capacity_prompt=16, chunk_size=10):
        scoped = greedy(model, prompt, torch.ones_like(prompt), decode="dynamic", tokenizer=tokenizer)
    assert with_switch.kv_kept == [[16, 16]] and torch.equal(with_switch.sequences, scoped.sequences)
    assert not any({"forward", "kv_compressor"} & set(vars(layer.self_attn)) for layer in model.model.layers)
    assert torch.equal(greedy(model, prompt, torch.ones_like(prompt), decode="dynamic").sequences,
                       expected.sequences)
