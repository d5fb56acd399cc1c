"""Sweeps: grid and list expansion, values from earlier stages, and the runner on tiny models."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep import From, Run, derive, expand, load_runs, parse_sweep, point_name, run_sweep

TINY = {"model.D": 16, "model.L": 1, "model.H": 8, "model.T": 16, "data.val_sequences": 8,
        "optim.batch_size": 4, "optim.warmup_steps": 1, "log.every_tokens": 128}


def stages(*raw):
    return parse_sweep({"stages": list(raw)}, {})


SWEEP_STAGES = [{"name": "pre", "mode": "pretrain", "grid": {"stop.tokens": [100, 1000], "optim.lr": ["1e-3", "3e-3"]}},
                {"name": "other", "mode": "pretrain", "grid": {"seed": [1, 2]}}]


def test_grid_and_list_expand_to_every_combination_with_readable_names(tmp_path):
    sweep = stages(
        {"name": "pre", "mode": "pretrain", "settings": {"model.D": 32},
         "grid": {"stop.tokens": [100, 1000], "optim.lr": ["1e-3", "3e-3"]}},
        {"name": "ft", "mode": "finetune", "init": {"stage": "pre", "where": {"stop.tokens": 1000}},
         "grid": {"replay.coeff": [1, 10]},
         "list": [{"replay.method": "none"}, {"replay.method": "kl", "replay.source": "real"}]})
    pre = expand(sweep.stages[0], tmp_path, {})
    assert [r.run_dir.name for r in pre] == ["tokens=100,lr=0.001", "tokens=100,lr=0.003",
                                             "tokens=1000,lr=0.001", "tokens=1000,lr=0.003"]
    assert pre[3].settings == {"model.D": 32, "stop.tokens": 1000, "optim.lr": 0.003}
    ft = expand(sweep.stages[1], tmp_path, {"pre": pre})
    assert len(ft) == 2 * 2 * 2  # two init runs match `where`, times 2 coefficients, times 2 list items
    assert {r.init.run_dir.name for r in ft} == {"tokens=1000,lr=0.001", "tokens=1000,lr=0.003"}
    assert ft[1].run_dir == tmp_path / "ft" / "tokens=1000,lr=0.001,coeff=1,method=kl,source=real"
    assert ft[1].settings == {"replay.coeff": 1, "replay.method": "kl", "replay.source": "real"}
    scratch = parse_sweep({"stages": [*SWEEP_STAGES, {"name": "ft2", "mode": "finetune",
                                                      "init": ["pre", {"stage": "other", "where": {"seed": 2}}]}]}, {})
    by_stage = {"pre": pre, "other": expand(scratch.stages[1], tmp_path, {})}
    names = [r.run_dir.name for r in expand(scratch.stages[2], tmp_path, by_stage)]
    assert names == [f"pre-{r.run_dir.name}" for r in pre] + ["other-seed=2"]  # several init stages: named by stage


def test_point_names_are_filesystem_safe_and_disambiguate_keys():
    name = point_name({"optim.batch_size": 8, "replay.batch_size": 2, "data.train": "/data/my corpus/es.bin"},
                      ["optim.batch_size", "replay.batch_size", "data.train"])
    assert name == "optim.batch_size=8,replay.batch_size=2,train=es"
    assert "/" not in point_name({"a.b": "x/y z"}, ["a.b"]) and point_name({}, []) == "run"


@pytest.mark.parametrize("raw, fragment", [
    ({"name": "a", "mode": "pretrain", "gird": {}}, "did you mean 'grid'"),
    ({"name": "a", "mode": "pretrian"}, "did you mean 'pretrain'"),
    ({"name": "a", "mode": "pretrain", "settings": {"replay.coef": 1}}, "did you mean 'replay.coeff'"),
    ({"name": "a", "mode": "pretrain", "settings": {"out": "x"}}, "set by the sweep"),
    ({"name": "a", "mode": "finetune", "init": "nowhere"}, "not an earlier stage"),
    ({"name": "a", "mode": "finetune", "settings": {"stop.target_loss": {"from": "x", "mni": "new_loss"}}},
     "did you mean 'min'"),
    ({"name": "a", "mode": "pretrain", "grid": {"optim.lr": 0.1}}, "non-empty list"),
    ({"name": "a", "mode": "pretrain", "list": [{"optim.lr": {"from": "b", "min": "x"}}]}, "takes plain values"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_fix(raw, fragment):
    with pytest.raises(SelfReplayError, match=fragment):
        stages(raw)


def test_unknown_profile_and_var_name_the_nearest(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"small": {"lr": 1}, "paper": {"lr": 2}},
                                    "stages": [{"name": "a", "mode": "pretrain", "settings": {"optim.lr": "${lr}"}}]}))
    with pytest.raises(SelfReplayError, match="did you mean 'small'"):
        run_sweep(path, ["profile=smal"], tmp_path / "out")
    with pytest.raises(SelfReplayError, match="did you mean 'lr'"):
        run_sweep(path, ["lrr=3"], tmp_path / "out")


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_below_one_are_refused_in_one_line(workers, tmp_path, capsys):
    from selfreplay.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "mode": "pretrain"}]}))
    with pytest.raises(SelfReplayError, match=f"--workers must be >= 1, got {workers}"):
        run_sweep(path, [], tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists()  # refused before anything is made or run
    assert main(["sweep", str(path), "--workers", str(workers), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--workers must be >= 1, got {workers}" in err and len(err.splitlines()) == 1


def test_a_packaged_experiment_is_named_and_a_misspelt_one_is_one_line(tmp_path, monkeypatch, capsys):
    from selfreplay.cli import main
    from selfreplay.experiments.packaged import sweep_path
    from selfreplay.experiments.sweep.runner import sweep_directory

    monkeypatch.chdir(tmp_path)
    assert sweep_path("capacity").name == "capacity.yaml"
    assert sweep_directory(sweep_path("capacity"), None) == tmp_path / "sweeps" / "capacity"  # the default --out
    assert main(["sweep", "capacty", "profile=small"]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown experiment 'capacty'; did you mean 'capacity'?" in err and len(err.splitlines()) == 1


def finished(stage, init, **values):
    run = Run(stage, "finetune", Path(f"/s/{stage}/{len(values)}"), settings={"replay.coeff": values.pop("coeff", 1)},
              init=init, status="done", summary=values)
    return run


def test_derived_values_pick_over_finished_runs_grouped_by_init():
    a, b = (Run("pre", "pretrain", Path(f"/s/pre/{n}"), {}, status="done") for n in "ab")
    probe = [finished("probe", a, coeff=1, new_loss=3.0, forgetting=0.2),
             finished("probe", a, coeff=10, new_loss=3.4, forgetting=0.01),
             finished("probe", b, coeff=1, new_loss=2.5, forgetting=0.05),
             finished("probe", b, coeff=10, new_loss=2.0, forgetting=0.3)]
    probe.append(Run("probe", "finetune", Path("/s/probe/failed"), {}, init=a, status="failed",
                     summary={"new_loss": 1.0}))
    consumer = Run("ft", "finetune", Path("/s/ft/x"), {}, init=a)
    assert derive(From("probe", "min", "new_loss", plus=0.05), consumer, probe) == pytest.approx(2.05)
    assert derive(From("probe", "max", "new_loss", match=("init",)), consumer, probe) == 3.4
    best = From("probe", "argmin", "forgetting", take="replay.coeff", match=("init",))
    assert derive(best, consumer, probe) == 10
    assert derive(best, Run("ft", "finetune", Path("/s/ft/y"), {}, init=b), probe) == 1
    with pytest.raises(SelfReplayError, match="no finished run of stage 'probe'"):
        derive(best, Run("ft", "finetune", Path("/s/ft/z"), {}, init=consumer), probe)


def test_a_diverged_point_is_failed_with_what_diverged(tmp_path):
    from selfreplay.experiments.sweep import read_outcome

    run = Run("pre", "pretrain", tmp_path, {})
    (tmp_path / "summary.json").write_text(json.dumps({"stop_reason": "diverged",
                                                      "diverged": "the gradient norm is nan at step 3 (lr 1e+09)"}))
    read_outcome(run)
    assert (run.status, run.error) == ("failed", "diverged: the gradient norm is nan at step 3 (lr 1e+09)")


# ---------------------------------------------------------------- the runner, on tiny models

@pytest.fixture(scope="module")
def token_files(corpora, tokenizer, tmp_path_factory):
    from selfreplay.data.tokens import write_token_file

    root = tmp_path_factory.mktemp("sweep_data")
    tokenizer.save(root / "tok")
    for language in ("en", "es"):
        write_token_file(str(corpora[language]), tokenizer, domain=language, out=root / f"{language}.bin")
    return [f"old={root / 'en.bin'}", f"new={root / 'es.bin'}", f"tokenizer={root / 'tok'}"]


def write_sweep(path, *raw):
    common = {**TINY, "model.V": "${vocab}"}
    for stage in raw:
        stage["settings"] = {**common, **stage.get("settings", {})}
        if stage["mode"] == "pretrain":
            stage["settings"].update({"data.tokenizer": "${tokenizer}", "data.train": "${old}"})
        else:
            for key in ("model.D", "model.L", "model.H", "model.T", "model.V", "data.val_sequences"):
                stage["settings"].pop(key)
            stage["settings"]["data.train"] = "${new}"
    path.write_text(yaml.safe_dump({"stages": list(raw)}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def chained(token_files, tmp_path_factory):
    """A pretraining grid with one bad point, a probe from it, and a stage whose target comes from the probe."""
    root = tmp_path_factory.mktemp("chained")
    path = write_sweep(
        root / "sweep.yaml",
        {"name": "pre", "mode": "pretrain", "settings": {"stop.tokens": 512}, "grid": {"optim.lr": [3e-3, -1]}},
        {"name": "probe", "mode": "finetune", "init": "pre", "settings": {"stop.tokens": 256}},
        {"name": "ft", "mode": "finetune", "init": "pre",
         "settings": {"stop.tokens": 256, "replay.batch_size": 2, "replay.buffer": 1, "replay.method": "kl",
                      "stop.target_loss": {"from": "probe", "min": "new_loss", "plus": 0.5, "match": ["init"]}}})
    lines = []
    runs = run_sweep(path, token_files, root / "out", workers=2, say=lines.append)
    return root / "out", runs, lines


def test_a_failing_point_is_recorded_and_the_others_run(chained):
    out, runs, _ = chained
    status = {r.name: (r.status, r.error) for r in runs}
    assert status["pre/lr=0.003"] == ("done", None)
    assert status["pre/lr=-1"][0] == "failed" and "optim.lr must be > 0" in status["pre/lr=-1"][1]
    assert status["probe/lr=-1"] == ("failed", "its init run pre/lr=-1 did not finish")
    assert status["probe/lr=0.003"][0] == "done" and status["ft/lr=0.003"][0] == "done"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["stage"], r["run_dir"], r["status"]) for r in rows] == [
        ("pre", "pre/lr=0.003", "done"), ("pre", "pre/lr=-1", "failed"), ("probe", "probe/lr=0.003", "done"),
        ("probe", "probe/lr=-1", "failed"), ("ft", "ft/lr=0.003", "done"), ("ft", "ft/lr=-1", "failed")]
    assert "optim.lr must be > 0" in rows[1]["error"] and rows[0]["optim.lr"] == "0.003"
    assert float(rows[0]["old_loss"]) > 0 and rows[4]["init"] == "pre/lr=0.003"


def test_a_stage_takes_settings_from_an_earlier_stages_results(chained):
    out, runs, _ = chained
    probe = next(r for r in runs if r.name == "probe/lr=0.003")
    ft_config = yaml.safe_load((out / "ft" / "lr=0.003" / "config.yaml").read_text())
    assert ft_config["stop"]["target_loss"] == pytest.approx(probe.summary["new_loss"] + 0.5)
    assert ft_config["init"] == str(out / "pre" / "lr=0.003")
    summary = next(r for r in runs if r.name == "ft/lr=0.003").summary
    assert summary["stop_reason"] == "target_loss"  # the probe's loss + 0.5 is reached at the first log point
    _, loaded = load_runs(out)  # the report reads the same points back from the directory
    assert [(r.name, r.status) for r in loaded] == [(r.name, r.status) for r in runs]


def sweep_command(path, out, *extra):
    return [sys.executable, "-m", "selfreplay.cli", "sweep", str(path), *extra, "--out", str(out)]


def test_a_killed_sweep_resumes_without_rerunning_finished_points(token_files, tmp_path):
    path = write_sweep(tmp_path / "sweep.yaml", {"name": "pre", "mode": "pretrain",
                                                 "settings": {"stop.tokens": 1024}, "grid": {"seed": [1, 2]}})
    out = tmp_path / "out"
    first = out / "pre" / "seed=1" / "summary.json"
    sweep = subprocess.Popen(sweep_command(path, out, *token_files, "--workers", "1"), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and the point it is running
    sweep.wait()
    assert first.exists() and not (out / "pre" / "seed=2" / "summary.json").exists()
    finished_at = first.stat().st_mtime_ns

    result = subprocess.run(sweep_command(path, out, *token_files, "--workers", "1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 points, 1 finished, 1 to run" in result.stdout
    assert first.stat().st_mtime_ns == finished_at
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] * 2


def test_the_submitit_launcher_runs_the_same_points(token_files, tmp_path):
    pytest.importorskip("submitit")
    path = write_sweep(tmp_path / "sweep.yaml", {"name": "pre", "mode": "pretrain",
                                                 "settings": {"stop.tokens": 256}, "grid": {"seed": [1, 2]}})
    runs = run_sweep(path, token_files, tmp_path / "out", workers=2, launcher="submitit", cluster="local",
                     say=lambda line: None)
    assert [(r.name, r.status) for r in runs] == [("pre/seed=1", "done"), ("pre/seed=2", "done")]
    assert any((tmp_path / "out" / "submitit").iterdir())  # the jobs went through submitit's folder


def test_a_finished_point_whose_settings_changed_is_flagged_not_reused(token_files, tmp_path):
    stage = {"name": "pre", "mode": "pretrain", "settings": {"stop.tokens": 256, "optim.lr": 3e-3}}
    path = write_sweep(tmp_path / "sweep.yaml", dict(stage))
    assert run_sweep(path, token_files, tmp_path / "out", say=lambda line: None)[0].status == "done"
    write_sweep(path, {**stage, "settings": {"stop.tokens": 256, "optim.lr": 1e-3}})
    run = run_sweep(path, token_files, tmp_path / "out", say=lambda line: None)[0]
    assert run.status == "failed" and "optim.lr: 0.003 -> 0.001" in run.error and "delete" in run.error
