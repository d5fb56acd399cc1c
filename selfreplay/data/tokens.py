"""Token files: a corpus as one flat array of token ids, with a JSON sidecar.

The data file is raw little-endian uint16 (read it with
`np.memmap(path, dtype=np.uint16, mode="r")`), each document followed by EOS:
doc1 EOS doc2 EOS ... The metadata lives at `FILE.json` and says which
tokenizer made the file, so a run can refuse tokens from another one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields
from itertools import chain
from pathlib import Path

import numpy as np

from selfreplay.data.corpus import iter_batches
from selfreplay.data.tokenizer import Tokenizer
from selfreplay.errors import SelfReplayError, one_line

FORMAT_VERSION = 1
DTYPE = np.dtype("<u2")
BATCH_DOCUMENTS = 1024  # documents per encode_batch call: enough to keep every core busy


@dataclass
class TokenFileMeta:
    """What a token file holds and which tokenizer made it."""

    domain: str  # domain name, or the slot number if the slot is unnamed
    domain_id: int
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    num_documents: int  # documents with at least one token in the file (the last may be cut by max_tokens)
    num_tokens: int
    source: str  # the corpus as given
    seconds: float  # time spent reading and tokenizing
    dtype: str = "uint16"
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TokenFileMeta:
        """Parse metadata; raises ValueError/KeyError/TypeError on a bad one (callers add the path)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"format version {data['version']} is newer than this selfreplay reads "
                             f"({FORMAT_VERSION}); upgrade selfreplay")
        missing = [f.name for f in fields(cls) if f.name not in data and f.name not in ("dtype", "version")]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def metadata_path(path: str | Path) -> Path:
    """The sidecar of token file `path`: `path` + ".json"."""
    return Path(str(path) + ".json")


def write_token_file(corpus: str, tokenizer: Tokenizer, domain: str | int, out: str | Path,
                     max_tokens: int | None = None, text_field: str = "text") -> TokenFileMeta:
    """Tokenize `corpus` into the token file `out` (+ `out.json`), stopping after `max_tokens`.

    Written to temporary files and moved into place only when complete, so a
    failure leaves any earlier file at `out` as it was.
    """
    if tokenizer.vocab_size > np.iinfo(DTYPE).max + 1:
        raise SelfReplayError(f"the tokenizer has {tokenizer.vocab_size:,} ids, more than a uint16 token file "
                              f"holds (65,536): train one with --vocab-size 65536 or less")
    if max_tokens is not None and max_tokens < 1:
        raise SelfReplayError(f"max tokens must be at least 1, got {max_tokens}")
    domain_id = tokenizer.domain_id(domain)
    out = Path(out)
    if out.is_dir():
        raise SelfReplayError(f"--out {out} is a directory: give a file name such as {out / 'tokens.bin'}")
    start = time.perf_counter()
    batches = iter_batches(corpus, text_field, BATCH_DOCUMENTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_tmp = _temp_path(out)
    meta_tmp = None
    try:
        with open(data_tmp, "wb") as f:
            num_tokens, num_documents = _write_tokens(f, batches, tokenizer, max_tokens)
            f.flush()
            os.fsync(f.fileno())
        meta = TokenFileMeta(
            domain=tokenizer.domain_name(domain_id), domain_id=domain_id,
            tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id, num_documents=num_documents, num_tokens=num_tokens,
            source=str(corpus), seconds=round(time.perf_counter() - start, 3))
        meta_tmp = _temp_path(out)
        meta_tmp.write_text(meta.to_json(), encoding="utf-8")
        # Old metadata goes first: data without metadata is refused, never misread.
        metadata_path(out).unlink(missing_ok=True)
        os.replace(data_tmp, out)
        os.replace(meta_tmp, metadata_path(out))
    except BaseException:
        for tmp in (data_tmp, meta_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    return meta


def _temp_path(out: Path) -> Path:
    # Same directory as `out`, so os.replace is an atomic rename; "x" mode keeps the umask's permissions.
    path = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    path.open("xb").close()
    return path


def _write_tokens(f, batches, tokenizer: Tokenizer, max_tokens: int | None) -> tuple[int, int]:
    """Write documents + EOS to `f` until the corpus or `max_tokens` runs out; (tokens, documents)."""
    eos = tokenizer.eos_id
    num_tokens = num_documents = 0
    for batch in batches:
        encoded = tokenizer.encode_batch(batch)
        ids = np.fromiter(chain.from_iterable(chain(doc, (eos,)) for doc in encoded), dtype=DTYPE)
        if max_tokens is not None and num_tokens + len(ids) >= max_tokens:
            keep = max_tokens - num_tokens
            starts = np.cumsum([0] + [len(doc) + 1 for doc in encoded[:-1]])
            f.write(ids[:keep].tobytes())
            return max_tokens, num_documents + int(np.searchsorted(starts, keep))
        f.write(ids.tobytes())
        num_tokens += len(ids)
        num_documents += len(encoded)
    return num_tokens, num_documents


def read_token_meta(path: str | Path) -> TokenFileMeta:
    """The metadata of token file `path`, read from `path.json`."""
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise SelfReplayError(f"token file {path} has no metadata ({meta_file} is missing): "
                              f"re-run `selfreplay tokenize` to make both")
    try:
        return TokenFileMeta.from_json(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SelfReplayError(f"could not read token metadata {meta_file}: {one_line(e)}: "
                              f"re-run `selfreplay tokenize`") from None


def open_tokens(path: str | Path, fingerprint: str | None = None) -> tuple[np.ndarray, TokenFileMeta]:
    """The token ids of `path`, memory-mapped read-only ([num_tokens] uint16), and its metadata.

    With `fingerprint`, refuses a file made by a different tokenizer.
    """
    if not Path(path).is_file():
        raise SelfReplayError(f"token file not found: {path}: make it with `selfreplay tokenize`")
    meta = read_token_meta(path)
    if meta.dtype != "uint16":
        raise SelfReplayError(f"token file {path} has dtype {meta.dtype}, this selfreplay reads uint16 only")
    size = os.path.getsize(path)
    if size != meta.num_tokens * DTYPE.itemsize:
        raise SelfReplayError(f"token file {path} is {size:,} bytes but its metadata says {meta.num_tokens:,} "
                              f"uint16 tokens ({meta.num_tokens * DTYPE.itemsize:,} bytes): "
                              f"re-run `selfreplay tokenize`")
    if fingerprint is not None and fingerprint != meta.tokenizer_fingerprint:
        raise SelfReplayError(f"token file {path} was made with tokenizer {meta.tokenizer_fingerprint}, "
                              f"but this run uses tokenizer {fingerprint}: re-tokenize with "
                              f"`selfreplay tokenize {meta.source} --tokenizer DIR --domain {meta.domain} "
                              f"--out {path}` using this run's tokenizer")
    if meta.num_tokens == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=DTYPE), meta
    return np.memmap(path, dtype=DTYPE, mode="r"), meta
