"""The report: every figure rendered from a hand-made sweep directory, with its claim under it."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from selfreplay.cli import main
from selfreplay.config import RunConfig, merge, to_dict
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.continual import ContinualConfig
from selfreplay.experiments.figures.grid import grid_figure, grid_runs, grid_summary, matrix
from selfreplay.experiments.report import write_report
from selfreplay.experiments.sweep import Run, expand_all, parse_sweep

SWEEP = {
    "description": "Every figure, from hand-made runs.",
    "stages": [
        {"name": "pre", "mode": "pretrain", "grid": {"stop.tokens_per_param": [1, 10, 100, 1000]}},
        {"name": "ft", "mode": "finetune", "init": "pre",
         "list": [{"replay.method": "none"}, {"replay.method": "kl", "replay.coeff": 1},
                  {"replay.method": "kl", "replay.coeff": 10},
                  {"replay.method": "kl", "replay.coeff": "auto", "replay.budget": 0.01}]},
        {"name": "sizes", "mode": "pretrain", "grid": {"model.D": [32, 64, 128, 256]}},
        {"name": "size_ft", "mode": "finetune", "init": "sizes",
         "list": [{"replay.method": "none"}, {"replay.method": "kl", "replay.coeff": 10}]},
        {"name": "mixes", "mode": "pretrain", "grid": {"data.mix_fraction": [0, 0.2, 0.4, 0.6, 0.8, 1]}},
        {"name": "trajectories", "mode": "finetune", "init": {"stage": "pre", "where": {"stop.tokens_per_param": [1, 1000]}},
         "settings": {"replay.method": "kl"}},
        {"name": "methods", "mode": "finetune", "init": {"stage": "pre", "where": {"stop.tokens_per_param": 10}},
         "list": [{"replay.method": "none"}, {"replay.method": "kl", "replay.source": "self"},
                  {"replay.method": "kl", "replay.source": "real"}, {"lora.rank": 16}]},
        {"name": "lr", "mode": "finetune", "init": {"stage": "pre", "where": {"stop.tokens_per_param": 10}},
         "grid": {"optim.lr": [1e-5, 1e-4, 1e-3]}},
        {"name": "lr_replay", "mode": "finetune", "init": {"stage": "pre", "where": {"stop.tokens_per_param": 10}},
         "settings": {"optim.lr": 1e-3},
         "list": [{"replay.method": "replace", "replay.coeff": 0.125}, {"replay.method": "kl", "replay.coeff": 10}]},
        {"name": "tasks", "mode": "continual", "list": [{"replay.method": "none"}, {"replay.method": "ntp"}]},
    ],
    "report": [{"figure": "methods", "stage": "methods"}, {"figure": "tokens_per_param", "stage": "ft"},
               {"figure": "model_size", "stage": "size_ft"},
               {"figure": "mix_frontier", "frontier": "mixes", "stage": "trajectories"},
               {"figure": "learning_rate", "stages": ["lr", "lr_replay"]}, {"figure": "continual", "stage": "tasks"},
               {"figure": "replay_coefficient", "stage": "ft"},
               {"figure": "replay_coefficient", "stage": "size_ft"}],  # no held run there: nothing drawn
}


def nested(flat: dict) -> dict:
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def outcome(run) -> tuple[dict, list[dict]]:
    """A plausible summary and curve for one hand-made run."""
    s = {**{"replay.method": "none", "replay.coeff": 10.0, "replay.source": "self", "lora.rank": 0, "optim.lr": 1e-4,
            "model.D": 64, "stop.tokens_per_param": 10, "data.mix_fraction": 0.0}, **run.settings}
    if run.mode == "continual":
        keep = 1.0 if s["replay.method"] != "none" else 0.1
        matrix = [[1.0, 0, 0, 0], [keep, 1.0, 0, 0], [keep, keep, 1.0, 0], [keep, keep, keep, 1.0]]
        return {"mode": "continual", "tasks": ["addition", "reversal", "sorting", "modular_addition"],
                "accuracy": matrix, "average_accuracy": sum(matrix[-1]) / 4, "bwt": keep - 1.0,
                "retention": [keep] * 3, "method": s["replay.method"], "coeff": s["replay.coeff"]}, []
    if run.mode == "pretrain":
        params = 12 * s["model.D"] ** 2
        tokens = int(s["stop.tokens_per_param"] * params)
        f = s["data.mix_fraction"]
        summary = {"mode": "pretrain", "tokens": tokens, "non_embedding_params": params, "train_seconds": 10.0,
                   "old_loss": 3.0 + 0.8 * f ** 2, "mix_loss": 3.8 - 0.8 * (1 - (1 - f) ** 2), "stop_reason": "budget"}
        curve = [{"step": i, "tokens": tokens * i // 4, "train_seconds": i, "old_loss": 5 - i * 0.5} for i in range(5)]
        return summary, curve
    tpp = run.init.settings.get("stop.tokens_per_param", 10)
    width = run.init.settings.get("model.D", 64)
    floor = 0.002 * math.log10(tpp * 10) * 64 / width
    none, held = s["replay.method"] == "none", s["replay.coeff"] == "auto"
    forgetting = 0.003 * s["optim.lr"] / 1e-5 if none else floor * (1 + 1 / (20 if held else s["replay.coeff"]))
    seconds = 2e-3 / s["optim.lr"]
    summary = {"mode": "finetune", "old_loss_0": 3.0, "old_loss": 3.0 + forgetting, "forgetting": forgetting,
               "new_loss_0": 4.0, "new_loss": 3.5, "stop_reason": "target_loss", "time_to_target_seconds": seconds,
               "time_to_target_steps": 10, "train_seconds": seconds, "compute_multiplier": 0.9, "steps": 40}
    curve = [{"step": i, "train_seconds": i * seconds / 4, "new_loss": 4.0 - i * 0.125,
              "old_loss": 3.0 + forgetting * i / 4} for i in range(5)]
    if held:  # c rises to 20, the replay KL settles at the budget; the longest-pretrained model is capacity bound
        bound = tpp == 1000
        summary |= {"replay_coeff_end": 20.0, "capacity_bound": bound, "capacity_bound_since": 30 if bound else None}
        for p, c, kl in zip(curve, (10, 14, 18, 20, 20), (None, 0.02, 0.014, 0.011, 0.03 if bound else 0.0105)):
            p |= {"replay_coeff": c, "replay_kl": kl}
    return summary, curve


@pytest.fixture
def sweep_dir(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    for run in expand_all(parse_sweep(SWEEP, {}), tmp_path):
        run.run_dir.mkdir(parents=True)
        defaults = to_dict(ContinualConfig() if run.mode == "continual" else RunConfig())
        config = merge(defaults, nested(run.settings))  # a run's config.yaml holds every key
        if run.init is not None:
            config["init"] = str(run.init.run_dir)
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        summary, curve = outcome(run)
        (run.run_dir / "summary.json").write_text(json.dumps(summary))
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in curve))
    return tmp_path


def test_report_renders_every_figure_with_its_claim(sweep_dir):
    path = write_report(sweep_dir)
    text = path.read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(images) == sorted(f"figures/{name}.png" for name in
                                    ("methods", "tokens_per_param", "model_size", "mix_frontier", "learning_rate",
                                     "continual", "replay_coefficient"))
    for image in images:
        assert (sweep_dir / image).stat().st_size > 10_000  # a real PNG, not an empty canvas
    claims = text.split("## Claims")[1].split("###")[0]
    assert claims.count("**yes**") == 6, claims  # the hand-made numbers follow the paper
    assert "compute ratio 100.0" in text  # replay at 1e-3 vs lr=1e-5, the fastest that forgets no more
    assert "#### Runs (" in text and "| tasks | method=ntp | done |" in text


def test_report_says_when_a_claim_does_not_hold(sweep_dir):
    run = sweep_dir / "ft" / "stop.tokens_per_param=1000,method=none".replace("stop.tokens_per_param", "tokens_per_param")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "forgetting": 0.0}))  # no replay beats replay here
    claims = write_report(sweep_dir).read_text().split("## Claims")[1].split("###")[0]
    line = next(x for x in claims.splitlines() if "tokens per parameter" in x)
    assert line.endswith("**no** |")


def test_report_of_a_single_run_and_the_command_line(sweep_dir, capsys):
    run = sweep_dir / "methods" / "tokens_per_param=10,method=kl,source=real"
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "![Method comparison](figures/" in text and "| forgetting |" in text
    assert (run / "figures" / f"{run.name}.png").exists()
    assert main(["report", str(sweep_dir / "logs")]) == 1
    assert "neither a sweep directory" in capsys.readouterr().err


def test_report_flags_a_best_coefficient_at_the_edge_of_the_sweep(sweep_dir):
    text = write_report(sweep_dir).read_text()
    length = text.split("### Forgetting against pretraining length")[1].split("### ")[0]
    size = text.split("### Forgetting against model size")[1].split("### ")[0]
    # the hand-made forgetting falls with the coefficient: c=10, the largest of c=1 and c=10, wins everywhere
    assert length.count("| 10 (largest tried) |") == 4
    assert "At 4 of 4 points the best coefficient is the largest tried" in length
    # one coefficient is no sweep: nothing to widen
    assert "largest tried" not in size


def test_report_judges_capacity_on_the_runs_held_to_a_budget_and_draws_their_coefficient(sweep_dir):
    text = write_report(sweep_dir).read_text()
    length = text.split("### Forgetting against pretraining length")[1].split("### ")[0]
    # the claim is read on the held runs (a coefficient nobody searched), the best fixed c still shown beside them
    assert "forgetting held to B=0.01 +0.002, +0.004, +0.006, +0.008" in length
    assert "| held to B: forgetting | steps | c at the end | capacity bound from |" in length
    assert length.count("| 10 (largest tried) | 40 |") == 4  # the best fixed c, and its steps to the target
    assert "| 20 | 30 |" in length  # the capacity-bound run: c at the end, the step it turned bound
    held = text.split("### The replay coefficient held to a budget")[1].split("### ")[0]
    assert "At the end 3 of 4 runs hold the replay KL within 1.5x their budget; 1 turned capacity bound" in held
    assert "| 1000 |" not in held and held.count("| 0.01 | 20 |") == 4  # one row per held run
    assert "3.00 | 30 |" in held  # KL three times the budget, bound from step 30


class FakeRun:
    def __init__(self, forgetting, reached=True, bound=False, **settings):
        self.summary = {"forgetting": forgetting, "stop_reason": "target_loss" if reached else "budget",
                        "capacity_bound": bound}
        self.settings = {"replay.budget": 0.01, **settings}

    def value(self, key):
        return self.settings.get(key)


@pytest.mark.parametrize("held, reproduced", [
    ([(0.004, True, False), (0.006, True, False), (0.02, False, True)], True),  # bound at the hard end: holds
    ([(0.004, True, False), (0.02, False, True), (0.006, True, False)], False),  # bound in the middle
    ([(0.004, True, False), (0.006, True, False), (0.02, False, False)], False),  # missed, and not for capacity
    ([(0.006, True, False), (0.004, True, False), (0.02, False, True)], False),  # forgetting falls
])
def test_a_capacity_claim_read_on_held_runs_puts_the_bound_runs_at_the_hard_end(held, reproduced):
    from selfreplay.experiments.figures.capacity import CapacityPoint, capacity_finding

    points = [CapacityPoint(x, FakeRun(1.0), None, [], FakeRun(f, r, b, **{"replay.coeff": "auto"}))
              for x, (f, r, b) in zip((1, 10, 100), held)]
    text, holds = capacity_finding(points, True, "tokens/param 1, 10, 100")
    assert holds is reproduced and text.startswith("forgetting held to B=0.01")
    size_text, size_holds = capacity_finding(points[::-1], False, "widths")  # size: the small end is the hard one
    assert size_holds is reproduced
    if reproduced:
        assert "+0.004, +0.006, capacity bound; no replay +1.000" in text


# ---------------------------------------------------------------- the capacity grid

def grid_run(cell, method, forgetting, multiplier=0.9, reached=True, steps=100):
    """A hand-made finetuning run from the pretrained cell (width, tokens/param): method none, kl or auto."""
    width, tpp = cell
    init = Run("cells", "pretrain", Path(f"cells/D={width},tpp={tpp}"), {"model.D": width, "stop.tokens_per_param": tpp})
    replay = {"none": {"replay.method": "none"}, "kl": {"replay.method": "kl", "replay.coeff": 10},
              "auto": {"replay.method": "kl", "replay.coeff": "auto", "replay.budget": 0.1}}[method]
    run = Run("finetune", "finetune", Path(f"finetune/D={width},tpp={tpp},{method}"),
              {"replay.source": "self", **replay}, init, status="done")
    run.summary = {"forgetting": forgetting, "compute_multiplier": multiplier, "steps": steps,
                   "stop_reason": "target_loss" if reached else "budget"}
    return run


def paper_like_grid(widths=(16, 32), budgets=(3, 30, 300)):
    """No replay forgets more the longer a cell was pretrained, KL c=10 little; the auto run at (32, 300)
    missed the target. Returned in a shuffled order: the selection must not depend on it."""
    runs = []
    for i, w in enumerate(widths):
        for j, b in enumerate(budgets):
            runs += [grid_run((w, b), "none", 0.5 + j ** 2 - 0.1 * i, multiplier=0.6, steps=80),
                     grid_run((w, b), "kl", 0.01 * j, multiplier=0.9, steps=100),
                     grid_run((w, b), "auto", 0.05, multiplier=0.95, reached=(w, b) != (32, 300), steps=160)]
    return runs[::-1]


def test_the_grid_figure_puts_each_run_in_its_cell_and_method():
    grid = grid_runs(paper_like_grid())
    assert grid.widths == [16, 32] and grid.budgets == [3.0, 30.0, 300.0]
    assert list(grid.methods) == ["no replay", "self-KL c=10", "self-KL B=0.1"]  # no replay first
    rounded = lambda m: [[round(v, 3) for v in row] for row in m]  # noqa: E731
    assert rounded(matrix(grid, "no replay", "forgetting")) == [[0.5, 1.5, 4.5], [0.4, 1.4, 4.4]]
    assert rounded(matrix(grid, "self-KL c=10", "forgetting")) == [[0.0, 0.01, 0.02], [0.0, 0.01, 0.02]]
    assert matrix(grid, "self-KL B=0.1", "compute_multiplier")[1] == [0.95, 0.95, None]  # missed: no value there


def test_the_grid_finding_needs_rising_rows_and_replay_under_no_replay_in_every_cell():
    text, holds = grid_summary(grid_runs(paper_like_grid()))
    assert holds is True
    assert "rises with tokens per parameter along 2 of 2 width rows (D=16: +0.50, +1.50, +4.50; D=32:" in text
    assert "it rises most from 30 to 300 tokens/param (+3.00 nats, mean over widths)" in text
    assert "self-KL c=10: forgets less than no replay in 6 of 6 cells" in text
    assert "self-KL B=0.1: forgets less than no replay in 5 of 5 cells" in text and "1 of 6 cells missed" in text
    assert "no-replay multiplier 0.60 to 0.60" in text and "multiplier 0.90 to 0.90, >= 0.85 in 6 of 6" in text

    falls = [r for r in paper_like_grid() if (r.value("replay.method"), r.init.settings["model.D"]) != ("none", 32)]
    falls += [grid_run((32, 3), "none", 3.0), grid_run((32, 30), "none", 1.4), grid_run((32, 300), "none", 2.4)]
    text, holds = grid_summary(grid_runs(falls))
    assert holds is False and "along 1 of 2 width rows" in text and "D=32: +3.00, +1.40, +2.40 (not monotone)" in text

    above = [r for r in paper_like_grid() if not (r.value("replay.coeff") == 10 and r.init.settings["model.D"] == 16)]
    above += [grid_run((16, 3), "kl", 0.0), grid_run((16, 30), "kl", 2.0), grid_run((16, 300), "kl", 0.0)]
    text, holds = grid_summary(grid_runs(above))
    assert holds is False and "self-KL c=10: forgets less than no replay in 5 of 6 cells" in text


def test_the_grid_figure_draws_two_heatmaps_a_method_and_refuses_two_runs_in_one_cell(tmp_path):
    figure = grid_figure({"figure": "grid", "stage": "finetune"}, paper_like_grid(), tmp_path)
    assert figure.path.stat().st_size > 10_000 and figure.finding.reproduced is True
    assert "| 32 | 300 | +4.400 | 0.60 | 80 | 1.00 | +0.020 | 0.90 | 100 | 0.80 | +0.050 (missed) | - | - | - |" in figure.table
    with pytest.raises(SelfReplayError, match="two self-KL c=10 runs start from width 16 at 3 tokens/param"):
        grid_figure({"figure": "grid", "stage": "finetune"}, paper_like_grid() + [grid_run((16, 3), "kl", 0.0)], tmp_path)
