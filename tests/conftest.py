"""Shared fixtures: tiny saved model folders with an offline tokenizer, and the embedded SmolLM2."""

import os

# no model hub here or in CI: a hub id fails at once instead of waiting on the network (set before
# huggingface_hub is first imported, which reads it once)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tiny import tiny_model  # noqa: E402


def make_tiny_tokenizer(vocab_size=320):
    """A byte-level BPE fast tokenizer trained on two pangrams; <unk>, <s>, </s> are ids 0, 1, 2; no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pangrams = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]
    backend.train_from_iterator(pangrams, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir(family="llama") -> folder holding tests/tiny.py's model and a tokenizer."""

    def build(family="llama"):
        tokenizer = make_tiny_tokenizer()
        model = tiny_model(family)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        folder = tmp_path / f"tiny-{family}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return build


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32 on the CPU (~40 s, once per session)."""
    from ntkkv.models import load_model

    return load_model("smollm2", dtype="float32")


def pytest_collection_modifyitems(items):
    """Tests on the embedded SmolLM2 are slow (its load, ~20-40 s, is shared): `-m "not slow"` leaves them out."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
