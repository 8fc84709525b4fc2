"""LongBench: its tasks, prompts and answer lengths; loading its data; building model inputs.

The prompt templates and per-task new-token limits are LongBench's (THUDM/LongBench,
config/dataset2prompt.json and dataset2maxlen.json), so that scores stay comparable
with published tables.
"""
import logging
import os
import random
import zipfile

logger = logging.getLogger(__name__)

ENGLISH_DATASETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
CHINESE_DATASETS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
ALL_DATASETS = ENGLISH_DATASETS + CHINESE_DATASETS
# LongBench-E: the tasks released with *_e.jsonl files, evenly spread over lengths
LONGBENCH_E_DATASETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# few-shot and code tasks whose prompts are completions, not instructions: no chat template
NO_CHAT_DATASETS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
REQUIRED_KEYS = ("input", "context", "answers", "_id")
HUB_REPOSITORY = "THUDM/LongBench"

DATASET_MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}

_MULTI_HOP_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered"
    " based on the information in the article, write \"unanswerable\". If the question is a yes/no question,"
    " answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
)
_NARRATIVE_RULES = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."

DATASET_PROMPT = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        + _NARRATIVE_RULES + "\n\nStory: {context}\n\nNow, answer the question based on the story "
        + _NARRATIVE_RULES + "\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
        + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULES
        + "\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on"
        " the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
        "不要输出任何其他字词。\n\n问题：{input}\n回答："
    ),
    "hotpotqa": _MULTI_HOP_QA,
    "2wikimqa": _MULTI_HOP_QA,
    "musique": _MULTI_HOP_QA,
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in"
        " one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting"
        " transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words."
        " The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully"
        " read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In"
        " other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final"
        " count of unique paragraphs after removing duplicates. The output format should only contain the number,"
        " such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the"
        " abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of"
        " the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\","
        " etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n"
        "{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}


def check_dataset_names(datasets):
    """Raise ValueError naming any dataset that is not a LongBench task."""
    unknown = [name for name in datasets if name not in DATASET_PROMPT]
    if unknown:
        raise ValueError(
            f"unknown LongBench dataset {', '.join(map(repr, unknown))}; choose from: {', '.join(ALL_DATASETS)}"
        )


def dataset_file(data_dir, dataset, longbench_e=False):
    """Path of a dataset's .jsonl file in `data_dir`, checked to exist."""
    check_dataset_names([dataset])
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"LongBench data folder {data_dir!r} does not exist: unzip LongBench's data.zip there"
            " (or pass --download to fetch it from the Hugging Face hub)"
        )
    file_name = f"{dataset}_e.jsonl" if longbench_e else f"{dataset}.jsonl"
    path = os.path.join(data_dir, file_name)
    if not os.path.isfile(path):
        present = sorted(name for name in os.listdir(data_dir) if name.endswith(".jsonl"))
        raise FileNotFoundError(
            f"no {file_name} in {data_dir!r}; it holds: {', '.join(present) or 'no .jsonl files'}"
        )
    return path


def check_example_keys(examples, path):
    for index, example in enumerate(examples, start=1):
        missing = [key for key in REQUIRED_KEYS if key not in example]
        if missing:
            raise ValueError(
                f"{path}: record {index} lacks {', '.join(missing)}; LongBench records need {', '.join(REQUIRED_KEYS)}"
            )


def download_longbench(data_dir):
    """Fetch LongBench's data.zip from the Hugging Face hub and unpack its .jsonl files into `data_dir`."""
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(HUB_REPOSITORY, "data.zip", repo_type="dataset")
    os.makedirs(data_dir, exist_ok=True)
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.namelist():
            if member.endswith(".jsonl"):
                target = os.path.join(data_dir, os.path.basename(member))
                with bundle.open(member) as source, open(target, "wb") as destination:
                    destination.write(source.read())
    logger.info("unpacked LongBench into %s", data_dir)


def select_examples(examples, max_num_examples=None, sample_method="topk", seed=42):
    """The first `max_num_examples` ("topk") or a seeded random sample of them ("random")."""
    if not max_num_examples or len(examples) <= max_num_examples:
        return list(examples)
    if sample_method == "topk":
        return list(examples[:max_num_examples])
    if sample_method == "random":
        return random.Random(seed).sample(list(examples), max_num_examples)
    raise ValueError(f"unknown sample_method {sample_method!r}; choose one of: random, topk")


def format_prompt(dataset, example):
    return DATASET_PROMPT[dataset].format(context=example["context"], input=example["input"])


def uses_chat_template(dataset, tokenizer, chat_template=True):
    """Whether the dataset's prompt is wrapped in the tokenizer's chat template."""
    return chat_template and dataset not in NO_CHAT_DATASETS and bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, text, chat):
    """Token ids of the prompt as the model sees it (chat-wrapped or with the tokenizer's own special tokens)."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        # the rendered template already holds its special tokens (BOS included)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def middle_truncate(token_ids, max_tokens):
    """Keep the first and last halves of `token_ids` so that `max_tokens` remain."""
    if len(token_ids) <= max_tokens:
        return list(token_ids)
    head = max_tokens // 2
    return list(token_ids[:head]) + list(token_ids[len(token_ids) - (max_tokens - head):])


def build_prompt_ids(tokenizer, prompt, max_prompt_tokens, chat):
    """Token ids of `prompt`, middle-truncated so that the model's input is at most `max_prompt_tokens`.

    As in LongBench, the raw prompt is cut at the token level, decoded and re-encoded
    (then wrapped in the chat template); re-encoding at the cut can add a token or two,
    so the cut is repeated until the input fits.
    """
    input_ids = encode(tokenizer, prompt, chat)
    raw_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = len(raw_ids)
    while len(input_ids) > max_prompt_tokens:
        keep -= len(input_ids) - max_prompt_tokens
        if keep <= 0:
            raise ValueError(
                f"max prompt length {max_prompt_tokens} leaves no room for the prompt next to the chat template"
            )
        kept_ids = middle_truncate(raw_ids, keep)
        head = keep // 2
        text = tokenizer.decode(kept_ids[:head], skip_special_tokens=True) + tokenizer.decode(
            kept_ids[head:], skip_special_tokens=True
        )
        input_ids = encode(tokenizer, text, chat)
    return input_ids


def model_context_length(model):
    """The longest input the model's config allows (max_position_embeddings)."""
    config = model.config
    length = getattr(config, "max_position_embeddings", None)
    if length is None and hasattr(config, "get_text_config"):
        length = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not length:
        raise ValueError("the model's config gives no max_position_embeddings; pass --max_length")
    return int(length)


def max_prompt_length(model, max_new_tokens, max_length=None):
    """Tokens a prompt may take: --max_length, else the model's context minus the answer's room."""
    if max_length:
        return int(max_length)
    return model_context_length(model) - max_new_tokens


def _as_list(token_ids):
    if token_ids is None:
        return []
    return list(token_ids) if isinstance(token_ids, (list, tuple)) else [token_ids]


def end_of_turn_token_id(tokenizer):
    """The special token the chat template closes an assistant turn with, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "ANSWER_END_MARKER"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception as error:  # templates raise their own jinja errors for unsupported turns
        logger.debug("chat template did not render an assistant turn: %s", error)
        return None
    if marker not in rendered:
        return None
    after_answer = rendered.split(marker, 1)[1]
    ids = tokenizer(after_answer, add_special_tokens=False)["input_ids"]
    special_ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special_ids else None


def stop_token_ids(tokenizer, model=None):
    """EOS ids of the tokenizer and the model's generation config, plus the chat template's end of turn."""
    ids = _as_list(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    ids += _as_list(getattr(generation_config, "eos_token_id", None))
    ids.append(end_of_turn_token_id(tokenizer))
    return sorted({token_id for token_id in ids if token_id is not None})
