"""ntkkv: KV-cache compression for decoder LLMs on current transformers.

Names are imported on first use, so that `ntkkv.eval` scoring starts without loading
transformers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "patch", "replace_llama": "patch", "replace_mistral": "patch", "replace_qwen2": "patch",
    "CompressedCache": "cache", "CompressedLayer": "cache", "kv_lengths": "cache", "state_sizes": "cache",
    "GenerationResult": "generation", "generate": "generation", "load_model": "models",
    "METHODS": "policies", "SnapKV": "policies", "PyramidKV": "policies", "H2O": "policies",
    "StreamingLLM": "policies", "AdaKV": "policies", "AdaPyramidKV": "policies", "HeadKV": "policies",
    "KVzip": "policies", "PyramidKVzip": "policies",
    "SUMMARIES": "summaries", "Merge": "summaries", "MergeVariance": "summaries", "Taylor": "summaries",
    "SeedTaylor": "summaries", "Learned": "summaries", "Fitted": "summaries", "CAM": "summaries",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ntkkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
