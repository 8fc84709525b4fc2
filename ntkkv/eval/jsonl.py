"""JSON-lines files that survive being killed: durable appends, tolerant reads, part merging.

A prediction file is appended one complete line at a time (flush + fsync), so a kill
loses at most the line being written; readers drop such a trailing partial line and
appenders cut it off before writing.  Data-parallel ranks write `NAME.partR.jsonl`
beside `NAME.json`; `merge_parts` folds them into `NAME.json`.
"""
import contextlib
import fcntl
import glob
import json
import logging
import os

logger = logging.getLogger(__name__)

BAD_LINE_POLICIES = ("stop", "skip")


class BadLineError(ValueError):
    """A line of a JSON-lines file is not valid JSON."""


def read_jsonl(path, on_bad_line="stop"):
    """All records of a JSON-lines file.

    A last line without its newline that does not parse is what a kill mid-write leaves:
    it is dropped with a warning.  Any other malformed line raises BadLineError naming
    the file and line (on_bad_line="stop") or is skipped with a warning ("skip").
    """
    if on_bad_line not in BAD_LINE_POLICIES:
        raise ValueError(f"unknown on_bad_line {on_bad_line!r}; choose one of: {', '.join(BAD_LINE_POLICIES)}")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # text after the last newline: empty for a complete file
    unterminated = lines.pop()
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            message = f"{path}:{line_number}: malformed JSON line ({error.msg}, column {error.colno})"
            if on_bad_line == "stop":
                raise BadLineError(message + "; pass --on_bad_line skip to skip such lines") from None
            logger.warning("%s; skipped", message)
    if unterminated.strip():
        try:
            records.append(json.loads(unterminated))
        except json.JSONDecodeError:
            logger.warning("%s:%d: dropped an unfinished last line (an interrupted write)", path, len(lines) + 1)
    return records


def trim_partial_tail(path):
    """Cut a file back to its last newline, so that the next append starts a fresh line."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        keep = handle.read().rfind(b"\n") + 1
        logger.warning("%s: cut an unfinished last line (%d bytes)", path, size - keep)
        handle.truncate(keep)


class JsonlAppender:
    """Appends records to a JSON-lines file, each line flushed and fsynced on its own. The file (and
    its folder) is created at the first record, so a run that fails before any leaves nothing behind."""

    def __init__(self, path):
        self.path = path
        self.handle = None

    def write(self, record):
        if self.handle is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if os.path.exists(self.path):
                trim_partial_tail(self.path)
            self.handle = open(self.path, "a", encoding="utf-8")
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self):
        if self.handle is not None:
            self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def part_path(final_path, rank):
    """Where data-parallel rank `rank` writes its share of `final_path`."""
    return f"{os.path.splitext(final_path)[0]}.part{rank}.jsonl"


def existing_parts(final_path):
    stem = glob.escape(os.path.splitext(final_path)[0])
    return sorted(glob.glob(f"{stem}.part*.jsonl"))


def read_predictions(final_path, on_bad_line="stop"):
    """Records of a prediction file and of any part files beside it, first copy of each _id."""
    paths = [final_path] if os.path.exists(final_path) else []
    records, seen_ids = [], set()
    for path in paths + existing_parts(final_path):
        for record in read_jsonl(path, on_bad_line):
            sample_id = record.get("_id")
            if sample_id is not None and sample_id in seen_ids:
                continue
            seen_ids.add(sample_id)
            records.append(record)
    return records


@contextlib.contextmanager
def directory_lock(path):
    """Exclusive lock on the folder holding `path` (no lock file left behind)."""
    directory_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(directory_fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(directory_fd)


def merge_parts(final_path, on_bad_line="stop"):
    """Fold the part files into `final_path` (atomically), then delete them.

    Returns how many records the merged file holds (None when there was nothing to
    merge).  Call it only when no rank is still writing a part.
    """
    with directory_lock(final_path):
        parts = existing_parts(final_path)
        if not parts:
            return None
        records = read_predictions(final_path, on_bad_line)
        temporary_path = final_path + ".merging"
        with open(temporary_path, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_path, final_path)
        for part in parts:
            os.remove(part)
    return len(records)
