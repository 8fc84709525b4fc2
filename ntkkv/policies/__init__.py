"""Selection policies by name. A new policy is one file here and one line in `_REGISTRY`."""

from __future__ import annotations

import dataclasses

from .adakv import AdaKV, AdaPyramidKV
from .base import Policy, SelectionInputs
from .h2o import H2O
from .headkv import HeadKV
from .kvzip import AdaKVzip, AdaPyramidKVzip, KVzip, PyramidKVzip
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

_REGISTRY: dict[str, type[Policy] | None] = {
    "fullkv": None,  # no compression: the model is left untouched
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "ada_pyramidkv": AdaPyramidKV,
    "headkv": HeadKV,
    "kvzip": KVzip,
    "pyramid_kvzip": PyramidKVzip,
    "ada_kvzip": AdaKVzip,
    "ada_pyramid_kvzip": AdaPyramidKVzip,
}
METHODS = tuple(_REGISTRY)
ALIASES = {"full": "fullkv"}  # the needle seed's name for full KV
STREAMING_SINKS = 4  # the original harness's StreamingLLM window is budget - 4


def canonical_name(method: str) -> str:
    """'SnapKV' -> 'snapkv'; an unknown name raises, naming the allowed ones."""
    name = str(method).lower()
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return name


def build_policy(method: str, max_capacity_prompt=2048, window_size=None, **params) -> Policy | None:
    """The policy object for `method` (None for fullkv), with the original harness's defaults:
    window 8, and for StreamingLLM a window of budget - 4 (four sink tokens)."""
    cls = _REGISTRY[canonical_name(method)]
    if cls is None:
        return None
    if window_size is None:
        streaming = cls is StreamingLLM and isinstance(max_capacity_prompt, int) \
            and not isinstance(max_capacity_prompt, bool) and params.get("max_capacity_prompt_ratio") is None
        if streaming and max_capacity_prompt <= STREAMING_SINKS + 1:
            raise ValueError(f"max_capacity_prompt must be an integer larger than {STREAMING_SINKS + 1} for "
                             f"streamingllm ({STREAMING_SINKS} sink tokens and a window), got {max_capacity_prompt!r}")
        window_size = max_capacity_prompt - STREAMING_SINKS if streaming else 8
        if cls is StreamingLLM:
            params["sinks"] = STREAMING_SINKS
    fields = {field.name for field in dataclasses.fields(cls)} - {"max_capacity_prompt", "window_size"}
    wrong = sorted(set(params) - fields)
    if wrong:
        raise ValueError(f"option {', '.join(wrong)} does not apply to method {cls.name!r}; its options are: "
                         f"{', '.join(sorted(fields))}")
    return cls(max_capacity_prompt, window_size, **params)


__all__ = [
    "H2O",
    "AdaKV",
    "AdaKVzip",
    "AdaPyramidKVzip",
    "AdaPyramidKV",
    "HeadKV",
    "KVzip",
    "METHODS",
    "Policy",
    "PyramidKV",
    "PyramidKVzip",
    "SelectionInputs",
    "SnapKV",
    "StreamingLLM",
    "build_policy",
    "canonical_name",
]
