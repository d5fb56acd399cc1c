"""Byte-level BPE tokenizer with reserved ids for domains and EOS.

Ids 0-7 are domain tokens (docs/method.md, "Data conventions": the first token of
every training sequence is overwritten by one), id 8 is EOS. A slot the user
named is `<|domain:NAME|>`, an unnamed one `<|domain:K|>` with K its number, so
tokenizer.json alone carries the names: nothing is stored beside it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from selfreplay.data.corpus import iter_batches
from selfreplay.errors import SelfReplayError, one_line
from selfreplay.rundir import write_atomic

NUM_DOMAIN_SLOTS = 8
EOS_ID = NUM_DOMAIN_SLOTS
EOS_TOKEN = "<|eos|>"
NUM_SPECIAL = NUM_DOMAIN_SLOTS + 1
NUM_BYTES = 256
TOKENIZER_FILE = "tokenizer.json"
_DOMAIN_TOKEN = re.compile(r"<\|domain:([A-Za-z0-9_.-]+)\|>")
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def domain_token(name_or_slot: str | int) -> str:
    return f"<|domain:{name_or_slot}|>"


class Tokenizer:
    """A `tokenizers.Tokenizer` with the reserved-id layout checked and named."""

    def __init__(self, tok: tokenizers.Tokenizer, where: str = "tokenizer"):
        # Hash before touching any setting, so the fingerprint is that of the saved JSON.
        self.fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]
        names = [tok.id_to_token(i) for i in range(NUM_DOMAIN_SLOTS)]
        matches = [_DOMAIN_TOKEN.fullmatch(n or "") for n in names]
        if not all(matches) or tok.id_to_token(EOS_ID) != EOS_TOKEN:
            raise SelfReplayError(f"{where} is not a selfreplay tokenizer (ids 0-7 must be <|domain:...|>, "
                                  f"id 8 {EOS_TOKEN}): train one with `selfreplay tokenizer train`")
        slots = [m.group(1) for m in matches]
        self.domain_ids = {name: i for i, name in enumerate(slots) if name != str(i)}
        # Literal "<|eos|>" in a document stays text: the only EOS ids are the ones we add.
        tok.encode_special_tokens = True
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, encoded in parallel by the Rust library (no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def domain_id(self, name_or_slot: str | int) -> int:
        """The id of a named domain, or of a slot given as its number (0-7, int or string)."""
        key = str(name_or_slot)
        if key in self.domain_ids:
            return self.domain_ids[key]
        if key.isdigit() and int(key) < NUM_DOMAIN_SLOTS:
            return int(key)
        known = ", ".join(self.domain_ids) or "no names"
        raise SelfReplayError(f"unknown domain {key!r}: this tokenizer knows {known} "
                              f"(or give a slot number 0-{NUM_DOMAIN_SLOTS - 1})")

    def domain_name(self, id: int) -> str:
        """The name of domain id `id`, or its slot number as a string if unnamed."""
        if not 0 <= id < NUM_DOMAIN_SLOTS:
            raise SelfReplayError(f"id {id} is not a domain id (those are 0-{NUM_DOMAIN_SLOTS - 1})")
        return next((name for name, i in self.domain_ids.items() if i == id), str(id))

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json`; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: self._tok.save(str(tmp)))  # a kill leaves no half-written tokenizer
        return path

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok


def check_domain_names(domains: Sequence[str]) -> None:
    if len(domains) > NUM_DOMAIN_SLOTS:
        raise SelfReplayError(f"{len(domains)} domain names given, at most {NUM_DOMAIN_SLOTS} fit the reserved ids")
    for name in domains:
        if not _DOMAIN_NAME.fullmatch(name):
            raise SelfReplayError(f"bad domain name {name!r}: use letters, digits, '_', '.' and '-'")
        if name.isdigit():
            raise SelfReplayError(f"bad domain name {name!r}: plain numbers stand for slot numbers; add a letter")
    repeated = sorted({d for d in domains if list(domains).count(d) > 1})
    if repeated:
        raise SelfReplayError(f"domain names must be unique, repeated: {', '.join(repeated)}")


def train_tokenizer(corpus: str | Sequence[str], vocab_size: int, out_dir: str | Path,
                    domains: Sequence[str] = (), text_field: str = "text") -> Tokenizer:
    """Train byte-level BPE on one or more corpora and save `out_dir/tokenizer.json`.

    `vocab_size` counts every id: 8 domain slots, EOS, 256 bytes and the merges.
    A small corpus may run out of merges first; `Tokenizer.vocab_size` is the real size.
    """
    corpora = [corpus] if isinstance(corpus, str) else list(corpus)
    domains = list(domains)
    check_domain_names(domains)
    if vocab_size < NUM_SPECIAL + NUM_BYTES:
        raise SelfReplayError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least "
                              f"{NUM_SPECIAL + NUM_BYTES} ({NUM_SPECIAL} reserved ids + {NUM_BYTES} bytes)")
    if not corpora:
        raise SelfReplayError("no corpus given to train the tokenizer on")
    batches = [iter_batches(c, text_field) for c in corpora]  # checks every source before training
    specials = [domain_token(domains[i] if i < len(domains) else i) for i in range(NUM_DOMAIN_SLOTS)]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*specials, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((batch for b in batches for batch in b), trainer)
    tokenizer = Tokenizer(tok)
    tokenizer.save(out_dir)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in `path`: a directory holding tokenizer.json, or the file itself."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise SelfReplayError(f"no tokenizer at {file}: train one with `selfreplay tokenizer train`")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a bare Exception for a bad file
        raise SelfReplayError(f"could not read tokenizer {file}: {one_line(e)}") from None
    return Tokenizer(tok, where=str(file))
