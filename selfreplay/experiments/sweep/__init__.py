"""Sweeps: many runs from one file, in stages, each point a run directory; resumable.

    selfreplay sweep capacity profile=small --workers 2      # a packaged experiment, by name
    selfreplay sweep my_sweep.yaml profile=small             # a sweep file of your own

A sweep file is YAML:

    description: forgetting against pretraining length     # shown at the top of the report
    vars: {lr: 3e-3}               # ${NAME} in any value; NAME=VALUE on the command line sets one
    profiles:                      # named sets of vars, chosen with profile=NAME (default: the first)
      small: {budgets: [10, 100]}
      paper: {budgets: [10, 100, 1000]}
    corpus: {words: 300000, vocab: 2048}   # the built-in synthetic corpus, made unless old/new/tokenizer are given
    stages:                        # run in order; a stage starts when every earlier one has finished
      - name: pretrain
        mode: pretrain             # pretrain | finetune | continual: the selfreplay subcommand each point runs
        settings: {model.D: 64, data.tokenizer: ${tokenizer}, data.train: ${old}, model.V: ${vocab}}
        grid: {stop.tokens_per_param: ${budgets}}     # every combination of the listed values
      - name: probe
        mode: finetune
        init: pretrain             # one point per run of stage pretrain (init=its run directory)
        settings: {data.train: ${new}, stop.patience: 3, stop.tokens: 1e6}
      - name: finetune
        mode: finetune
        init: pretrain
        settings:
          stop.target_loss: {from: probe, max: new_loss, plus: 0.05}
        list: [{replay.method: none}, {replay.method: kl, replay.coeff: 10}]   # explicit points
    report: [{figure: tokens_per_param, stage: finetune}]                   # see selfreplay.experiments.report

Settings are dotted config keys (`selfreplay pretrain --help` lists them); `grid` and `list`
combine as grid × list. Built-in vars: `old`, `new` (token files), `tokenizer` (its directory),
`vocab` (its size) and `sweep` (the sweep directory). `init` may also filter its stage's runs,
`init: {stage: pretrain, where: {stop.tokens_per_param: [10, 1000]}}`, or list several such.

A value taken from an earlier stage's finished runs:

    {from: STAGE, min: KEY}                   the least KEY over its runs (max: the greatest)
    {from: STAGE, argmin: KEY, take: KEY2}    KEY2 of the run with the least KEY (argmax: greatest)
    ... plus: X, times: Y                     then · Y + X
    ... match: [init]                         only runs whose listed keys equal this point's

A KEY is a summary key (new_loss, forgetting, ...) or a setting (replay.coeff, init, ...).

Each point runs in `SWEEP_DIR/STAGE/NAME`, NAME made from the settings it varies
(`tokens_per_param=10,coeff=1`); its output goes to `SWEEP_DIR/logs/STAGE/NAME.log`. A point is
done when its summary.json exists (and does not say `diverged`), so running the same command
again skips finished points and resumes a killed sweep; a failing point is recorded with the
last line of its output and the others go on. `SWEEP_DIR/results.csv` has one row per point:
stage, run directory, status, error, its settings and its summary.

The modules, in the order a sweep flows through them: `values` (numbers, dotted keys, ${vars},
profiles), `sweep_file` (the schema, checked), `plan` (points, their names and outcomes, values
from earlier stages), `launch` (running points), `results` (results.csv, reading a sweep back)
and `runner` (the whole sweep). The packaged experiments are found by `selfreplay.experiments.packaged`.
"""

from selfreplay.experiments.sweep.launch import cores, default_workers
from selfreplay.experiments.sweep.plan import (
                                               SUMMARY_FILE,
                                               Run,
                                               derive,
                                               expand,
                                               expand_all,
                                               format_value,
                                               point_name,
                                               read_outcome,
)
from selfreplay.experiments.sweep.results import (
                                               RESULTS_FILE,
                                               SWEEP_FILE,
                                               load_runs,
                                               write_results,
)
from selfreplay.experiments.sweep.runner import (
                                               check_sweep,
                                               resolve_sweep,
                                               run_sweep,
                                               sweep_cli,
)
from selfreplay.experiments.sweep.sweep_file import (
                                               From,
                                               InitSpec,
                                               Stage,
                                               Sweep,
                                               parse_sweep,
)
from selfreplay.experiments.sweep.values import choose_vars

__all__ = ["RESULTS_FILE", "SUMMARY_FILE", "SWEEP_FILE", "From", "InitSpec", "Run", "Stage", "Sweep", "check_sweep",
           "choose_vars", "cores", "default_workers", "derive", "expand", "expand_all", "format_value", "load_runs",
           "parse_sweep", "point_name", "read_outcome", "resolve_sweep", "run_sweep", "sweep_cli", "write_results"]
