"""The compression flags the runners share reach ntkkv.compress, and bad ones stop before any load."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ntkkv.eval.options import add_compression_arguments, compression_options

ROOT = Path(__file__).resolve().parents[1]


def test_flags_given_become_compress_arguments_and_unset_ones_stay_default():
    parser = argparse.ArgumentParser()
    add_compression_arguments(parser)
    assert compression_options(parser.parse_args([])) == {}
    args = parser.parse_args(["--window_size", "32", "--pooling", "avgpool", "--kernel_size", "5",
                              "--gqa_reduce", "max"])
    assert compression_options(args) == {"window_size": 32, "pooling": "avgpool", "kernel_size": 5, "gqa_reduce": "max"}


@pytest.mark.slow  # a subprocess: a fresh interpreter imports torch and transformers
@pytest.mark.parametrize("script, extra", [
    ("run_needle_in_haystack.py", ["-s", "1000", "-e", "2000", "--method", "snapkv"]),
    ("run_longbench.py", ["--method", "snapkv", "--model_path", "smollm2", "--save_dir", "unused"]),
])
@pytest.mark.parametrize("flags, message", [
    (["--pooling", "sumpool"], "unknown pooling 'sumpool'; choose one of: avgpool, maxpool"),
    (["--window_size", "0"], "window_size must be a positive integer, got 0"),
])
def test_bad_compression_flags_stop_the_runners_with_a_clear_message(script, extra, flags, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / script), *extra, *flags], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
