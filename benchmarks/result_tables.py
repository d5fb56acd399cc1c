"""The Markdown tables built from benchmarks/results/*.json, regenerated from the JSON.

    python benchmarks/result_tables.py           # rewrite every generated table in place
    python benchmarks/result_tables.py --check   # exit 1, naming the first table that differs

A generated table sits between two marker lines in README.md or a page of docs/:

    <!-- table:NAME -->
    | ... |
    <!-- /table:NAME -->

and NAME is one of TABLES below: the function that writes its lines from the JSON, rounded as
the text around it reads them. Everything outside the markers (the prose, its numbers
included) is left as it is. tests/test_tables.py runs the check, so a table edited by hand or
left behind by a rerun benchmark fails the tests. Only the standard library: no torch needed.

(Not `tables.py`: PyTables installs a module `tables`, and a script here is first on sys.path
of every benchmark; see tests/test_packaging.py.)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, as benchmarks are

from selfreplay.experiments.measures import at_new_loss  # noqa: E402 (the same reading as benchmarks/peers.py)
# The Markdown files that may hold generated tables, relative to the repository root.
FILES = ("README.md", "docs/results.md", "docs/performance.md", "docs/huggingface.md")
MARKER = re.compile(r"^<!-- (/?)table:([A-Za-z0-9_.-]+) -->$")


# ---------------------------------------------------------------- formatting

def row(cells: list[str]) -> str:
    """A Markdown table row; an empty cell is written `| |`, as the hand-written tables did."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def header(cells: list[str]) -> list[str]:
    return [row(cells), "|" + "---|" * len(cells)]


def minus(text: str) -> str:
    """A typeset minus sign, as the prose writes negative numbers."""
    return text.replace("-", "\u2212")


def whole(x: float) -> str:
    """A whole number with thousands separators: 14,247."""
    return f"{x:,.0f}"


def short(x: float) -> str:
    """A loss to 3 decimals without trailing zeros: 3.9, 4.553."""
    return f"{x:.3f}".rstrip("0").rstrip(".")


def coefficient(c: float) -> str:
    """A replay coefficient as the budget tables write it: 5.8, 40.2, 790, 1000."""
    return f"{c:.1f}" if c < 100 else f"{c:.0f}"


def learning_rate(lr: float) -> str:
    """3e-4, not 3e-04."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def seconds(x: float) -> str:
    return f"{x:.1f}" if x < 1 else f"{x:.0f}"


def cpu_time(s: float) -> str:
    """133 ms, 1.30 s, 22.5 s."""
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def gpu_time(s: float) -> str:
    """4.1 ms, 196.3 ms."""
    return f"{s * 1000:.1f} ms"


# ---------------------------------------------------------------- the tables

Results = Callable[[str], dict]  # file name in benchmarks/results -> its JSON


def method_comparison(load: Results) -> list[str]:
    """README, "What it shows": the method comparison on fortunes."""
    data = load("method_comparison_fortunes.json")
    labels = {"none": "plain finetuning", "self-kl": "self-replay KL, c={c}", "real-kl": "real-replay KL, c={c}",
              "self-ntp": "self-replay NTP, c={c}"}
    lines = header(["method", "forgetting (nats)", "Spanish loss", "compute multiplier"])
    for r in data["rows"]:
        label = f"LoRA r={r['lora_rank']}" if r["lora_rank"] else labels[r["method"]].format(c=f"{r['coeff']:g}")
        loss = f"{r['new_loss']:.3f}" + ("" if r["stop_reason"] == "target_loss" else " (target not reached)")
        lines.append(row([label, f"{r['forgetting']:+.3f}", loss, f"{r['compute_multiplier']:.2f}"]))
    return lines


ONCE_SETTINGS = {"synthetic": "synthetic, built-in", "real": "real text, built-in", "hf": "real text, exported HF"}
ONCE_ROWS = {
    "hidden_F4": "drawn once, F/4 = {n4} samples, `hidden`",
    "hidden_F16": "drawn once, F/16 = {n16}, `hidden`",
    "hidden_F64": "drawn once, F/64 = {n64}, `hidden`",
    "top64_F16": "drawn once, F/16, `topk:64`",
    "top8_F16": "drawn once, F/16, `topk:8`",
    "top1_F16": "drawn once, F/16, `topk:1`",
}


def replay_once(load: Results, pools: tuple[str, ...]) -> list[str]:
    data = load("replay_once.json")
    study, fresh_samples = data["study"], data["fresh_samples"]
    sizes = {f"n{k}": round(fresh_samples / k) for k in (4, 16, 64)}
    lines = header(["forgetting at equal new-domain loss, nats (× fresh's)", *ONCE_SETTINGS.values()])
    lines.append(row(["compared at new-domain loss", *(f"{study[s]['target_new_loss']:.3f}" for s in ONCE_SETTINGS)]))
    for name, label in (("plain", "plain finetuning (no replay)"),
                        ("fresh", f"self-KL, drawn fresh (F = {fresh_samples:,} samples)")):
        lines.append(row([label, *(f"{study[s]['rows'][name]['forgetting_at_target']:.4f}" for s in ONCE_SETTINGS)]))
    for name in pools:
        cells = []
        for s in ONCE_SETTINGS:
            value = study[s]["rows"][name]["forgetting_at_target"]
            cells.append(f"{value:.4f} ({value / study[s]['rows']['fresh']['forgetting_at_target']:.2f}x)")
        lines.append(row([ONCE_ROWS[name].format(**sizes), *cells]))
    return lines


def replay_once_speed(load: Results) -> list[str]:
    """docs/performance.md: the draw-once run timed alone, fp32 on real text."""
    data = load("replay_once.json")
    fp32, quarter = data["speed"]["fp32"], round(data["fresh_samples"] / 4)
    lines = header(["real text, fp32", f"forgetting at loss {fp32['target_new_loss']:.3f}", "time to it, s (drawing)",
                    "tokens/s, drawing counted", "× plain"])
    labels = {"plain": "plain finetuning", "fresh": "self-KL, drawn fresh",
              "draw_once_F4": f"self-KL, `replay.draw_once={quarter}` (F/4)"}
    for name, label in labels.items():
        r = fp32["rows"][name]
        lines.append(row([label, f"{r['forgetting_at_target']:.4f}", f"{r['time_to_target_s']:.1f} ({r['draw_s']:.1f})",
                          whole(r["tokens_per_s"]), f"{r['vs_plain_tokens_per_s']:.3f}"]))
    return lines


def replay_once_memory(load: Results) -> list[str]:
    """docs/performance.md: peak memory of full finetuning from a stored pool."""
    memory = load("replay_once.json")["memory"]
    peaks = memory["peak_memory_mib"]
    lines = header([f"full finetuning, {memory['params'] / 1e6:.0f}M parameters", "peak RSS, MiB", "against fresh"])
    labels = {"plain": "plain finetuning", "fresh": "self-KL, fresh (π0 as a frozen copy)",
              "stored_hidden": "self-KL, stored pool, `hidden` (π0's head kept)",
              "stored_top64": "self-KL, stored pool, `topk:64` (nothing of π0)"}
    for name, label in labels.items():
        lines.append(row([label, whole(peaks[name]), f"{peaks[name] - peaks['fresh']:+,.0f}"]))
    return lines


def hf_real_text(load: Results) -> list[str]:
    """docs/huggingface.md, "On real text": a model exported and finetuned through `init=hf:`."""
    runs = load("hf_real_text.json")["runs"]
    # the time cap of a run that missed the target: the script's own stop.wall_seconds
    cap = re.search(r"stop\.wall_seconds=(\d+)", (ROOT / "benchmarks" / "hf_real_text.py").read_text(encoding="utf-8"))
    labels = {"plain": "plain", "kl": "self-replay KL, c={c}", "lora": "LoRA r{r}", "lora_kl": "LoRA r{r} + KL, c={c}",
              "lora_kl_c3": "LoRA r{r} + KL, c={c}"}
    lines = header(["run", "forgetting (nats)", "% of plain's", "new loss", "train s to target", "tokens/s",
                    "peak MiB"])
    plain = runs["plain"]["forgetting"]
    for name, label in labels.items():
        r = runs[name]
        settings = dict(setting.split("=", 1) for setting in r["settings"])
        label = label.format(c=settings.get("replay.coeff"), r=settings.get("lora.rank"))
        share = "100" if name == "plain" else f"{100 * r['forgetting'] / plain:.1f}"
        time = (f"{r['time_to_target_seconds']:.0f}" if r["time_to_target_seconds"] is not None
                else f"missed ({cap.group(1)} s cap)" if cap else "missed")
        lines.append(row([label, f"{r['forgetting']:.4f}", share, f"{r['new_loss']:.4f}", time,
                          whole(r["tokens_per_second"]), whole(r["peak_memory_mib"])]))
    return lines


REAL_MODEL_LABELS = {
    "plain": "plain",
    "default": "**self-replay KL c=10, BOS samples, 2 rows a step, 64 drawn once** (the default's replay)",
    "default_lr3e-5": "**the same at lr 3e-5** (the default for a chat model)",
    "default_lr3e-5_rows8": "the same, 8 replay rows a step (256 drawn once)",
    "real_lr3e-5": "real replay: the same KL on 128 windows of the other English manpages",
    "heldout_lr3e-5": "the same on windows of the held-out manpages themselves (an oracle)",
    "default_eps1e-4": "the default's replay at lr 1e-4, Adam's ε 1e-4",
    "kl_bos": "self-replay KL c=10, BOS samples, 4 rows a step, fresh draws",
    "kl_chat": "self-replay KL c=10, chat samples, 4 rows a step, fresh draws",
    "kl_bos_short": "the same, BOS samples of 64 tokens",
    "default_c3": "the default at c=3",
    "auto_b0.03": "the default held to a budget of 0.03 (c=auto)",
    "auto_b0.01": "the default held to a budget of 0.01 (c=auto)",
    "lora": "LoRA r16 (lr 1e-3)",
    "lora_kl": "LoRA r16 + the default's KL (lr 1e-3)",
    "kl_new_c1": "KL on the task batch, c=1",
    "plain_warm": "plain, 4 warmup steps",
    "default_warm": "the default, 4 warmup steps",
    "plain_lr3e-5": "plain at lr 3e-5",
}


def real_model(load: Results) -> list[str]:
    """docs/results.md, "A real chat model": SmolLM2-135M-Instruct at the common Spanish loss."""
    record = load("real_model.json")
    lines = header(["run", "seeds", "chat_kl", "% of plain's", "old_kl", "% of plain's", "English loss change",
                    "steps to the loss", "s to the loss", "answer agreement (end)", "peak MiB"])
    methods = record["methods"]
    plain = methods.get("plain", {}).get("mean")
    for name, label in REAL_MODEL_LABELS.items():
        if name not in methods:
            continue
        m = methods[name]
        mean, std, seeds = m["mean"], m["std"], m["seeds"]
        pm = (lambda key, digits=4: f" ± {std[key]:.{digits}f}" if seeds > 1 else "")  # noqa: E731
        share = (lambda key: f"{100 * mean[key] / plain[key]:.0f}" if plain else "")  # noqa: E731
        agreement = m["answer_agreement"]
        agree = "" if agreement is None else f"{agreement['mean']:.2f}" + (f" ± {agreement['std']:.2f}" if seeds > 1 else "")
        seconds = "shared CPU" if mean["seconds"] is None else f"{mean['seconds']:.0f}"
        lines.append(row([label, str(seeds), f"{mean['chat_kl']:.4f}{pm('chat_kl')}", share("chat_kl"),
                          f"{mean['old_kl']:.4f}{pm('old_kl')}", share("old_kl"), minus(f"{mean['forgetting']:+.3f}"),
                          f"{mean['steps']:.1f}{pm('steps', 1)}", seconds, agree, whole(m["peak_memory_mib"])]))
    return lines


def real_model_cost(load: Results) -> list[str]:
    """docs/performance.md, "A real chat model": where the memory of full finetuning at 135M goes."""
    cost = load("real_model_cost.json")
    lines = header(["stage", "resident MiB"])
    lines += [row([stage, whole(mib)]) for stage, mib in cost["stages_mib"]]
    lines.append(row(["peak through the plain steps", whole(cost["peak_through_plain_steps_mib"])]))
    lines.append(row(["peak through the KL steps", whole(cost["peak_through_kl_steps_mib"])]))
    return lines


def budget(load: Results, file: str, order: str, old_kl: str, against_fixed: bool) -> list[str]:
    """docs/results.md, "Forgetting held to a budget": the held runs of one benchmarks/budget.py run."""
    data = load(file)
    columns = ["setting", "budget B", "replay KL at the end (× B)", "c at the end", old_kl, "English loss rise",
               "Spanish loss"]
    if against_fixed:
        columns += ["smallest fixed c within B", "steps to the common Spanish loss, held / fixed"]
    lines = header(columns)
    for setting, name in (("real", "built-in"), ("hf", "exported HF")):
        runs = sorted(data[setting]["rows"], key=lambda r: r["budget"], reverse=order == "descending")
        if data[setting].get("low_lr"):
            runs.append(data[setting]["low_lr"])
        for r in runs:
            b = f"{r['budget']:g}"
            if "_lr" in r["run"]:
                b += f", lr {learning_rate(float(r['run'].split('_lr')[1]))}"
            cells = [name, b, f"{r['end_replay_kl']:.4f} ({r['kl_over_budget']:.2f})", coefficient(r["coeff_end"]),
                     f"{r['old_kl_end']:.4f}", f"{r['forgetting_end']:.4f}", f"{r['new_loss_end']:.3f}"]
            if against_fixed:
                cells += [r["best_fixed"].removeprefix("c"),
                          f"{r['held_steps_to_target']:.0f} / {r['fixed_steps_to_target']:.0f}"]
            lines.append(row(cells))
    return lines


def peers_finetune(load: Results) -> list[str]:
    """docs/results.md, "Beside TRL": plain finetuning through three tools."""
    models = load("peers_finetune.json")["finetune"]["models"]
    described = {"exported": "the exported English model of \"Replay drawn once\" (1.8M params, 4k vocabulary)",
                 "llama_random_128k": "random Llama (~100M params, 128k vocabulary)"}
    tools = {"trl_sft": "TRL `SFTTrainer`", "selfreplay_trainer": "`SelfReplayTrainer`",
             "selfreplay_command": "`selfreplay finetune`"}
    lines = header(["model", "tool", "tokens/s", "× SFTTrainer", "peak MiB"])
    for key, description in described.items():
        shape = models[key]["shape"]
        for i, (tool, label) in enumerate(tools.items()):
            t = models[key]["tools"][tool]
            first = f"{description}, batch {shape['batch']}×{shape['T']}" if i == 0 else ""
            lines.append(row([first, label, whole(t["tokens_per_second"]), f"{t['vs_trl_sft']:.2f}",
                              whole(t["peak_mib"])]))
    return lines


KL_METHODS = {"none": "plain finetuning", "kl": "self-replay KL, c = 10", "kl_c100": "self-replay KL, c = 100",
              "kl_new_c1": "KL on the task batch, c = 1", "kl_new_c10": "KL on the task batch, c = 10",
              "trl_sdft": "TRL SDFT"}
SELF_REPLAY_COEFF = {"kl": "10", "kl_c100": "100"}


def peers_kl_finetune(load: Results) -> list[str]:
    """docs/results.md, "Beside TRL": every method at every seed, read at the target loss."""
    part = load("peers_kl_finetune.json")["kl_finetune"]
    target, runs, methods = part["target_new_loss"], part["runs"], part["methods"]
    best = min((m for m in methods if "forgetting_at_target" in methods[m]),
               key=lambda m: methods[m]["forgetting_at_target"]["mean"])
    lines = header(["method", f"forgetting at Spanish loss {target:g}", "seconds to it", "tokens/s", "peak MiB"])
    for name, label in KL_METHODS.items():
        seeds = runs[name]
        points = [at_new_loss(r["curve"], target) for r in seeds]
        if all(points):
            forgetting = " / ".join(f"{p['forgetting']:.3f}" for p in points)
            forgetting = f"**{forgetting}**" if name == best else forgetting
            time = " / ".join(seconds(p["train_seconds"]) for p in points)
        else:
            steps = " / ".join(sorted({str(r["summary"]["steps"]) for r in seeds}))
            losses = " / ".join(f"{r['summary']['new_loss']:.2f}" for r in seeds)
            if all(r["summary"]["stop_reason"] == "budget" for r in seeds):  # stopped at its token budget
                tokens = " / ".join(sorted({f"{r['summary']['tokens'] / 1e6:.0f}M" for r in seeds}))
                note = f"{tokens} tokens"
            else:
                note = "from " + " / ".join(f"{r['curve'][0]['new_loss']:.2f}" for r in seeds)
            forgetting, time = f"not reached: {losses} after its {steps} steps ({note})", "-"
        lines.append(row([label, forgetting, time, " / ".join(whole(r["summary"]["tokens_per_second"]) for r in seeds),
                          " / ".join(whole(r["peak_mib"]) for r in seeds)]))
    return lines


def peers_kl_against(load: Results) -> list[str]:
    """docs/results.md, "Beside TRL": each peer against self-replay where the peer got to."""
    part = load("peers_kl_finetune.json")["kl_finetune"]
    target = part["target_new_loss"]
    lines = header(["peer", "read at Spanish loss", "peer forgot", "self-replay forgot", "margin", "spread",
                    "seconds, peer / self-replay"])
    for name, c in part["kl_against_peers"].items():
        (other,) = [kl for kl in c["every_self_replay_run"] if kl != c["self_replay"]]
        best, second = minus(f"{c['forgetting']:.3f}"), minus(f"{c['every_self_replay_run'][other]:.3f}")
        ours = f"{best} (c = {SELF_REPLAY_COEFF[c['self_replay']]}; c = {SELF_REPLAY_COEFF[other]}: {second})"
        time = f"{seconds(c['peer_seconds'])} / {seconds(c['seconds'])}"
        if c["new_loss"] == target:  # read at the target, as the table above: the other coefficient's time too
            other_seconds = statistics.fmean(at_new_loss(r["curve"], target)["train_seconds"]
                                             for r in part["runs"][other])
            time += f" (c = {SELF_REPLAY_COEFF[other]}: {seconds(other_seconds)})"
        lines.append(row([KL_METHODS[name], short(c["new_loss"]), f"{c['peer_forgetting']:.3f}", ours,
                          f"{c['margin']:.3f}", f"{c['spread']:.3f}", time]))
    return lines


KL_COLUMNS = {"selfreplay": "selfreplay", "selfreplay_compiled": "selfreplay, `compile=True`", "liger": "Liger",
              "liger_compiled": "Liger, compiled", "liger_triton": "Liger, Triton", "full_logits": "full logits"}


def out_of_memory(error: str, environment: dict, detail: bool) -> str:
    if "can't allocate memory" not in error and "out of memory" not in error.lower():
        return "failed"
    asked = re.search(r"allocate (\d+) bytes", error)
    if not detail or not asked:
        return "out of memory"
    return (f"out of memory (a {int(asked.group(1)) / 2**30:g} GiB logit tensor past the "
            f"{environment['memory_cap_gib']:.1f} GiB cap)")


def kl_shapes(load: Results, sources: list[tuple[str, str]], methods: list[str], time: Callable[[float], str],
              oom_detail: bool) -> list[str]:
    """docs/results.md, "Beside TRL": the KL term alone, one row per shape (V, rows); in each row
    the fastest time and the smallest peak in bold. sources: (file, suffix of its rows' label)."""
    shapes = []
    for file, suffix in sources:
        data = load(file)
        shapes += [(shape, suffix, data["environment"]) for shape in data["kl"]["shapes"]]
    shapes.sort(key=lambda item: (item[0]["V"], item[0]["rows"]))
    lines = header(["V × rows", *(KL_COLUMNS[m] for m in methods)])
    for shape, suffix, environment in shapes:
        measured = {m: shape["methods"][m] for m in methods if "seconds" in shape["methods"][m]}
        fastest = min(measured, key=lambda m: measured[m]["seconds"])
        leanest = min(measured, key=lambda m: measured[m]["peak_mib"])
        cells = []
        for m in methods:
            if m not in measured:
                cells.append(out_of_memory(shape["methods"][m].get("error", ""), environment, oom_detail))
                continue
            t, peak = time(measured[m]["seconds"]), f"{whole(measured[m]['peak_mib'])} MiB"
            if m == fastest and m == leanest:
                cells.append(f"**{t}, {peak}**")
            else:
                cells.append(f"{f'**{t}**' if m == fastest else t}, {f'**{peak}**' if m == leanest else peak}")
        lines.append(row([f"{shape['V']:,} × {shape['rows']:,}{suffix}", *cells]))
    return lines


CPU_METHODS = ["selfreplay", "selfreplay_compiled", "liger", "liger_compiled", "full_logits"]

TABLES: dict[str, tuple[tuple[str, ...], Callable[[Results], list[str]]]] = {
    # name: (the JSON files it is built from, the function)
    "method_comparison": (("method_comparison_fortunes.json",), method_comparison),
    "hf_real_text": (("hf_real_text.json",), hf_real_text),
    "real_model": (("real_model.json",), real_model),
    "real_model_cost": (("real_model_cost.json",), real_model_cost),
    "replay_once": (("replay_once.json",), lambda load: replay_once(load, ("hidden_F4", "hidden_F16"))),
    "replay_once_full": (("replay_once.json",), lambda load: replay_once(load, tuple(ONCE_ROWS))),
    "replay_once_speed": (("replay_once.json",), replay_once_speed),
    "replay_once_memory": (("replay_once.json",), replay_once_memory),
    "budget": (("budget.json",),
               lambda load: budget(load, "budget.json", "descending", "KL on held-out English (`old_kl`)", False)),
    "budget_lr3e-4": (("budget_lr3e-4.json",),
                      lambda load: budget(load, "budget_lr3e-4.json", "ascending", "`old_kl`", True)),
    "peers_finetune": (("peers_finetune.json",), peers_finetune),
    "peers_kl_finetune": (("peers_kl_finetune.json",), peers_kl_finetune),
    "peers_kl_against": (("peers_kl_finetune.json",), peers_kl_against),
    "peers_kl_cpu": (("peers_kl_cpu.json",),
                     lambda load: kl_shapes(load, [("peers_kl_cpu.json", "")], CPU_METHODS, cpu_time, True)),
    "peers_kl_cpu_d2048": (
        ("peers_kl_cpu_d2048.json", "peers_kl_cpu_d2048_rows8192.json", "peers_kl_cpu_d2048_v128k_rows8192.json"),
        lambda load: kl_shapes(load, [("peers_kl_cpu_d2048.json", ""), ("peers_kl_cpu_d2048_rows8192.json", ""),
                                      ("peers_kl_cpu_d2048_v128k_rows8192.json", " (before)")],
                               CPU_METHODS, cpu_time, False)),
    "peers_kl_cuda": (("peers_kl_cuda.json",),
                      lambda load: kl_shapes(load, [("peers_kl_cuda.json", "")],
                                             ["selfreplay", "liger", "liger_triton", "full_logits"], gpu_time, False)),
}


# ---------------------------------------------------------------- rewriting and checking

class TableError(Exception):
    """A marker that does not pair up or names no table."""


def loader(results: Path) -> Results:
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = json.loads((results / name).read_text(encoding="utf-8"))
        return cache[name]
    return load


def regenerate(text: str, load: Results, where: str = "") -> tuple[str, list[str]]:
    """text with every marked table rebuilt from the JSON, and the names of the tables that changed."""
    lines, out, changed = text.split("\n"), [], []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        opened = MARKER.match(lines[i].strip())
        i += 1
        if not opened:
            continue
        closing, name = opened.groups()
        if closing:
            raise TableError(f"{where}:{i}: <!-- /table:{name} --> closes no table")
        if name not in TABLES:
            raise TableError(f"{where}:{i}: unknown table {name!r} (known: {', '.join(TABLES)})")
        end = next((j for j in range(i, len(lines)) if MARKER.match(lines[j].strip())), None)
        if end is None or lines[end].strip() != f"<!-- /table:{name} -->":
            raise TableError(f"{where}:{i}: table {name} has no <!-- /table:{name} --> before the next marker")
        table = TABLES[name][1](load)
        if lines[i:end] != table:
            changed.append(name)
        out += [*table, lines[end]]
        i = end + 1
    return "\n".join(out), changed


def regenerated(root: Path = ROOT, results: Path | None = None):
    """(file name, path, its text with every table regenerated, the tables that changed) of each
    Markdown file in FILES that exists."""
    load = loader(results or root / "benchmarks" / "results")
    for name in FILES:
        path = root / name
        if path.exists():
            yield (name, path, *regenerate(path.read_text(encoding="utf-8"), load, name))


def check(root: Path = ROOT, results: Path | None = None) -> list[str]:
    """One line for each generated table that differs from its JSON; an empty list when all agree."""
    return [f"{name}: table {table} differs from benchmarks/results/{', '.join(TABLES[table][0])} "
            "(python benchmarks/result_tables.py rewrites it)"
            for name, _, _, changed in regenerated(root, results) for table in changed]


def rewrite(root: Path = ROOT, results: Path | None = None) -> list[str]:
    """Rewrite the generated tables in place; the `file: table` names that changed."""
    rewritten = []
    for name, path, new, changed in regenerated(root, results):
        if changed:
            path.write_text(new, encoding="utf-8")
            rewritten += [f"{name}: {table}" for table in changed]
    return rewritten


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(root)
            if problems:
                print(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                      file=sys.stderr)
                return 1
            return 0
        for line in rewrite(root):
            print(f"rewrote {line}")
    except TableError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
