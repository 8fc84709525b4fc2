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


def test_fidelity_benchmark_tiny_run_prints_its_table(tmp_path, capsys):
    """benchmarks/bench_fidelity.py end to end on a tiny random model: eviction's error is what a plain
    softmax over SnapKV's kept tokens gives, the exact summary has no error, a state that cannot fit
    says so, and the JSON is written."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity.py"
    spec = importlib.util.spec_from_file_location("bench_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fidelity.md"
    assert module.main(["--tiny", "--device", "cpu", "--lengths", "120", "--budgets", "48", "--methods", "snapkv",
                        "--summaries", "none", "merge_variance", "taylor2", "exact", "--state_budgets", "0.25",
                        "--decode_tokens", "3", "--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    rows = {line.split("|")[4].strip(): line for line in table.splitlines() if line.startswith("| 120 |")}
    assert float(rows["none"].split("|")[6]) == pytest.approx(eviction_error(module), abs=6e-4)  # printed to 3 digits
    assert rows["exact"].split("|")[6].strip() == "0.000"
    assert "does not fit" in rows["taylor2 0.25"]
    assert float(rows["merge_variance 0.25"].split("|")[5]) <= 48
    assert len(__import__("json").loads(out.with_suffix(".json").read_text())) == 4


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
