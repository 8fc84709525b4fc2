"""benchmarks/bench_speed.py in its CPU toy mode: every method runs, the table is written, OOM is survived."""

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import ntkkv

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed.py"
FAST = ["--device", "cpu", "--tiny", "--lengths", "160", "--budget", "32", "--decode-steps", "2", "--repeats", "1",
        "--warmup", "0"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_speed"]


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| 160 |")]


def test_tiny_cpu_run_writes_table(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert bench.main(FAST + ["--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    assert "CPU" in table and "budget 32" in table
    rows = table_rows(table)
    assert [row.split("|")[2].strip() for row in rows] == list(ntkkv.METHODS)
    kv_held = {row.split("|")[2].strip(): row.split("|")[8].strip() for row in rows}
    assert kv_held["fullkv"] == "160"
    for method in ("streamingllm", "h2o", "snapkv"):
        assert kv_held[method] == "32"
    assert kv_held["pyramidkv"].startswith("32 (")  # falling per-layer budgets averaging the budget


def test_out_of_memory_is_recorded_and_the_run_goes_on(bench, monkeypatch, capsys):
    real_compress = ntkkv.compress

    @contextmanager
    def compress(model, method, **params):
        with real_compress(model, method=method, **params):
            if method == "snapkv":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            yield model

    monkeypatch.setattr(ntkkv, "compress", compress)
    assert bench.main(FAST + ["--methods", "fullkv,snapkv,h2o"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row.split("|")[2].strip() for row in rows] == ["fullkv", "snapkv", "h2o"]
    assert "OOM" not in rows[0] and "OOM" not in rows[2]
    assert rows[1].split("|")[3].strip() == "OOM"


def test_unknown_method_is_refused(bench):
    with pytest.raises(ValueError, match=r"unknown method 'snapkv2'; choose one of: .*pyramidkv"):
        bench.main(FAST + ["--methods", "snapkv2"])


def test_fidelity_benchmark_tiny_run_prints_its_table(tmp_path, capsys):
    """benchmarks/bench_fidelity.py end to end on a tiny random model: eviction is 1.00 of itself,
    the exact kernel has no error, a state that cannot fit says so, and the JSON is written."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity.py"
    spec = importlib.util.spec_from_file_location("bench_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fidelity.md"
    assert module.main(["--tiny", "--device", "cpu", "--lengths", "120", "--budgets", "48", "--methods", "snapkv",
                        "--kernels", "none", "merge_variance", "taylor2", "exact", "--state_budgets", "0.25",
                        "--decode_tokens", "3", "--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    rows = {line.split("|")[4].strip(): line for line in table.splitlines() if line.startswith("| 120 |")}
    assert rows["none"].split("|")[7].strip() == "1.00"
    assert rows["exact"].split("|")[6].strip() == "0.000"
    assert "does not fit" in rows["taylor2 0.25"]
    assert float(rows["merge_variance 0.25"].split("|")[5]) <= 48
    assert len(__import__("json").loads(out.with_suffix(".json").read_text())) == 4
