"""The `selfreplay` command line: one subcommand per step of the data flow.

Each module here registers its subcommands' parsers and holds their handlers:
`data` (tokenizer train, tokenize, synth), `sample`, `export`, `train` (pretrain,
finetune), `experiments` (demo, continual), `sweep` (sweep, report, reproduce).
Every import sits at a module's top (tests/test_layers.py: only optional
dependencies wait inside functions), so `--help` loads torch too (about 1.6 s).
"""

from __future__ import annotations

import argparse
import sys

from selfreplay import __version__
from selfreplay.cli import data, experiments, export, sample, sweep, train
from selfreplay.errors import SelfReplayError

# in the order `selfreplay --help` lists them: the data flow, then the experiments
MODULES = (data, sample, export, train, experiments, sweep)


def build_parser() -> argparse.ArgumentParser:
    """The `selfreplay` parser; each parsed command carries its handler as `func`."""
    parser = argparse.ArgumentParser(
        prog="selfreplay",
        description="Finetune language models without forgetting, by replaying "
                    "sequences the frozen pretrained model samples from itself.")
    parser.add_argument("--version", action="version", version=f"selfreplay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (1 on a SelfReplayError, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SelfReplayError as e:
        print(f"selfreplay: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("selfreplay: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    return 0
