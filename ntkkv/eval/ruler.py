"""RULER: its synthetic tasks built here for any context length and tokenizer, its files read as
KVCache-Factory ships them, its samples answered with a compressed KV cache, and its scores.

The tasks, their settings, prompt wording, answer prefixes, answer lengths and metrics are RULER's
(NVIDIA/RULER: scripts/synthetic.yaml, scripts/data/synthetic/, scripts/eval/synthetic/constants.py),
so that scores compare with published tables. The code is this project's own, and so are a few
choices RULER leaves to its packages (docs/ruler.md lists them): the word lists ship here (RULER
draws from the wonderwords package), sentences are split by a rule (RULER uses nltk's punkt), and
every sample is built to its length on its own, so that sample i is the same whatever the others.

Prediction files go where KVCache-Factory puts them:
save_dir/{model_name}_{max_capacity_prompts}/{length}/{task}/{method}.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string
import uuid
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from ntkkv.eval import longbench, longbench_run
from ntkkv.eval.jsonl import read_jsonl, read_predictions
from ntkkv.eval.longbench_run import Shard
from ntkkv.eval.needle import default_haystack_dir, haystack_files
from ntkkv.eval.predict import append_predictions
from ntkkv.eval.scoring import methods_in
from ntkkv.models import context_length

# --- words -----------------------------------------------------------------------------------------------

# RULER draws keys (adjective-noun) and the common-words lists from the wonderwords package's lists; these
# ship here instead, so that a seed gives the same samples everywhere, offline. No word of the three lists
# is part of another (string match would count "plum" as found in "plump").
ADJECTIVES = tuple("""
absent active afraid alert ancient angry anxious awake aware
bald bashful bitter bland blind bold bored brave breezy bright brisk broad brown bumpy busy
calm candid careful cheap chilly civic clever cloudy clumsy coastal cosmic costly cozy crisp crooked cruel
curious cyan
damp daring dark dear deep dense direct dizzy dreamy dry dusty
eager early earnest easy elder elegant empty equal exotic
faint fancy fast fearless fierce filthy firm flat fluffy fond formal fragile frank free fresh frosty frugal
fuzzy
gentle giant giddy glad glossy golden grand greedy green grumpy guilty
handy happy hardy hasty heavy hollow honest humble hungry
idle
jolly jovial juicy
keen kind
lavish lazy legal lively lonely loyal lucky lumpy
magic major marine mellow merry mighty mild misty modern modest moist muddy murky mute
narrow neat nervous nimble noble noisy numb
odd orange
pale patient plain plump polite proud purple
quick quiet
rapid rare ready regal rigid ripe robust rosy rough royal rural rusty
sacred salty sandy scarlet shaggy sharp shiny shy silent silky silly sleepy slim slow smoky smooth snowy sober
soft solar sour spicy stale steady steep sticky stormy strict sturdy sunny super sweet swift
tame tangy tender tense thirsty tidy tiny tough tricky tropical
upbeat urban
vague vast velvet violet vivid
wary weary wicked wild windy wise witty wooden
yellow young
zany zealous
""".split())
NOUNS = tuple("""
acorn anchor antelope apple apron atlas attic avocado
badge bagel balloon bamboo banjo barrel basket beacon beaver bicycle biscuit blanket blossom bonnet bottle
boulder bracelet breeze bridge brook bucket buffalo bugle butter button
cabin cactus camel canal candle canoe canyon carpet carrot castle cattle cavern cello chalk cherry chimney cider
circus cliff clock clover cobra coconut comet compass copper coral cottage cougar crater crayon cricket crystal
cupboard curtain cushion
dagger daisy desert diamond dolphin donkey dragon drum
eagle easel elbow ember emerald engine
falcon feather fiddle flamingo flute forest fountain fox
galaxy garden garlic gazelle geyser ginger giraffe glacier goblet gondola gopher grape guitar
hammer harbor hazel hedgehog helmet heron hippo honey hornet
iceberg igloo island ivory
jacket jaguar jasmine jelly jewel journal
kayak kettle kitten koala
ladder lagoon lantern lemon leopard lettuce library lily lizard llama lobster locket lotus
magnet mango maple marble meadow melon meteor mirror mitten monkey moose mosaic muffin mushroom
napkin nectar needle noodle nutmeg
oasis ocean octopus olive onion orchard orchid ostrich otter owl oyster
paddle palace panda panther parrot peach peanut pebble pelican penguin pepper piano pickle pigeon pillow pine
pirate pistachio planet pocket pony poppy potato puddle pumpkin puppet
quartz quill
rabbit raccoon radish rainbow raven reef ribbon river robin rocket
saddle salmon sapphire satchel scarf scooter seagull shovel silver sketch sled sparrow spider sponge squid
squirrel statue stork sunflower swan
tablet teapot temple thistle thunder tiger timber toad tomato tortoise tractor trumpet tulip tunnel turnip
turtle
umbrella unicorn
valley vase village violin volcano
wagon walnut walrus whale whistle willow window wizard wolf
yacht
zebra zipper
""".split())
VERBS = tuple("""
admire adopt arrive
bake balance bargain blink bounce breathe build burrow
chase cheer chirp climb collect comfort compose cook crawl create
dance debate decorate deliver dive doodle drift
enjoy explore
fetch flicker float flourish forgive
gallop gather giggle glide glow gossip grin guard
hover hurry
imagine inspect invent
juggle jump
knit
laugh launch linger listen
march measure mend mingle murmur
navigate nibble
observe orbit
paint polish ponder pounce prance
question
ramble relax rescue ripple roam rumble
sail scatter scribble shimmer shiver sing skate slumber sneeze soar sparkle splash sprint stroll swim swirl
thrive tickle travel tumble twirl
unfold
vanish
wander whisper wiggle wobble
yawn yodel
zoom
""".split())
SINGLE_WORDS = tuple(sorted(ADJECTIVES + NOUNS + VERBS))


def compound_word(number):
    """The `number`-th adjective-noun pair ("brave-otter"): RULER's key words, and common words beyond the lists."""
    adjective, noun = divmod(number, len(NOUNS))
    return f"{ADJECTIVES[adjective]}-{NOUNS[noun]}"


COMPOUND_WORDS = len(ADJECTIVES) * len(NOUNS)

# --- prompt wording (RULER's, to the letter: scores depend on it) -------------------------------------------

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {value_type} for {key} is: {value}."
# the 40 depths (percent of the essay's sentences) RULER draws needle positions from
DEPTHS = tuple(int(depth) for depth in np.round(np.linspace(0, 100, num=40)))
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {count} variables are"
             " assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the"
                " ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above"
                " list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most"
                " frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore"
                " the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output any"
                  " other words.")
QA_TEMPLATE = (QA_INSTRUCTION + "\n\nThe following are given documents.\n\n{context}\n\n" + QA_INSTRUCTION
               + "\n\nQuestion: {query}")
QA_PREFIX = " Answer:"
QA_DOCUMENT = "Document {number}:\n{text}"


def niah_wording(value_type, plural):
    """(opening, question, answer prefix) of a needle task: RULER words it in the singular when one value is asked."""
    noun = value_type if plural else value_type[:-1]
    verb, some = ("are", "Some") if plural else ("is", "A")
    ask = "What are all the" if plural else "What is the"
    return (f"{some} special magic {noun} {verb} hidden within the following text. Make sure to memorize it. I will"
            f" quiz you about the {noun} afterwards.\n",
            f"\n{ask} special magic {noun} for {{query}} mentioned in the provided text?",
            f" The special magic {noun} for {{query}} mentioned in the provided text {verb}")


# --- building blocks -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rendered:
    """One sample at one haystack size: the user's text, the answer prefix, the answers and where things sit."""

    text: str
    answer_prefix: str
    outputs: list
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a task draws a sample from: its name, target length, index, the texts it uses and the tokenizer's count."""

    task: str
    length: int
    index: int
    sources: Sources
    count_tokens: object
    """text -> its number of tokens (no special tokens), as RULER counts them."""


def join_pieces(pieces, separator):
    """The text of (text, tag) pieces joined by `separator`, and {tag: character offset} of the tagged ones."""
    offsets, position = {}, 0
    for number, (text, tag) in enumerate(pieces):
        position += len(separator) if number else 0
        if tag is not None:
            offsets[tag] = position
        position += len(text)
    return separator.join(text for text, _ in pieces), offsets


def insert_lines(lines, inserts, rng):
    """`inserts` ((text, tag) pieces) placed in order among `lines` (pieces), each before a distinct line
    drawn at random, as RULER places needles and chains in a haystack of lines."""
    slots = sorted(rng.sample(range(len(lines)), len(inserts)))
    pieces = list(lines)
    for shift, (slot, insert) in enumerate(zip(slots, inserts)):
        pieces.insert(slot + shift, insert)
    return pieces


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def split_sentences(text):
    """Sentences of `text`, split after . ! or ? (and a closing quote or bracket) followed by whitespace."""
    return [sentence for sentence in SENTENCE_END.split(text.strip()) if sentence]


def random_value(kind, rng):
    """A key or value as RULER draws them: a 7-digit number, an adjective-noun word, or a UUID."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return compound_word(rng.randrange(COMPOUND_WORDS))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; choose one of: numbers, uuids, words")


def distinct_values(kind, count, rng):
    values = []
    while len(values) < count:
        value = random_value(kind, rng)
        if value not in values:
            values.append(value)
    return values


def series(items):
    """Keys as RULER lists them: 'a', 'a, and b', 'a, b, and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def zeta(alpha):
    """Riemann's zeta(alpha) for alpha > 1 (RULER takes scipy's): 64 terms, then the Euler-Maclaurin tail."""
    n = 64
    tail = (n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12
            - alpha * (alpha + 1) * (alpha + 2) * n ** (-alpha - 3) / 720)
    return sum(k ** -alpha for k in range(1, n)) + tail


# --- the tasks -----------------------------------------------------------------------------------------------

# per kind of task, RULER's answer room (scripts/data/synthetic/constants.py) and metric (scripts/eval/synthetic)
ANSWER_TOKENS = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120, "freq_words_extraction": 50,
                 "qa": 32}
KIND_METRICS = {"niah": "string_match_all", "variable_tracking": "string_match_all",
                "common_words_extraction": "string_match_all", "freq_words_extraction": "string_match_all",
                "qa": "string_match_part"}


class Task:
    """One kind of RULER task. A sample is drawn once (draw: keys, values, words...), then rendered at any
    haystack size (render(drawn, units, rng, setting)); lowest(drawn) is the smallest size that holds it,
    highest(drawn) the largest there is material for (None: no end)."""

    kind: ClassVar[str]

    def highest(self, drawn):
        return None

    @property
    def max_new_tokens(self) -> int:
        return ANSWER_TOKENS[self.kind]

    @property
    def metric(self) -> str:
        return KIND_METRICS[self.kind]

@dataclasses.dataclass(frozen=True)
class Niah(Task):
    """Needles in a haystack: `keys` keys with `values` values each, `queries` of the keys asked for.
    haystack: "noise" (one filler paragraph repeated), "essay" (the Paul Graham essays) or "needle" (needles
    of other keys); units: paragraphs, essay words or distractor needles."""

    kind: ClassVar[str] = "niah"
    haystack: str
    key_type: str
    value_type: str
    keys: int = 1
    values: int = 1
    queries: int = 1

    def lowest(self, drawn):
        return 1 if self.haystack == "essay" else self.keys * self.values

    def draw(self, rng, setting):
        keys = distinct_values(self.key_type, self.keys, rng)
        values = [distinct_values(self.value_type, self.values, rng) for _ in keys]
        needles = [(key, value) for key, key_values in zip(keys, values) for value in key_values]
        rng.shuffle(needles)
        queried = rng.sample(range(self.keys), self.queries)
        return {"needles": needles, "query": [keys[number] for number in queried],
                "outputs": [value for number in queried for value in values[number]],
                "depths": rng.sample(DEPTHS, len(needles)) if self.haystack == "essay" else None,
                "distractor_seed": rng.getrandbits(64)}

    def needle(self, key, value):
        return NEEDLE.format(value_type=self.value_type, key=key, value=value)

    def distractors(self, drawn, units):
        """`units` needles of other keys, key and value drawn in turn, so that n of them start n + 1 of them."""
        rng = random.Random(drawn["distractor_seed"])
        real_keys = {key for key, _ in drawn["needles"]}
        lines = []
        while len(lines) < units:
            key = random_value(self.key_type, rng)
            if key not in real_keys:  # a distractor with a real key would make the answer ambiguous
                lines.append((self.needle(key, random_value(self.value_type, rng)), None))
        return lines

    def render(self, drawn, units, rng, setting):
        needles = [(self.needle(key, value), number) for number, (key, value) in enumerate(drawn["needles"])]
        if self.haystack == "essay":
            sentences = split_sentences(" ".join(first_words(setting.sources.essay_words(), units)))
            cuts = sorted(int(len(sentences) * depth / 100) for depth in drawn["depths"])
            pieces = [(sentence, None) for sentence in sentences]
            for shift, (cut, needle) in enumerate(zip(cuts, needles)):
                pieces.insert(cut + shift, needle)
            context, offsets = join_pieces(pieces, " ")
        else:
            if self.haystack == "noise":
                lines = [(NOISE, None)] * units
            else:
                lines = self.distractors(drawn, units)
            context, offsets = join_pieces(insert_lines(lines, needles, rng), "\n")
        opening, question, prefix = niah_wording(self.value_type, plural=self.queries * self.values > 1)
        query = series(drawn["query"])
        details = {"query": drawn["query"],
                   "needles": [{"key": key, "value": value, "offset": len(opening) + offsets[number],
                                "text": needles[number][0]} for number, (key, value) in enumerate(drawn["needles"])]}
        return Rendered(opening + context + question.format(query=query), prefix.format(query=query),
                        list(drawn["outputs"]), details)


@dataclasses.dataclass(frozen=True)
class VariableTracking(Task):
    """Chains of `hops` assignments (VAR B = VAR A) from a 5-digit value among noise paragraphs; the answer is
    every variable of the first chain. A worked example (3-letter names, about 500 tokens) comes first."""

    kind: ClassVar[str] = "variable_tracking"
    chains: int = 1
    hops: int = 4
    example_tokens: ClassVar[int] = 500

    def lowest(self, drawn):
        return self.chains * (self.hops + 1)

    def chain_statements(self, names, value):
        # RULER's hop statements end in a space
        return [f"VAR {names[0]} = {value}"] + [f"VAR {new} = VAR {old} " for old, new in zip(names, names[1:])]

    def draw_chains(self, rng, name_length, hops):
        names = []
        while len(names) < self.chains * (hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
            if name not in names:
                names.append(name)
        chains = [names[start : start + hops + 1] for start in range(0, len(names), hops + 1)]
        return chains, [str(rng.randint(10000, 99999)) for _ in chains]

    def chained_text(self, chains, values, units, rng):
        """(task text, answer prefix, {(chain, step): offset}) with the chains among `units` noise paragraphs."""
        pieces = [(NOISE, None)] * units
        for number, (names, value) in enumerate(zip(chains, values)):
            statements = self.chain_statements(names, value)
            pieces = insert_lines(pieces, [(text, (number, step)) for step, text in enumerate(statements)], rng)
        context, offsets = join_pieces(pieces, "\n")
        head = VT_TEMPLATE[: VT_TEMPLATE.index("{context}")]
        text = VT_TEMPLATE.format(context=context, query=values[0])
        prefix = VT_PREFIX.format(count=len(chains[0]), query=values[0])
        return text, prefix, {tag: len(head) + offset for tag, offset in offsets.items()}

    def draw(self, rng, setting):
        chains, values = self.draw_chains(rng, 5, self.hops)
        example_chains, example_values = self.draw_chains(rng, 3, min(10, self.hops))
        example_seed = rng.getrandbits(64)

        def example(units):
            text, prefix, _ = self.chained_text(example_chains, example_values, units,
                                                random.Random(f"{example_seed}:{units}"))
            return text + prefix

        # RULER's worked example: the task itself with at most 500 tokens, then its answer
        lowest = len(example_chains) * len(example_chains[0])
        units = largest_fitting(lambda units: setting.count_tokens(example(units)), self.example_tokens,
                                lowest) or lowest
        return {"chains": chains, "values": values,
                "example": example(units) + " " + " ".join(example_chains[0]) + "\n"}

    def render(self, drawn, units, rng, setting):
        text, prefix, offsets = self.chained_text(drawn["chains"], drawn["values"], units, rng)
        example = drawn["example"] + "\n"
        needles = [{"offset": len(example) + offset, "text": statement}
                   for (number, step), offset in sorted(offsets.items())
                   for statement in [self.chain_statements(drawn["chains"][number], drawn["values"][number])[step]]]
        return Rendered(example + text, prefix, list(drawn["chains"][0]),
                        {"query": drawn["values"][0], "needles": needles})


@dataclasses.dataclass(frozen=True)
class CommonWords(Task):
    """A numbered list of words: `common` of them `common_repeats` times each, the others `uncommon_repeats`
    times (6 and 1 below 4,096 tokens, as RULER); units: distinct words. A worked example comes first."""

    kind: ClassVar[str] = "common_words_extraction"
    common: int = 10
    common_repeats: int = 30
    uncommon_repeats: int = 3

    def lowest(self, drawn):
        return self.common + 1

    def repeats(self, length):
        """(example words, example common repeats, example uncommon repeats, task common, task uncommon)."""
        if length < 4096:
            return 20, 3, 1, 6, 1
        return 40, 10, 3, self.common_repeats, self.uncommon_repeats

    def numbered_list(self, words, common_repeats, uncommon_repeats, rng):
        listed = list(words[: self.common]) * common_repeats + list(words[self.common :]) * uncommon_repeats
        rng.shuffle(listed)
        return " ".join(f"{number}. {word}" for number, word in enumerate(listed, start=1))

    def draw(self, rng, setting):
        example_size, example_common, example_uncommon, _, _ = self.repeats(setting.length)
        example_words = rng.sample(SINGLE_WORDS, example_size)
        answer = " ".join(f"{number}. {word}" for number, word in enumerate(example_words[: self.common], start=1))
        example = (CWE_TEMPLATE.format(context=self.numbered_list(example_words, example_common, example_uncommon, rng))
                   + CWE_PREFIX + " " + answer)
        drawn = {"example": example, "words": rng.sample(SINGLE_WORDS, len(SINGLE_WORDS))}
        compound_order = random.Random(rng.getrandbits(64))
        # a length that all the single words cannot fill takes adjective-noun words throughout (RULER moves to a
        # larger English word list); decided once, so that the prompt grows steadily with the words
        everything = self.render(drawn, len(SINGLE_WORDS), random.Random(0), setting)
        if setting.count_tokens(everything.text + everything.answer_prefix) + self.max_new_tokens < setting.length:
            drawn["words"] = [compound_word(n) for n in compound_order.sample(range(COMPOUND_WORDS), COMPOUND_WORDS)]
        return drawn

    def highest(self, drawn):
        return len(drawn["words"])

    def words(self, drawn, units):
        return drawn["words"][:units]

    def render(self, drawn, units, rng, setting):
        _, _, _, common_repeats, uncommon_repeats = self.repeats(setting.length)
        words = self.words(drawn, units)
        context = self.numbered_list(words, common_repeats, uncommon_repeats, rng)
        return Rendered(drawn["example"] + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX,
                        list(words[: self.common]))


@dataclasses.dataclass(frozen=True)
class FrequentWords(Task):
    """Coded words (random 6-letter strings) drawn from a Zipf law of exponent `alpha`; the most frequent is
    '...', the answer the next three. units: words in the text."""

    kind: ClassVar[str] = "freq_words_extraction"
    alpha: float = 2.0
    word_length: int = 6

    def counts(self, vocabulary_size, units):
        scale = units / zeta(self.alpha)
        return [int(scale * rank ** -self.alpha) for rank in range(1, vocabulary_size + 1)]

    def lowest(self, drawn):
        """The fewest words whose three answers each appear, more often than the fifth-ranked word."""
        units = 1
        while True:
            counts = self.counts(len(drawn["vocabulary"]), units)
            if counts[3] > counts[4]:
                return units
            units += 1

    def draw(self, rng, setting):
        # RULER: a vocabulary of (length - answer room) / 50 words
        size = (setting.length - self.max_new_tokens) // 50
        if size < 5:
            shortest = 5 * 50 + self.max_new_tokens
            raise ValueError(f"length {setting.length} is too short for {setting.task}: its vocabulary, (length - "
                             f"{self.max_new_tokens}) / 50 words, needs at least 5 (length {shortest})")
        vocabulary = set()
        while len(vocabulary) < size:
            vocabulary.add("".join(rng.choices(string.ascii_lowercase, k=self.word_length)))
        vocabulary = sorted(vocabulary)
        rng.shuffle(vocabulary)
        return {"vocabulary": ["..."] + vocabulary[1:]}

    def render(self, drawn, units, rng, setting):
        vocabulary = drawn["vocabulary"]
        listed = [word for word, count in zip(vocabulary, self.counts(len(vocabulary), units)) for _ in range(count)]
        rng.shuffle(listed)
        return Rendered(FWE_TEMPLATE.format(context=" ".join(listed)), FWE_PREFIX, vocabulary[1:4])


@dataclasses.dataclass(frozen=True)
class QuestionAnswering(Task):
    """A question of SQuAD or HotpotQA with its own documents among others (first those of the same
    article), in random order; units: documents. Needs the data set's file in the QA folder."""

    kind: ClassVar[str] = "qa"
    dataset: str

    def lowest(self, drawn):
        return len(drawn["gold"])

    def highest(self, drawn):
        return None if drawn["extra"] else len(drawn["gold"])  # beyond all documents, they come again

    def draw(self, rng, setting):
        data = setting.sources.qa(self.dataset)
        item = data.questions[setting.index]
        related = rng.sample(item["related"], len(item["related"]))
        taken = set(item["gold"]) | set(related)
        others = [number for number in range(len(data.documents)) if number not in taken]
        rng.shuffle(others)
        return {"question": item["question"], "answers": item["answers"], "gold": item["gold"],
                "extra": related + others}

    def render(self, drawn, units, rng, setting):
        documents = setting.sources.qa(self.dataset).documents
        extra = drawn["extra"]
        chosen = list(drawn["gold"]) + [extra[number % len(extra)] for number in range(units - len(drawn["gold"]))]
        rng.shuffle(chosen)
        context = "\n\n".join(QA_DOCUMENT.format(number=number, text=documents[document])
                              for number, document in enumerate(chosen, start=1))
        gold = [number for number, document in enumerate(chosen, start=1) if document in drawn["gold"]]
        return Rendered(QA_TEMPLATE.format(context=context, query=drawn["question"]), QA_PREFIX,
                        list(drawn["answers"]), {"query": drawn["question"], "documents": gold})


# RULER's scripts/synthetic.yaml
TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", keys=4, queries=4),
    "vt": VariableTracking(chains=1, hops=4),
    "cwe": CommonWords(common=10, common_repeats=30, uncommon_repeats=3),
    "fwe": FrequentWords(alpha=2.0),
    "qa_1": QuestionAnswering("squad"),
    "qa_2": QuestionAnswering("hotpotqa"),
}
QA_TASKS = ("qa_1", "qa_2")
SYNTHETIC_TASKS = tuple(task for task in TASKS if task not in QA_TASKS)
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
QA_SOURCES = {"squad": "SQuAD 2.0's dev-v2.0.json", "hotpotqa": "HotpotQA's hotpot_dev_distractor_v1.json"}


def check_task_names(tasks):
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task {', '.join(map(repr, unknown))}; choose from: {', '.join(TASKS)}")


def task_names(requested=None, qa_dir=None):
    """The tasks of a run: those requested, else RULER's 13 (the two QA tasks only with a QA folder)."""
    if requested is not None:
        tasks = [task.strip() for item in requested for task in str(item).split(",") if task.strip()]
        if not tasks:
            raise ValueError(f"--tasks names no task; choose from: {', '.join(TASKS)}")
        check_task_names(tasks)
        return list(dict.fromkeys(tasks))
    return list(TASKS) if qa_dir else list(SYNTHETIC_TASKS)


def check_lengths(lengths, config=None):
    """Positive lengths, none beyond the model's context (its config's max_position_embeddings)."""
    bad = [length for length in lengths if length < 1]
    if bad:
        raise ValueError(f"lengths must be positive numbers of tokens, got {', '.join(map(str, bad))}")
    limit = context_length(config) if config is not None else None
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"length {max(lengths)} exceeds the model's maximum of {limit} tokens; "
                         f"choose --lengths <= {limit}")
    return [int(length) for length in lengths]


# --- the texts the tasks draw on ----------------------------------------------------------------------------

@dataclasses.dataclass
class QaData:
    documents: list
    questions: list
    """Each {"question", "answers", "gold": its document numbers, "related": the other documents of its article}."""


def read_squad(path):
    """SQuAD's answerable questions; documents are the distinct paragraphs, in sorted order (as RULER)."""
    with open(path, encoding="utf-8") as handle:
        articles = json.load(handle)["data"]
    documents = sorted({paragraph["context"] for article in articles for paragraph in article["paragraphs"]})
    number = {text: position for position, text in enumerate(documents)}
    questions = []
    for article in articles:
        article_documents = [number[paragraph["context"]] for paragraph in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            own = number[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible", False):
                    questions.append({"question": qa["question"], "answers": [a["text"] for a in qa["answers"]],
                                      "gold": [own], "related": [d for d in article_documents if d != own]})
    return QaData(documents, questions)


def read_hotpotqa(path):
    """HotpotQA's questions, each with all its paragraphs (supporting and distracting) as its own documents."""
    with open(path, encoding="utf-8") as handle:
        items = json.load(handle)
    documents = sorted({f"{title}\n{''.join(sentences)}" for item in items for title, sentences in item["context"]})
    number = {text: position for position, text in enumerate(documents)}
    questions = [{"question": item["question"], "answers": [item["answer"]], "related": [],
                  "gold": [number[f"{title}\n{''.join(sentences)}"] for title, sentences in item["context"]]}
                 for item in items]
    return QaData(documents, questions)


class Sources:
    """The texts the tasks draw on, each read once when first needed: the essays (`haystack_dir`, default
    ntkkv.eval.needle's) and the QA data sets (`qa_dir`, holding squad.json and hotpotqa.json)."""

    def __init__(self, haystack_dir=None, qa_dir=None):
        self.haystack_dir = haystack_dir
        self.qa_dir = qa_dir
        self._essay_words = None
        self._qa = {}

    def essay_words(self):
        if self._essay_words is None:
            files = haystack_files(self.haystack_dir if self.haystack_dir is not None else default_haystack_dir())
            self._essay_words = "\n".join(path.read_text(encoding="utf-8") for path in files).split()
        return self._essay_words

    def qa_path(self, task):
        dataset = TASKS[task].dataset
        file_name = QA_FILES[dataset]
        note = (f"{task} needs {QA_SOURCES[dataset]} saved as {file_name} (RULER's download_qa_dataset.sh does "
                "this)")
        if self.qa_dir is None:
            raise ValueError(f"{note}: pass --qa_dir, the folder holding it")
        if not os.path.isdir(self.qa_dir):
            raise FileNotFoundError(f"QA folder {str(self.qa_dir)!r} does not exist; {note}")
        path = os.path.join(self.qa_dir, file_name)
        if not os.path.isfile(path):
            present = sorted(name for name in os.listdir(self.qa_dir) if name.endswith(".json"))
            raise FileNotFoundError(f"no {file_name} in {str(self.qa_dir)!r} ({note}); it holds: "
                                    f"{', '.join(present) or 'no .json files'}")
        return path

    def qa(self, dataset):
        if dataset not in self._qa:
            task = next(task for task in QA_TASKS if TASKS[task].dataset == dataset)
            reader = read_squad if dataset == "squad" else read_hotpotqa
            try:
                self._qa[dataset] = reader(self.qa_path(task))
            except (KeyError, TypeError, json.JSONDecodeError) as error:
                raise ValueError(f"{self.qa_path(task)} is not a {QA_SOURCES[dataset]} file: {error!r}") from None
        return self._qa[dataset]

    def check(self, tasks, num_samples=None):
        """Read what `tasks` need now, so that a missing folder or file stops a run before the model loads."""
        if any(getattr(TASKS[task], "haystack", None) == "essay" for task in tasks):
            self.essay_words()
        for task in tasks:
            if task in QA_TASKS:
                questions = len(self.qa(TASKS[task].dataset).questions)
                if num_samples is not None and num_samples > questions:
                    raise ValueError(f"{task} has {questions} questions: ask for at most --num_samples {questions}")


def first_words(words, count):
    """The first `count` words of the essays, repeated from the start as often as needed (as RULER)."""
    repeats = -(-count // len(words))
    return (words * repeats)[:count] if repeats > 1 else words[:count]


# --- samples ------------------------------------------------------------------------------------------------

def model_input(tokenizer, text, answer_prefix, chat):
    """The text the model reads: the task in the chat template's user turn and the answer prefix opening the
    assistant's turn (as RULER's model templates place them), or, without chat, the two run together."""
    if not chat:
        return text + answer_prefix
    turn = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return turn + answer_prefix


def prompt_ids(tokenizer, text, answer_prefix, chat):
    """Token ids of the model's input (a rendered chat template holds its own special tokens)."""
    return tokenizer(model_input(tokenizer, text, answer_prefix, chat), add_special_tokens=not chat)["input_ids"]


def largest_fitting(measure, budget, lowest, highest=None):
    """The largest n in [lowest, highest] with measure(n) <= budget, or None if `lowest` does not fit.
    measure(n) (the tokens of a prompt with n haystack units) grows about linearly with n: secant steps find
    the neighbourhood, then a gallop and a bisection the boundary."""
    known = {}

    def fits(n):
        if highest is not None and n > highest:
            return False
        if n not in known:
            known[n] = measure(n)
        return known[n] <= budget

    if not fits(lowest):
        return None
    guess = lowest + 8
    for _ in range(2):
        if not fits(guess) and guess not in known:  # beyond `highest`
            break
        slope = max((known[guess] - known[lowest]) / (guess - lowest), 1e-3)
        guess = lowest + max(1, int((budget - known[lowest]) / slope))
    if fits(guess):
        low, step = guess, 1
        while fits(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        high, step = guess, 1
        while high - step > lowest and not fits(high - step):
            high, step = high - step, step * 2
        low = max(high - step, lowest)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def sample_id(task, length, seed, index):
    return f"{task}-{length}-seed{seed}-{index}"


class SampleBuilder:
    """Sample `index` of `task` at `length` tokens, for one tokenizer: what it draws once, and its prompt at
    any haystack size (units), each size built and tokenised once."""

    def __init__(self, tokenizer, task, length, index, seed=42, chat=True, sources=None):
        check_task_names([task])
        self.tokenizer, self.task, self.length, self.index, self.seed, self.chat = (
            tokenizer, task, length, index, seed, chat)
        self.spec = TASKS[task]
        self.base = f"{seed}:{task}:{length}:{index}"
        self.setting = Setting(task, length, index, sources if sources is not None else Sources(),
                               lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        self.drawn = self.spec.draw(random.Random(self.base), self.setting)
        self.lowest = self.spec.lowest(self.drawn)
        self.budget = length - self.spec.max_new_tokens
        self.built = {}

    def tokens(self, units):
        if units not in self.built:
            rendered = self.spec.render(self.drawn, units, random.Random(f"{self.base}:{units}"), self.setting)
            self.built[units] = rendered, prompt_ids(self.tokenizer, rendered.text, rendered.answer_prefix, self.chat)
        return len(self.built[units][1])

    def check_smallest_fits(self):
        if self.tokens(self.lowest) > self.budget:
            raise ValueError(f"length {self.length} is too short for {self.task}: its smallest prompt takes "
                             f"{self.tokens(self.lowest)} tokens with this tokenizer, and the answer "
                             f"{self.spec.max_new_tokens} more")

    def sample(self):
        self.check_smallest_fits()
        rendered, ids = self.built[largest_fitting(self.tokens, self.budget, self.lowest,
                                                   self.spec.highest(self.drawn))]
        record = {"_id": sample_id(self.task, self.length, self.seed, self.index), "index": self.index,
                  "task": self.task, "length": self.length, "input": rendered.text,
                  "answer_prefix": rendered.answer_prefix, "outputs": rendered.outputs, **rendered.details}
        return record, ids


def make_sample(tokenizer, task, length, index, seed=42, chat=True, sources=None):
    """Sample `index` of `task` built to `length` tokens: (record, prompt token ids).

    The haystack grows until the model's input (chat template and answer prefix included) plus the task's
    answer room (max_new_tokens) just fits `length` tokens. The record holds RULER's fields (`index`,
    `input`: the user's text, `answer_prefix`, `outputs`: the answers, `length`: the target) and where the
    needles sit (`needles`: their character offsets in `input`; QA: the gold `documents`). Everything
    random comes from (seed, task, length, index): a sample does not depend on the others.
    """
    return SampleBuilder(tokenizer, task, length, index, seed, chat, sources).sample()


def sample_stubs(task, length, num_samples, seed=42):
    """What a run asks for before building anything: the `_id` and index of each sample (built when pending)."""
    return [{"_id": sample_id(task, length, seed, index), "index": index, "seed": seed}
            for index in range(num_samples)]


def build_samples(tokenizer, task, length, stubs, chat_template=True, sources=None, done_ids=()):
    """The records of the stubs' samples not in `done_ids`, built now: a length too short for any of them
    raises ValueError before the run writes anything."""
    chat = longbench.uses_chat_template(task, tokenizer, chat_template)
    return [make_sample(tokenizer, task, length, stub["index"], stub["seed"], chat, sources)[0]
            for stub in stubs if stub["_id"] not in done_ids]


def check_fits(tokenizer, tasks, lengths, chat_template=True, sources=None, seed=42):
    """Raise ValueError if a task's smallest prompt does not fit a length (checked before anything is written)."""
    for length in lengths:
        for task in tasks:
            chat = longbench.uses_chat_template(task, tokenizer, chat_template)
            SampleBuilder(tokenizer, task, length, 0, seed, chat, sources).check_smallest_fits()


# --- RULER files, as KVCache-Factory ships them (data/RULER/{length}/{task}.jsonl) ----------------------------

REQUIRED_KEYS = ("input", "outputs")


def data_file(data_dir, length, task):
    """Path of `task`'s file for `length` in a KVCache-Factory RULER folder, checked to exist."""
    check_task_names([task])
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"RULER data folder {str(data_dir)!r} does not exist (it should hold "
                                "{length}/{task}.jsonl files, as KVCache-Factory's data/RULER)")
    folder = os.path.join(data_dir, str(length))
    if not os.path.isdir(folder):
        present = sorted(name for name in os.listdir(data_dir) if name.isdigit())
        raise FileNotFoundError(f"no folder {length} in {str(data_dir)!r}; it holds lengths: "
                                f"{', '.join(present) or 'none'}")
    path = os.path.join(folder, f"{task}.jsonl")
    if not os.path.isfile(path):
        present = sorted(name for name in os.listdir(folder) if name.endswith(".jsonl"))
        raise FileNotFoundError(f"no {task}.jsonl in {folder!r}; it holds: {', '.join(present) or 'no .jsonl files'}")
    return path


def answer_prefix_marker(task):
    """The first characters of the task's answer prefix, by which RULER finds where the prefix starts."""
    spec = TASKS[task]
    prefix = {"niah": niah_wording("values", True)[2], "variable_tracking": VT_PREFIX,
              "common_words_extraction": CWE_PREFIX, "freq_words_extraction": FWE_PREFIX, "qa": QA_PREFIX}[spec.kind]
    return prefix[:10]


def split_answer_prefix(task, text):
    """(user text, answer prefix) of an input that holds its answer prefix at the end (older RULER files,
    KVCache-Factory's): cut at the last start of the task's prefix, as RULER does; ('text', '') if absent."""
    cut = text.rfind(answer_prefix_marker(task))
    return (text, "") if cut < 0 else (text[:cut], text[cut:])


def read_task_file(path, task, length, on_bad_line="stop"):
    """Records of a RULER file (`index`, `input`, `outputs`, `length`), each given an `_id`, its `task` and its
    `answer_prefix` (split off the input when the file has none)."""
    records = []
    for line, record in enumerate(read_jsonl(path, on_bad_line), start=1):
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ValueError(f"{path}: record {line} lacks {', '.join(missing)}; RULER records need "
                             f"{', '.join(REQUIRED_KEYS)} (and index, length)")
        outputs = record["outputs"]
        if not isinstance(outputs, list) or not outputs or not all(isinstance(output, str) for output in outputs):
            raise ValueError(f"{path}: record {line}'s outputs must be a non-empty list of strings, got {outputs!r}")
        record = {**record, "task": task}
        record.setdefault("index", line - 1)
        if "answer_prefix" not in record:
            record["input"], record["answer_prefix"] = split_answer_prefix(task, record["input"])
        # by position in the file: RULER's own `index` can repeat (its niah writes the answer's offset there)
        record["_id"] = f"{task}-{length}-record{line}"
        records.append(record)
    return records


# --- runs ---------------------------------------------------------------------------------------------------

def prediction_path(save_dir, model_name, label, length, task, method):
    """save_dir/{model_name}_{label}/{length}/{task}/{method}.json, KVCache-Factory's layout."""
    return os.path.join(save_dir, f"{model_name}_{label}", str(length), task, f"{method}.json")


def run_task(model, tokenizer, task, length, examples, output_path, settings, shard=Shard(), on_bad_line="stop",
             sources=None):
    """Append predictions for this shard's samples of `task` at `length` not yet in `output_path` (or its parts).

    examples: records read from a RULER file, or `sample_stubs` (samples built here, only those pending).
    Greedy answers of at most the task's max_new_tokens (RULER's), ending at EOS or the chat template's
    end of turn. Returns the mean kept K/V entries per layer of each sample written.
    """
    spec = TASKS[task]
    chat = longbench.uses_chat_template(task, tokenizer, settings.chat_template)
    limit = context_length(model)

    def prepare(pending):
        items = []
        for example in tqdm(pending, desc=f"building {task} {length}", unit="sample", leave=False,
                            disable=not pending):
            if "input" in example:
                record, ids = example, prompt_ids(tokenizer, example["input"], example["answer_prefix"], chat)
            else:
                record, ids = make_sample(tokenizer, task, length, example["index"], example["seed"], chat, sources)
            if limit is not None and len(ids) + spec.max_new_tokens > limit:
                raise ValueError(f"{task} sample {record['index']} takes {len(ids)} tokens with this tokenizer, and "
                                 f"its answer {spec.max_new_tokens}: more than the model's {limit}")
            items.append((record, ids))
        return items

    return append_predictions(
        model, tokenizer, examples, prepare, output_path, settings, spec.max_new_tokens,
        longbench.stop_token_ids(tokenizer, model), longbench_run.generate_batch, shard, on_bad_line,
        desc=f"{task} {length} {settings.method}",
    )


# --- scores ---------------------------------------------------------------------------------------------------

def string_match_all(prediction, references):
    """The share of the references found in the prediction (case-insensitive): RULER's per-sample score."""
    if not references:
        return 0.0
    prediction = prediction.lower()
    return sum(reference.lower() in prediction for reference in references) / len(references)


def string_match_part(prediction, references):
    """1 if any reference is in the prediction (case-insensitive), else 0."""
    prediction = prediction.lower()
    return float(any(reference.lower() in prediction for reference in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def references(record):
    """A record's answers: RULER's `outputs`, or `answers` (KVCache-Factory's predictions)."""
    answers = record["outputs"] if "outputs" in record else record["answers"]
    return [answers] if isinstance(answers, str) else list(answers)


def task_score(task, records):
    """RULER's score of a task: the mean per-sample score ×100, rounded to two decimals (None: no samples)."""
    if not records:
        return None
    metric = METRICS[TASKS[task].metric]
    return round(100 * sum(metric(record["pred"], references(record)) for record in records) / len(records), 2)


def find_prediction_folders(results_dir):
    """[(group, length, task, folder)] for every .../{length}/{task} folder under `results_dir`; `group` is the
    path between results_dir and the length folder (e.g. 'llama-3-8b-instruct_128'), '' when there is none."""
    found = []
    root = os.path.abspath(results_dir)
    for folder, subfolders, _ in os.walk(root):
        subfolders.sort()
        length_folder = os.path.dirname(folder)
        if folder == root or os.path.basename(folder) not in TASKS or not os.path.basename(length_folder).isdigit():
            continue
        group = "" if length_folder == root else os.path.relpath(os.path.dirname(length_folder), root)
        group = "" if group == "." else group
        found.append((group, int(os.path.basename(length_folder)), os.path.basename(folder), folder))
    return found


def score_results(results_dir, on_bad_line="stop"):
    """Score every prediction file under `results_dir`; write metrics.json into each task folder
    ({method: {"score", "samples", "empty", "metric"}}). Returns {(row label, length): {task: score}},
    the row label being 'group/method' or 'method'."""
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"results folder {results_dir!r} does not exist")
    table = {}
    for group, length, task, folder in find_prediction_folders(results_dir):
        folder_metrics = {}
        for method in methods_in(folder):
            records = read_predictions(os.path.join(folder, f"{method}.json"), on_bad_line)
            score = task_score(task, records)
            folder_metrics[method] = {"score": score, "samples": len(records), "metric": TASKS[task].metric,
                                      "empty": sum(not record["pred"].strip() for record in records)}
            table.setdefault((f"{group}/{method}" if group else method, length), {})[task] = score
        with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(folder_metrics, handle, ensure_ascii=False, indent=2)
    return table


def table_rows(table):
    """Header and rows of the (method, length) × tasks table, with the average over each row's tasks."""
    tasks = [task for task in TASKS if any(task in scores for scores in table.values())]
    rows = []
    for label, length in sorted(table, key=lambda key: (key[0].lower(), key[1])):
        cells = [table[label, length].get(task) for task in tasks]
        present = [cell for cell in cells if cell is not None]
        rows.append([label, length] + cells + [round(sum(present) / len(present), 2) if present else None])
    return ["method", "length"] + tasks + ["average"], rows

