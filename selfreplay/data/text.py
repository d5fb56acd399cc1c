"""New-task data for a Hugging Face model, tokenized with the model's own tokenizer.

- Text (`.jsonl`, `.jsonl.gz`, `.txt`, `hf:NAME[:CONFIG[:SPLIT]]`, as in selfreplay.data.corpus):
  each document as the tokenizer encodes it (with BOS where the tokenizer adds one),
  EOS after each, all joined and cut into rows of T tokens; every token counts.
- Conversations (a `messages` field of {role, content} turns): one row per
  conversation through the chat template, cut at T; only the assistant's tokens count.

Rows are dicts {"input_ids", "labels"} with labels -100 where a token does not count
(the transformers convention); `pad_batch` right-pads them into a batch.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from selfreplay.data.chat import assistant_tokens
from selfreplay.data.corpus import iter_batches, parse_hf_source
from selfreplay.errors import SelfReplayError, one_line

IGNORE = -100  # label of a token whose prediction does not count


RUN_TEXT_FIELD = "data.text_field=FIELD"  # the setting that names the text field of a run's data


def pack_text(source: str, tokenizer, T: int, text_field: str = "text",
              setting: str = RUN_TEXT_FIELD) -> list[dict]:
    """Rows of exactly T tokens cut from the documents of `source` joined by EOS.

    `setting` is how the caller's front end chooses `text_field`, named when a record lacks it.
    """
    rows = pack_documents(iter_batches(source, text_field, setting=setting), tokenizer, T)
    if not rows:
        raise SelfReplayError(f"{source} holds fewer tokens than one sequence of {T}")
    return rows


def pack_documents(batches: Iterable[list[str]], tokenizer, T: int) -> list[dict]:
    """Lists of documents encoded (BOS where the tokenizer adds one), EOS after each, joined, cut into T."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SelfReplayError("the tokenizer has no EOS token to put between documents: set tokenizer.eos_token")
    chunks = [np.zeros(0, dtype=np.int64)]
    for batch in batches:
        # verbose=False: a document longer than the model's context is expected here, it is cut into rows
        for ids in tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]:
            chunks.append(np.asarray(ids if ids and ids[-1] == eos else [*ids, eos], dtype=np.int64))
    tokens = np.concatenate(chunks)
    rows = len(tokens) // T
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in tokens[: rows * T].reshape(rows, T)]


def conversation_row(tokenizer, messages: object, T: int, where: str = "conversation") -> dict:
    """One conversation through the chat template, cut at T tokens; labels on the assistant's tokens."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise SelfReplayError(f"{where}: messages must be a list of {{role, content}} turns")
    ids, mask = assistant_tokens(tokenizer, messages)
    return {"input_ids": ids[:T], "labels": [t if m else IGNORE for t, m in zip(ids[:T], mask[:T])]}


def chat_rows(source: str, tokenizer, T: int, field: str = "messages") -> list[dict]:
    """One row per conversation of `source` (a conversation cut before any answer is dropped)."""
    rows = [conversation_row(tokenizer, messages, T, where) for where, messages in iter_field(source, field)]
    rows = [r for r in rows if any(label != IGNORE for label in r["labels"][1:])]
    if not rows:
        raise SelfReplayError(f"{source} holds no conversation with an assistant turn within {T} tokens")
    return rows


def load_rows(source: str, tokenizer, T: int, text_field: str = "text", chat_field: str = "messages",
              setting: str = RUN_TEXT_FIELD) -> list[dict]:
    """Conversations when the first record of a JSONL file or dataset has `chat_field`, packed text otherwise
    (`setting` as in `pack_text`)."""
    if holds_conversations(source, chat_field):
        return chat_rows(source, tokenizer, T, chat_field)
    return pack_text(source, tokenizer, T, text_field, setting)


def holds_conversations(source: str, chat_field: str = "messages") -> bool:
    """Whether the first record of a JSONL file or dataset has `chat_field`."""
    first = next(_records(source), (None, None))[1] if _holds_records(source) else None
    return isinstance(first, dict) and chat_field in first


def rows_from_dataset(dataset, tokenizer, T: int, text_field: str = "text", chat_field: str = "messages",
                      name: str = "the training dataset") -> list[dict]:
    """Rows from an in-memory dataset (a `datasets.Dataset` or a list of dicts), by its columns:
    tokenized rows ("input_ids", optional "labels") pass through; conversations; text.
    `name` is how errors call the dataset (the argument it was passed as)."""
    if not hasattr(dataset, "column_names") and not dataset:
        raise SelfReplayError(f"{name} is empty")  # a list of dicts: no first row to read the columns from
    columns = set(dataset.column_names if hasattr(dataset, "column_names") else dataset[0])
    if "input_ids" in columns:
        return [{"input_ids": list(r["input_ids"]), "labels": list(r.get("labels") or r["input_ids"])} for r in dataset]
    if chat_field in columns:
        return [conversation_row(tokenizer, r[chat_field], T, f"row {i}") for i, r in enumerate(dataset)]
    if text_field not in columns:
        raise SelfReplayError(f"{name} has no {text_field!r}, {chat_field!r} or 'input_ids' column "
                              f"(columns: {', '.join(sorted(columns))}): rename the text column to {text_field!r}")
    return pack_documents([[r[text_field] for r in dataset]], tokenizer, T)


def iter_field(source: str, field: str) -> Iterator[tuple[str, object]]:
    """(where, value of `field`) for each record of a JSONL file or a Hugging Face dataset."""
    if not _holds_records(source):
        raise SelfReplayError(f"conversations are read from .jsonl, .jsonl.gz or hf:NAME datasets, not {source}")
    for where, record in _records(source):
        if not isinstance(record, dict) or field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise SelfReplayError(f"{where}: no {field!r} field (fields: {fields})")
        yield where, record[field]


def _holds_records(source: str) -> bool:
    return str(source).startswith("hf:") or str(source).endswith((".jsonl", ".jsonl.gz"))


def _records(source: str) -> Iterator[tuple[str, object]]:
    source = str(source)
    if source.startswith("hf:"):
        yield from ((f"{source} row {i}", r) for i, r in enumerate(_hf_records(source), 1))
        return
    path = Path(source)
    if not path.is_file():
        raise SelfReplayError(f"corpus not found: {source}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise SelfReplayError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None


def _hf_records(source: str):
    import datasets

    name, config, split = parse_hf_source(source)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types; all mean "could not load"
        raise SelfReplayError(f"could not load dataset {source}: {one_line(e)}") from None


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, t] True on each token whose label counts: the `mask` the losses take (on the predicted token)."""
    return labels != IGNORE


def pad_id(tokenizer) -> int:
    """The id that right-pads rows and stopped samples: the tokenizer's pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(rows: list[dict], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows into {"input_ids": [B, t], "labels": [B, t]} (labels -100 on padding);
    t is `width`, or the longest row's length."""
    width = width or max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.as_tensor(r["labels"])
    return {"input_ids": ids, "labels": labels}
