"""`selfreplay export`: a selfreplay run as a transformers model directory."""

from __future__ import annotations

import argparse

from selfreplay.model.export import export_hf


def register(sub) -> None:
    """Add `export` to `sub` (the top parser's subparsers)."""
    p = sub.add_parser(
        "export", help="write a selfreplay run as a transformers model directory",
        description="Export a selfreplay-pretrained run as a transformers model directory with its tokenizer "
                    "(Apertus architecture: loads with AutoModelForCausalLM, no remote code).")
    p.add_argument("run_dir", help="run directory (weights.safetensors, config.yaml, tokenizer.json)")
    p.add_argument("--hf", required=True, metavar="OUT", help="directory to write (must be new or empty)")
    p.add_argument("--domain", help="domain whose token becomes BOS (default: the one the run trained on)")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> None:
    print(f"{args.run_dir} -> {export_hf(args.run_dir, args.hf, args.domain)} (a transformers model directory)")
