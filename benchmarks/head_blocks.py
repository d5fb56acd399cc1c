"""The head losses' block size (selfreplay/objective/losses.py, `head_block_rows`), timed on this
machine: selfreplay's head KL, forward + backward, at 2,048 rows and D = 512, with blocks capped
at several sizes of float32 logits ("512 rows" is the cap before blocks were sized by V).

    python benchmarks/head_blocks.py                    # V = 32k and 128k, ~10 min on 2 cores

Each measurement runs in its own process through benchmarks/peers.py's part-3 worker (median
of 3 timed calls after one warm-up; peak memory of one call in a second process). Time it on a
quiet machine. Prints a table and writes benchmarks/results/head_blocks.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPS = ("512 rows", "64", "32", "16")  # MiB of float32 logits a block, or the old fixed 512 rows

WORKER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import peers
from selfreplay.objective import losses
cap, rows, D, V, measure = sys.argv[2:7]
losses.HEAD_BLOCK_BYTES = 10**15 if cap == "512 rows" else int(float(cap) * 2**20)
spec = {"device": "cpu", "measure": measure, "warmup": 1, "repeats": 3, "method": "selfreplay",
        "rows": int(rows), "D": int(D), "V": int(V)}
out = peers.kl_worker(spec, peers.MemoryProbe("cpu"))
out["block_rows"] = losses.head_block_rows(int(V))
print(json.dumps(out))
'''


def measure(cap: str, rows: int, D: int, V: int) -> dict:
    row = {"V": V, "rows": rows, "D": D, "cap": cap}
    for kind in ("time", "memory"):
        done = subprocess.run([sys.executable, "-c", WORKER, str(HERE), cap, str(rows), str(D), str(V), kind],
                              capture_output=True, text=True, check=True)
        row |= json.loads(done.stdout.strip().splitlines()[-1])
    row.pop("times", None)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="32768,131072", help="vocabulary sizes, comma-separated")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", default=str(HERE / "results" / "head_blocks.json"))
    args = parser.parse_args(argv)
    results = []
    print(f"{'V':>7s} {'cap (MiB)':>9s} {'block rows':>10s} {'seconds':>8s} {'peak MiB':>9s}")
    for V in (int(v) for v in args.vocab.split(",")):
        for cap in CAPS:
            r = measure(cap, args.rows, args.dim, V)
            results.append(r)
            print(f"{V:7d} {cap:>9s} {r['block_rows']:10d} {r['seconds']:8.2f} {r['peak_mib']:9.0f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": args.rows, "D": args.dim, "results": results}, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
