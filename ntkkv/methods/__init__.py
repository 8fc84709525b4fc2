"""Selection policies by name. A new method is one file here and one line in `_REGISTRY`."""

from __future__ import annotations

from .base import Method, SelectionInputs
from .h2o import H2O
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

_REGISTRY: dict[str, type[Method] | None] = {
    "fullkv": None,  # no compression: the model is left untouched
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
}
METHODS = tuple(_REGISTRY)
STREAMING_SINKS = 4  # the original harness's StreamingLLM window is budget - 4


def canonical_name(method: str) -> str:
    """'SnapKV' -> 'snapkv'; an unknown name raises, naming the allowed ones."""
    name = str(method).lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return name


def build_method(method: str, max_capacity_prompt=2048, window_size=None, **params) -> Method | None:
    """The policy object for `method` (None for fullkv), with the original harness's defaults."""
    cls = _REGISTRY[canonical_name(method)]
    if cls is None:
        return None
    if window_size is None:
        streaming = cls is StreamingLLM and isinstance(max_capacity_prompt, int)
        window_size = max_capacity_prompt - STREAMING_SINKS if streaming else 8
        if streaming:
            params["sinks"] = STREAMING_SINKS
    return cls(max_capacity_prompt=max_capacity_prompt, window_size=window_size, **params)


__all__ = [
    "H2O",
    "METHODS",
    "Method",
    "PyramidKV",
    "SelectionInputs",
    "SnapKV",
    "StreamingLLM",
    "build_method",
    "canonical_name",
]
