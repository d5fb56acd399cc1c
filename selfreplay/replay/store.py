"""Replay pools on disk: π0's samples, and what the KL needs from π0 at each position, drawn once.

π0 is frozen, so what it says about a sample never changes: a pool drawn once can be replayed
for a whole run, and by later runs. A pool directory holds

    shard-00000.safetensors, shard-00001.safetensors, ...   shard_rows rows each (the last fewer):
        tokens  int32 [n, t]     token ids
        mask    bool  [n, t]     True on real tokens, False on padding after a sample stopped
        and π0's targets at every position, by the pool's kind of targets:
        "hidden"   hidden  [n, t, D]         π0's final hidden states (the KL then needs only π0's head)
        "topk:K"   logp    [n, t, K]         π0's K largest log-probabilities
                   ids     int32 [n, t, K]   their token ids
                   rest    [n, t]            π0's remaining mass outside the K (as the objective stores it)
        "none"     nothing more (π0 scores the tokens when the KL needs it)
    pool.json    written last, which marks the pool complete: the fingerprint of the model that drew
                 it (selfreplay.model.fingerprint), what drew it (meta), the kind of targets, the rows'
                 width t, each tensor's dtype and trailing shape, each shard's rows, bytes and sha256,
                 and the seconds from the writer's opening to its closing (the drawing's time).

Shards are written under a temporary name and renamed into place, so a killed drawing leaves
whole shards and no pool.json: an unfinished pool, refused. A reader memory-maps the shards it
reads (OPEN_SHARDS at most at once) and copies out only the rows asked for, so a pool larger than
RAM is never loaded whole; it checks a shard's sha256 the first time it reads from it, so that
opening a large pool costs only a look at each file's size.
`ReuseOrder` is the seeded, resumable order in which a reused pool is replayed.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save

from selfreplay.errors import SelfReplayError
from selfreplay.replay.samples import ReplaySamples, TopKTargets
from selfreplay.rundir import write_atomic

HEADER_NAME, FORMAT = "pool.json", "selfreplay-pool/1"
SHARD_NAME = "shard-{:05d}.safetensors"
TOPK_NAMES = ("logp", "ids", "rest")
INDEX_NAMES = ("tokens", "ids")  # stored as int32, given back as int64 (what embedding and gather take)
OPEN_SHARDS = 8  # memory maps held open at once (each holds a file descriptor)
REDRAW = "selfreplay sample SOURCE --out NEW_DIR"  # SOURCE: the run's init (π0)


def target_kind(targets: dict[str, torch.Tensor]) -> str:
    """"none", "hidden" or "topk:K" for a targets dict; refuses any other set of names."""
    if not targets:
        return "none"
    if set(targets) == {"hidden"}:
        return "hidden"
    if set(targets) == set(TOPK_NAMES):
        return f"topk:{targets['logp'].shape[-1]}"
    raise SelfReplayError(f"replay targets are {sorted(targets)}: a pool stores either 'hidden' or "
                          f"{list(TOPK_NAMES)} (top-K log-probabilities, their ids, the rest's mass)")


class PoolWriter:
    """Writes a new pool directory: `write` appends rows, a shard of `shard_rows` rows going to disk
    whenever one is full; `close` writes the last shard and pool.json, which marks the pool complete.
    fingerprint: model_fingerprint of the model that drew the samples; meta: what drew them (JSON)."""

    def __init__(self, out_dir: str | Path, fingerprint: str, meta: dict, shard_rows: int = 1024):
        self.out = Path(out_dir)
        if shard_rows < 1:
            raise SelfReplayError(f"a pool shard needs at least one row, got shard_rows={shard_rows}")
        if holds_pool(self.out):
            raise SelfReplayError(f"{out_dir} already holds a replay pool: choose another --out or delete it")
        self.out.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.meta, self.shard_rows = fingerprint, meta, shard_rows
        self.pending: dict[str, list[torch.Tensor]] = {}  # blocks of rows not yet in a shard, by tensor name
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.kind: str | None = None
        self.layout: dict[str, tuple] = {}  # tensor name -> (dtype, trailing shape), fixed by the first write
        self.width, self.masked, self.closed = 0, False, False
        self.started = time.perf_counter()

    def write(self, samples: ReplaySamples, targets: dict[str, torch.Tensor] | None = None) -> None:
        """Append samples (tokens [n, t], mask [n, t] or None) and π0's targets on them (see the
        module's docstring; samples.hidden stands for {"hidden": samples.hidden} when targets is None). Rows
        narrower than the first write's are padded (mask False); wider ones are refused."""
        if self.closed:
            raise SelfReplayError(f"the pool {self.out} is closed: write every sample before close()")
        if targets is None and samples.hidden is not None:
            targets = {"hidden": samples.hidden}
        parts = self._checked(samples, targets or {})
        for name, part in parts.items():
            self.pending.setdefault(name, []).append(part)
        self.pending_rows += len(parts["tokens"])
        if self.pending_rows < self.shard_rows:
            return
        joined, written = {name: torch.cat(blocks) for name, blocks in self.pending.items()}, 0
        while self.pending_rows - written >= self.shard_rows:
            self._write_shard({name: part[written:written + self.shard_rows] for name, part in joined.items()})
            written += self.shard_rows
        # a copy, so that the rest does not keep the joined rows alive
        self.pending = {name: [part[written:].clone()] for name, part in joined.items()}
        self.pending_rows -= written

    def close(self) -> dict:
        """Write the last shard and pool.json; returns pool.json's contents."""
        if self.pending_rows:
            self._write_shard({name: torch.cat(blocks) for name, blocks in self.pending.items()})
            self.pending, self.pending_rows = {}, 0
        if not self.shards:
            raise SelfReplayError(f"no samples were written to the pool {self.out}: a pool needs at least one")
        self.closed = True
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "meta": self.meta, "targets": self.kind,
                  "width": self.width, "mask": self.masked, "rows": sum(s["rows"] for s in self.shards),
                  "tensors": {name: {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
                              for name, (dtype, shape) in self.layout.items()},
                  "shards": self.shards, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "seconds": time.perf_counter() - self.started}
        write_atomic(self.out / HEADER_NAME, lambda p: p.write_text(json.dumps(header, indent=2)))
        return header

    def _checked(self, samples: ReplaySamples, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of one write as stored (CPU; int32 indices; bool mask), as wide as the pool's rows."""
        tokens = samples.tokens
        if tokens.dim() != 2 or tokens.shape[1] == 0 or tokens.dtype.is_floating_point:
            raise SelfReplayError(f"replay tokens must be integer ids [n, t >= 1], "
                                  f"got {tokens.dtype} {list(tokens.shape)}")
        kind = target_kind(targets)
        mask = samples.mask if samples.mask is not None else torch.ones(tokens.shape, dtype=torch.bool)
        parts = {"tokens": tokens.to(torch.int32), "mask": mask.bool(), **targets}
        if "ids" in parts:
            parts["ids"] = parts["ids"].to(torch.int32)
        for name, part in parts.items():
            if tuple(part.shape[:2]) != tuple(tokens.shape):
                raise SelfReplayError(f"replay target '{name}' is {list(part.shape)}: its first dimensions "
                                      f"must be the tokens' {list(tokens.shape)}")
        layout = {name: (part.dtype, tuple(part.shape[2:])) for name, part in parts.items()}
        if self.kind is None:
            self.kind, self.layout, self.width = kind, layout, tokens.shape[1]
        elif (kind, layout) != (self.kind, self.layout) or tokens.shape[1] > self.width:
            raise SelfReplayError(f"these samples ({kind}, {_describe(layout)}, width {tokens.shape[1]}) do not "
                                  f"match the pool's ({self.kind}, {_describe(self.layout)}, width {self.width})")
        self.masked |= samples.mask is not None or tokens.shape[1] < self.width
        # a copy: the caller may reuse its buffers after write() returns
        return {name: _widened(part.detach().to("cpu", copy=True), self.width) for name, part in parts.items()}

    def _write_shard(self, parts: dict[str, torch.Tensor]) -> None:
        data = save({name: part.contiguous() for name, part in parts.items()})
        name = SHARD_NAME.format(len(self.shards))
        write_atomic(self.out / name, lambda p: p.write_bytes(data))
        self.shards.append({"file": name, "rows": len(parts["tokens"]), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})


def _widened(part: torch.Tensor, width: int) -> torch.Tensor:
    """part [n, t, ...] right-padded with zeros (False for a mask) to [n, width, ...]."""
    if part.shape[1] == width:
        return part
    wide = part.new_zeros((part.shape[0], width, *part.shape[2:]))
    wide[:, :part.shape[1]] = part
    return wide


def _describe(layout: dict[str, tuple]) -> str:
    return ", ".join(f"{name} {str(dtype).removeprefix('torch.')} {list(shape)}"
                     for name, (dtype, shape) in layout.items())


def holds_pool(path: Path) -> bool:
    """Whether `path` holds a replay pool, finished or not (of this format or the JSONL one)."""
    names = (HEADER_NAME, "samples.jsonl", SHARD_NAME.format(0))
    return path.is_dir() and any((path / name).exists() for name in names)


def read_header(pool_dir: Path) -> dict:
    """pool.json of a finished pool in this format; refuses anything else in one line."""
    path = pool_dir / HEADER_NAME
    if not path.is_file():
        if holds_pool(pool_dir):
            raise SelfReplayError(f"{pool_dir} holds an unfinished replay pool (no pool.json: its drawing stopped): "
                                  f"delete it and draw it again with {REDRAW}")
        raise SelfReplayError(f"{pool_dir} holds no replay pool: draw one with {REDRAW}")
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SelfReplayError(f"{path} is not valid JSON ({e}): redraw the pool with {REDRAW}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SelfReplayError(f"{pool_dir} is not a pool of safetensors shards ({FORMAT}; a JSONL pool of an "
                              f"earlier version, say): draw it again with {REDRAW}")
    return header


class StoredPool:
    """A finished pool directory, read a few rows at a time: `rows(start, stop)` or `take(indices)`
    give (ReplaySamples on `device`, π0's targets by name). fingerprint: this run's π0
    (model_fingerprint), refused in one line when another model drew the pool; None skips the check."""

    def __init__(self, pool_dir: str | Path, fingerprint: str | None = None, device: str | torch.device = "cpu"):
        self.dir, self.device = Path(pool_dir), device
        self.header = read_header(self.dir)
        drawn_by = self.header["fingerprint"]
        if fingerprint is not None and fingerprint != drawn_by:
            model = self.header["meta"].get("model")
            raise SelfReplayError(f"pool {self.dir} was drawn by model {drawn_by}{f' ({model})' if model else ''}, "
                                  f"this run's π0 is {fingerprint}: draw a new pool with {REDRAW}")
        self.kind, self.masked, self.shards = self.header["targets"], self.header["mask"], self.header["shards"]
        for index in range(len(self.shards)):
            self._check_size(index)  # a stat a shard: a missing or cut file is refused before training starts
        self.starts = torch.tensor([0] + [s["rows"] for s in self.shards]).cumsum(0)  # [shards + 1]
        self.verified: set[int] = set()  # shards whose sha256 was checked
        # the mask of an unmasked pool is all True: not worth reading
        self.names = [name for name in self.header["tensors"] if name != "mask" or self.masked]
        self._maps: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()  # shards read last, newest last

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    def rows(self, start: int, stop: int) -> tuple[ReplaySamples, dict[str, torch.Tensor]]:
        """Rows start..stop-1 (across shard boundaries): samples [stop - start, t] and targets."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows {start}:{stop} are outside the pool's {len(self)}")
        return self.take(torch.arange(start, stop))

    def take(self, indices: torch.Tensor) -> tuple[ReplaySamples, dict[str, torch.Tensor]]:
        """The rows at `indices` [b] (any order, repeats allowed), in that order: samples [b, t]
        (hidden set for "hidden" targets) and targets {name: [b, t, ...]}. Reads only those rows,
        from the memory maps of the shards that hold them."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < len(self)):
            raise IndexError(f"rows {int(indices.min())}..{int(indices.max())} are outside the pool's {len(self)}")
        layout, width = self.header["tensors"], self.header["width"]
        parts = {name: torch.empty((len(indices), width, *layout[name]["shape"]),
                                   dtype=getattr(torch, layout[name]["dtype"])) for name in self.names}
        shard = torch.searchsorted(self.starts, indices, right=True) - 1
        for index in shard.unique().tolist():
            picked = (shard == index).nonzero().flatten()
            views, local = self._mapped(index), (indices[picked] - self.starts[index]).tolist()
            for name in self.names:  # row by row: advanced indexing of a mapped tensor reads all of it
                parts[name][picked] = torch.stack([views[name][i] for i in local])
        return self._given(parts)

    def _given(self, parts: dict[str, torch.Tensor]) -> tuple[ReplaySamples, dict[str, torch.Tensor]]:
        """Stored tensors as the objective takes them: int64 indices, on the device, mask None when unmasked."""
        parts = {name: (part.long() if name in INDEX_NAMES else part).to(self.device) for name, part in parts.items()}
        targets = {name: part for name, part in parts.items() if name not in ("tokens", "mask")}
        topk = TopKTargets(*(targets[name] for name in TOPK_NAMES)) if self.kind.startswith("topk:") else None
        return ReplaySamples(parts["tokens"], parts.get("mask"), targets.get("hidden"), topk), targets

    def _mapped(self, index: int) -> dict[str, torch.Tensor]:
        """Shard `index`'s tensors as views of its memory map (verified the first time)."""
        self._check_size(index)  # at every read: a mapped file cut short would crash the reader (SIGBUS)
        if index in self._maps:
            self._maps.move_to_end(index)
            return self._maps[index]
        self._verify(index)
        if len(self._maps) >= OPEN_SHARDS:
            self._maps.popitem(last=False)
        self._maps[index] = mapped_safetensors(self.dir / self.shards[index]["file"])
        return self._maps[index]

    def _verify(self, index: int) -> None:
        """Refuse shard `index` in one line if its sha256 is not pool.json's (checked once per shard)."""
        if index in self.verified:
            return
        shard, digest = self.shards[index], hashlib.sha256()
        with open(self.dir / shard["file"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            raise SelfReplayError(f"{self.dir / shard['file']} is damaged (checksum differs): "
                                  f"redraw the pool with {REDRAW}")
        self.verified.add(index)

    def _check_size(self, index: int) -> None:
        shard = self.shards[index]
        path = self.dir / shard["file"]
        if not path.is_file():
            raise SelfReplayError(f"{path} is missing: the pool is incomplete; redraw it with {REDRAW}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise SelfReplayError(f"{path} is damaged ({'truncated: ' if size < shard['bytes'] else ''}{size} bytes, "
                                  f"pool.json says {shard['bytes']}): redraw the pool with {REDRAW}")


# safetensors' dtype names (its header) -> torch
SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                      "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64}


def mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of the file's memory map: nothing is read
    until a view is indexed, and then only the pages indexed. The map is private (copy on
    write): a write to a view never reaches the file."""
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    size = int.from_bytes(buffer[:8], "little")  # the format: u64 header length, JSON header, data
    header = json.loads(buffer[8:8 + size])
    views = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, count = SAFETENSORS_DTYPES[entry["dtype"]], math.prod(entry["shape"])
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + size + entry["data_offsets"][0]) \
            if count else torch.empty(0, dtype=dtype)
        views[name] = flat.view(entry["shape"])
    return views


class ReuseOrder:
    """The order in which a reused pool of `num_rows` rows is replayed, `batch_size` rows at a time:
    pass after pass over the pool, each pass a permutation of every row drawn from (seed, pass)
    alone, so the state is only (pass, position) and a resumed run continues exactly. A batch that
    crosses the end of a pass takes the rest from the next pass (a row may then be in it twice)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0):
        if num_rows < 1 or batch_size < 1:
            raise SelfReplayError(f"a reused pool needs rows and a batch size >= 1, "
                                  f"got {num_rows} rows, batch {batch_size}")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.pass_, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (pass, its permutation), built once a pass

    def permutation(self, pass_: int) -> torch.Tensor:
        """Pass `pass_`'s order of the rows [num_rows] (int64)."""
        if self._order is None or self._order[0] != pass_:
            key = hashlib.sha256(f"{self.seed}:{pass_}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            self._order = (pass_, torch.randperm(self.num_rows, generator=generator))
        return self._order[1]

    def next_indices(self) -> torch.Tensor:
        """The next batch's rows [batch_size] (int64)."""
        pieces, wanted = [], self.batch_size
        while wanted:
            piece = self.permutation(self.pass_)[self.position:self.position + wanted]
            pieces.append(piece)
            wanted -= len(piece)
            self.position += len(piece)
            if self.position == self.num_rows:
                self.pass_, self.position = self.pass_ + 1, 0
        return torch.cat(pieces)

    def state_dict(self) -> dict:
        return {"pass": self.pass_, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.pass_, self.position = int(state["pass"]), int(state["position"])
