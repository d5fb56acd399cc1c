"""Text corpora as a stream of documents.

A corpus is named by one string:

- `FILE.jsonl` or `FILE.jsonl.gz`: one JSON object per line, the text in a field
  (`text` unless told otherwise); blank lines are skipped.
- `FILE.txt`: one document per block of lines, blocks separated by blank lines.
- `hf:NAME[:CONFIG[:SPLIT]]`: a Hugging Face dataset (split `train` unless told),
  streamed, so a large one is never downloaded whole first. NAME may be a local
  directory of JSON/JSONL files.

Empty documents are skipped: they would only add an EOS token. A corpus with no
documents at all is an error, found when the stream ends.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from selfreplay.errors import SelfReplayError, one_line

CORPUS_KINDS = ".jsonl, .jsonl.gz, .txt or hf:NAME[:CONFIG[:SPLIT]]"


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG[:SPLIT]]` -> (NAME, CONFIG or None, SPLIT, default "train")."""
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise SelfReplayError(f"bad dataset name {source!r}: write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts + ["", ""])[:3]
    return name, config or None, split or "train"


def iter_documents(source: str, text_field: str = "text", setting: str = "--text-field") -> Iterator[str]:
    """The documents (non-empty strings) of a corpus, in order.

    The source is checked at once (file exists, kind is known, `datasets` is
    installed); bad lines and an empty corpus raise while iterating. `setting`: how the caller's
    front end chooses the text field, named when a record lacks it.
    """
    source = str(source)
    if source.startswith("hf:"):
        return _counted(_hf_documents(_hf_rows(source), source, text_field, setting), source)
    path = Path(source)
    if path.is_dir():
        raise SelfReplayError(f"{source} is a directory, not a corpus file: give a {CORPUS_KINDS} "
                              f"(for a directory of JSON files write hf:{source})")
    if not path.is_file():
        raise SelfReplayError(f"corpus not found: {source}")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return _counted(_jsonl_documents(path, text_field, setting), source)
    if path.name.endswith(".txt"):
        return _counted(_txt_documents(path), source)
    raise SelfReplayError(f"unknown corpus kind for {source}: use {CORPUS_KINDS}")


def iter_batches(source: str, text_field: str = "text", batch_size: int = 1024,
                 setting: str = "--text-field") -> Iterator[list[str]]:
    """The documents of a corpus in lists of up to `batch_size` (for batch tokenization)."""
    documents = iter_documents(source, text_field, setting)
    return iter(lambda: list(islice(documents, batch_size)), [])


def _counted(documents: Iterable[str], source: str) -> Iterator[str]:
    count = 0
    for text in documents:
        if text:
            count += 1
            yield text
    if count == 0:
        raise SelfReplayError(f"corpus {source} holds no documents: check the file (or the split) is not empty")


def _jsonl_documents(path: Path, text_field: str, setting: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _field(line, text_field, f"{path}:{lineno}", setting)
    except UnicodeDecodeError as e:
        raise SelfReplayError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:  # a truncated or non-gzip .gz file
        raise SelfReplayError(f"could not read {path}: {one_line(e)}") from None


def _field(line: str, text_field: str, where: str, setting: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SelfReplayError(f"{where}: not a JSON line ({e.msg} at column {e.colno})") from None
    return _text(record, text_field, where, setting)


def _text(record: object, text_field: str, where: str, setting: str) -> str:
    if not isinstance(record, dict):
        raise SelfReplayError(f"{where}: expected a JSON object with a {text_field!r} field, "
                              f"got a {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise SelfReplayError(f"{where}: no {text_field!r} field (fields: {fields}): "
                              f"choose one with {setting}")
    text = record[text_field]
    if not isinstance(text, str):
        raise SelfReplayError(f"{where}: field {text_field!r} holds {type(text).__name__}, not a string")
    return text


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
    except UnicodeDecodeError as e:
        raise SelfReplayError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None
    if block:
        yield "".join(block).rstrip("\n")


def _hf_rows(source: str) -> Iterator[dict]:
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError:
        raise SelfReplayError(f"reading {source} needs the datasets package: pip install selfreplay[hf]") from None
    try:
        return iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as e:  # datasets raises many types; all mean "could not load"
        raise SelfReplayError(f"could not load dataset {source}: {one_line(e)}") from None


def _hf_documents(rows: Iterator[dict], source: str, text_field: str, setting: str) -> Iterator[str]:
    row = 0
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a bad file inside the dataset shows up only while streaming
            raise SelfReplayError(f"could not read dataset {source} after row {row}: {one_line(e)}") from None
        row += 1
        yield _text(record, text_field, f"{source} row {row}", setting)
