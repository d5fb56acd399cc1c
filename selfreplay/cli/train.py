"""`selfreplay pretrain` and `finetune`: one training run from a YAML file and dotted overrides."""

from __future__ import annotations

import argparse

from selfreplay.training.loop import run_from_cli


def register(sub) -> None:
    """Add `pretrain` and `finetune` to `sub` (the top parser's subparsers)."""
    for name, func, what in (("pretrain", pretrain, "pretrain a model on the old domain"),
                             ("finetune", finetune, "finetune on the new domain with replay")):
        p = sub.add_parser(name, help=what,
                           description=f"{what[0].upper()}{what[1:]}. Settings come from an optional YAML "
                                       "file, then dotted overrides such as model.D=128 replay.coeff=10.")
        add_settings(p)
        p.set_defaults(func=func)


def add_settings(parser: argparse.ArgumentParser) -> None:
    """The positionals of a configured command: an optional YAML file, then KEY=VALUE overrides."""
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE")


def settings(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(YAML file or None, overrides) of a command made with `add_settings`."""
    # `pretrain k=v`: argparse gives the first override to the optional config positional
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, args.overrides


def pretrain(args: argparse.Namespace) -> None:
    run_from_cli("pretrain", *settings(args))


def finetune(args: argparse.Namespace) -> None:
    run_from_cli("finetune", *settings(args))
