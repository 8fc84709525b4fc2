"""benchmarks/bench_speed.py in its CPU toy mode: every method runs, the table is written, OOM is survived."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed.py"
FAST = ["--device", "cpu", "--tiny", "--lengths", "160", "--budget", "32", "--steps", "2", "--repeats", "1",
        "--batches", "1,2", "--dynamic-batches", "1", "--largest", ""]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_speed"]


def table_rows(text):
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| 160 |")]


def test_tiny_cpu_run_writes_table(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert bench.main(FAST + ["--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    assert "CPU" in table and "budget 32" in table
    rows = table_rows(table)
    assert [(row[1], row[2]) for row in rows] == [(label, batch) for label in bench.CONFIGURATIONS
                                                  for batch in ("1", "2")]
    # capacity per layer (layer 0): what the prefill kept, plus room for the 2 + 1 × 2 timed steps and one more
    slots = {row[1]: int(row[10]) for row in rows}
    room = 5
    assert slots["fullkv"] == 160 + room
    assert slots["snapkv"] == slots["streamingllm"] == 32 + room
    assert slots["snapkv+merge"] == 28 + 4 + room  # 1/8 of 32: four merged slots
    assert slots["snapkv+learned"] == 28 + room  # two 1.6-token clusters fit in 4; the state is not a slot
    assert slots["pyramidkv"] > 32 + room  # its bottom layer holds more than the average
    for row in rows:
        assert float(row[4]) > 0 and float(row[5].replace(",", "")) > 0  # decode ms and tokens/s
        assert (row[7] != "") == (row[2] == "1")  # the dynamic path at batch 1 only


def test_out_of_memory_is_recorded_and_the_run_goes_on(bench, monkeypatch, capsys):
    real = bench.time_static

    def time_static(model, cache, batch, length, args):
        if batch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, cache, batch, length, args)

    monkeypatch.setattr(bench, "time_static", time_static)
    assert bench.main(FAST + ["--methods", "fullkv,snapkv"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [(row[1], row[2], row[11]) for row in rows] == [("fullkv", "1", ""), ("fullkv", "2", "OOM"),
                                                           ("snapkv", "1", ""), ("snapkv", "2", "OOM")]


def test_unknown_method_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(FAST + ["--methods", "snapkv2"])


@pytest.fixture(scope="module")
def fidelity():
    sys.path.insert(0, str(BENCH.parent))
    try:
        yield importlib.import_module("bench_fidelity")
    finally:
        sys.path.remove(str(BENCH.parent))
        sys.modules.pop("bench_fidelity", None)


FIDELITY = ["--tiny", "--device", "cpu", "--lengths", "120", "--budgets", "48", "--state_budgets", "0.25"]


def fidelity_rows(table):
    """{(method, summary): the row's cells} of a 120-token table."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| 120 |")]
    return {(row[2], row[3]): row for row in rows}


def test_fidelity_benchmark_tiny_run_prints_its_table(fidelity, tmp_path, capsys):
    """benchmarks/bench_fidelity.py end to end on a tiny random model: eviction's error is what a plain
    softmax over SnapKV's kept tokens gives, the exact summary has no error, a state that cannot fit
    says so, and the JSON is written."""
    out = tmp_path / "fidelity.md"
    assert fidelity.main(FIDELITY + ["--methods", "snapkv", "--summaries", "none", "merge_variance", "taylor2",
                                     "exact", "merge_variance:route", "--decode_tokens", "3", "--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    rows = fidelity_rows(table)
    assert float(rows["snapkv", "none"][5]) == pytest.approx(eviction_error(fidelity), abs=6e-4)  # 3 digits
    assert rows["snapkv", "exact"][5] == "0.000"
    assert "does not fit" in rows["snapkv", "taylor2 0.25"]
    assert float(rows["snapkv", "merge_variance 0.25"][4]) <= 48
    assert len(__import__("json").loads(out.with_suffix(".json").read_text())) == 5
    # the routed row: routing reaches the compressor, at the plain row's memory
    routed = fidelity.configurations(fidelity.parse_args(["--methods", "snapkv", "--summaries",
                                                          "merge_variance:route", "--state_budgets", "0.25"]))
    assert routed == [("snapkv", "merge_variance:route 0.25",
                       {"summary": "merge_variance", "state_budget": 0.25, "route": True})]
    fitted_beside = fidelity.configurations(fidelity.parse_args(["--methods", "snapkv", "--summaries",
                                                                 "learned:route:fit", "--state_budgets", "0.125",
                                                                 "--summary_path", "map.pt"]))
    assert fitted_beside == [("snapkv", "learned:route:fit 0.125", {"summary": "learned", "state_budget": 0.125,
                                                                   "route": True, "fit_kept": True,
                                                                   "summary_path": "map.pt"})]
    for entry in ("fitted:fit", "none:fit", "bogus"):  # one line, before any model loads
        with pytest.raises(SystemExit, match="bench_fidelity.py: error: .*(has none|unknown summary)"):
            fidelity.main(["--tiny", "--device", "cpu", "--summaries", entry])
    assert rows["snapkv", "merge_variance:route 0.25"][4] == rows["snapkv", "merge_variance 0.25"][4]


def eviction_error(module):
    """The last prompt query's relative error under SnapKV 48 (window 8), from the captured activations,
    one layer and query head at a time: a plain softmax over the kept tokens against one over all."""
    from types import SimpleNamespace

    from ntkkv.policies import SelectionInputs, SnapKV
    from ntkkv.training import capture_attention

    model, _ = module.load(SimpleNamespace(tiny=True, dtype=None), "cpu")
    ids = torch.randint(3, 256, (1, 123), generator=torch.Generator().manual_seed(120))
    errors = []
    for layer_idx, layer in enumerate(capture_attention(model, ids)):
        queries, keys, values = layer.queries[:, :, :120], layer.keys[:, :, :120], layer.values[:, :, :120]
        heads, kv_heads = queries.shape[1], keys.shape[1]
        grouped = queries.reshape(1, kv_heads, heads // kv_heads, 120, -1)
        inputs = SelectionInputs(grouped, keys, values, torch.ones(1, 120, dtype=torch.bool), layer.scaling)
        kept = SnapKV(48, window_size=8).select(inputs, layer_idx, 48)[0]
        for head in range(heads):
            kv = head // (heads // kv_heads)
            query = queries[0, head, -1]
            full = torch.softmax(keys[0, kv] @ query * layer.scaling, 0) @ values[0, kv]
            chosen = kept[kv]
            evicted = torch.softmax(keys[0, kv, chosen] @ query * layer.scaling, 0) @ values[0, kv, chosen]
            errors.append(float((evicted - full).norm() / full.norm()))
    return sum(errors) / len(errors)


def test_fidelity_benchmark_runs_kvzip_and_the_reconstruction_queries(fidelity, capsys):
    """kvzip and pyramid_kvzip rows and the reconstruction column, chunked in three; without the decode set no
    decode column; the exact summary has no error; SnapKV's reconstruction error is what plain softmaxes over
    the kept tokens and the read give."""
    assert fidelity.main(FIDELITY + ["--methods", "snapkv", "kvzip", "pyramid_kvzip", "--summaries", "none",
                                     "fitted", "exact", "--query_sets", "last", "reconstruction", "--chunk_size",
                                     "50", "--reconstruction_positions", "40"]) == 0
    table = capsys.readouterr().out
    assert "| last query | vs evict | reconstruction | vs evict |" in table and "decode" not in table
    rows = fidelity_rows(table)
    assert set(rows) == {(method, summary) for method in ("snapkv", "kvzip", "pyramid_kvzip")
                         for summary in ("none", "fitted", "exact")}
    for method in ("snapkv", "kvzip", "pyramid_kvzip"):
        assert rows[method, "exact"][5] == rows[method, "exact"][7] == "0.000"
        assert rows[method, "none"][6] == rows[method, "none"][8] == "1.00"
        assert 0 < float(rows[method, "fitted"][7]) < float(rows[method, "none"][7])
    assert float(rows["snapkv", "none"][7]) == pytest.approx(reconstruction_eviction_error(fidelity), abs=6e-4)


def bench_model_and_prompt(module):
    from types import SimpleNamespace

    model, tokenizer = module.load(SimpleNamespace(tiny=True, dtype=None), "cpu")
    return model, tokenizer, torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(120))


def reconstruction_eviction_error(module):
    """The reconstruction queries' relative error under SnapKV 48 (window 8), from the definition: for each
    chunk, one forward of the unpatched model over the prompt and the read (request, closing, copy) records
    the attention inputs; a measured read query attends, one query head at a time, over the prompt's kept
    tokens and the read up to itself (plain softmax), against the whole prompt and the read up to itself."""
    from ntkkv.policies import KVzip, SelectionInputs, SnapKV
    from ntkkv.reconstruction import reconstruction_prompt
    from ntkkv.training import capture_attention

    model, tokenizer, ids = bench_model_and_prompt(module)
    context = ids[0].tolist()
    inputs = reconstruction_prompt(tokenizer).chunk_inputs(context, 4, 50)
    assert len(inputs) == 3
    total = sum(len(read) for _, _, read in inputs)
    measured = module.measured_positions(inputs, 40, set(module.reference_positions(total)))
    prompt_layers = capture_attention(model, ids)
    errors, offset = [], 0
    for _, _, read in inputs:
        layers = capture_attention(model, torch.tensor([context + read]))
        for layer_idx, (prompt_layer, layer) in enumerate(zip(prompt_layers, layers)):
            heads, kv_heads = layer.queries.shape[1], layer.keys.shape[1]
            grouped = prompt_layer.queries.reshape(1, kv_heads, heads // kv_heads, 120, -1)
            inputs_ = SelectionInputs(grouped, prompt_layer.keys, prompt_layer.values,
                                      torch.ones(1, 120, dtype=torch.bool), layer.scaling)
            kept = SnapKV(48, window_size=8).select(inputs_, layer_idx, 48)[0]
            for position in [p - offset for p in measured if offset <= p < offset + len(read)]:
                for head in range(heads):
                    kv = head // (heads // kv_heads)
                    query = layer.queries[0, head, 120 + position]
                    own = range(120, 121 + position)
                    columns = [list(range(120)) + list(own), kept[kv].tolist() + list(own)]
                    outputs = [torch.softmax(layer.keys[0, kv, c] @ query * layer.scaling, 0) @ layer.values[0, kv, c]
                               for c in columns]
                    errors.append(float((outputs[1] - outputs[0]).norm() / outputs[0].norm()))
        offset += len(read)
    assert KVzip.sinks == 4 and len(errors) == 4 * 4 * len(measured)
    return sum(errors) / len(errors)


def test_fidelity_measured_reconstruction_positions_are_copies_spread_and_held_out(fidelity):
    """The measured reconstruction queries read copied context tokens, evenly spread over the context, never
    at a position a refitting summary fits to unless every read position is one."""
    inputs = [(4, 54, [7, 8, 9] + list(range(100, 150))), (54, 80, [5, 6] + list(range(200, 226)))]
    assert fidelity.reference_positions(53 + 28) == list(range(81))  # fewer than REFERENCE_POSITIONS: all
    assert fidelity.reference_positions(1000)[:3] == [0, 3, 7]  # 256 of 1000
    # held out: copies 4..52 (indices 0..48), then 55..80; every 7.5th
    assert fidelity.measured_positions(inputs, 10, {3}) == [4, 11, 19, 26, 34, 41, 49, 58, 66, 73]
    assert fidelity.measured_positions(inputs, 500, {0, 1, 2, 3, 60}) == \
        list(range(4, 53)) + list(range(55, 60)) + list(range(61, 81))
    assert fidelity.measured_positions(inputs, 2, set(range(81))) == [3, 41]  # nothing held out: all copies


def test_fidelity_reconstruction_pass_gives_the_librarys_scores_and_reference_queries(fidelity):
    """The benchmark's pass, from captured activations, against ntkkv's own reconstruction pass over a
    prefilled cache: the same scores per layer, and the same reference queries handed to a refitting summary."""
    from test_kvzip import RecordingRefit

    import ntkkv
    from ntkkv.cache import CompressedCache
    from ntkkv.generation import _prefill
    from ntkkv.policies import KVzip
    from ntkkv.reconstruction import reconstructing, reconstruction_prompt

    model, tokenizer, ids = bench_model_and_prompt(fidelity)
    policy = KVzip(48, chunk_size=50)
    captured = fidelity.reconstruction_pass(model, tokenizer, ids, policy, 40)
    summary, cache = RecordingRefit(), CompressedCache(config=model.config)
    with torch.no_grad(), ntkkv.compress(model, policy, summary=summary), \
            reconstructing(model, cache, prompt=reconstruction_prompt(tokenizer)) as run:
        _prefill(model, ids, torch.ones_like(ids), cache)
    assert len(run.scores) == len(captured.scores) == len(summary.queries) == 4
    for expected, got in zip(run.scores, captured.scores):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert (got[..., :4] == 0).all() and (got[..., 4:] > 0).all()
    for expected, got in zip(summary.queries, captured.references):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
