"""The `selfreplay` command line: one subcommand per step of the data flow.

Heavy imports (torch, tokenizers) happen inside the handlers so that `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import sys

from selfreplay.errors import SelfReplayError


def _tokenizer_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from selfreplay.config import check_output_dir
    from selfreplay.data.tokenizer import TOKENIZER_FILE, train_tokenizer

    check_output_dir(args.out, "--out")
    if (Path(args.out) / TOKENIZER_FILE).exists():
        raise SelfReplayError(f"{args.out} already holds a tokenizer, and token files made with it would stop "
                              "loading if it changed: choose another --out, or delete it first")
    domains = [d for d in args.domains.split(",") if d] if args.domains else []
    tok = train_tokenizer(args.corpus, vocab_size=args.vocab_size, out_dir=args.out,
                          domains=domains, text_field=args.text_field)
    print(f"tokenizer: vocab {tok.vocab_size}, domains {tok.domain_ids}, eos {tok.eos_id} -> {args.out}")


def _tokenize(args: argparse.Namespace) -> None:
    from selfreplay.data.tokenizer import load_tokenizer
    from selfreplay.data.tokens import write_token_file

    tok = load_tokenizer(args.tokenizer)
    meta = write_token_file(args.corpus, tok, domain=args.domain, out=args.out,
                            max_tokens=args.max_tokens, text_field=args.text_field)
    print(f"{meta.num_tokens:,} tokens from {meta.num_documents:,} documents "
          f"(domain {meta.domain!r} = id {meta.domain_id}) -> {args.out} "
          f"in {meta.seconds:.2f} s")


def _synth(args: argparse.Namespace) -> None:
    from selfreplay.data.synth import write_corpus

    paths = write_corpus(args.out, num_words=args.words, seed=args.seed)
    for language, path in paths.items():
        print(f"{language}: {path}")


def _sample(args: argparse.Namespace) -> None:
    source = args.run_dir.removeprefix("init=")
    if args.out is not None:  # a replay pool file, drawn once and reused by runs
        if not source.startswith("hf:"):
            raise SelfReplayError("--out writes a replay pool of a Hugging Face model: give init=hf:NAME_OR_PATH")
        if args.length is None:
            raise SelfReplayError("a replay pool needs --length, the tokens per sample")
        from selfreplay.replay.hf_pool import sample_pool

        header = sample_pool(source, args.out, count=args.n, length=args.length, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system,
                             prompts=args.prompts, stop_at_eos=not args.no_stop_at_eos, device=args.device,
                             trust_remote_code=args.trust_remote_code)
        print(f"{args.n} samples of {header['model']} ({header['format']}) -> {args.out}")
        return
    if args.domain is None:
        raise SelfReplayError("give --domain, the domain a sample starts from (or --out POOL for a Hugging Face model)")
    from selfreplay.replay.sampling import sample_cli

    sample_cli(source, domain=args.domain, num_samples=args.n, length=args.length,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, device=args.device)


def _export(args: argparse.Namespace) -> None:
    from selfreplay.model.export import export_hf

    print(f"{args.run_dir} -> {export_hf(args.run_dir, args.hf, args.domain)} (a transformers model directory)")


def _pretrain(args: argparse.Namespace) -> None:
    from selfreplay.training.loop import run_from_cli

    run_from_cli("pretrain", args.config, args.overrides)


def _finetune(args: argparse.Namespace) -> None:
    from selfreplay.training.loop import run_from_cli

    run_from_cli("finetune", args.config, args.overrides)


def _demo(args: argparse.Namespace) -> None:
    from selfreplay.experiments.demo import run_demo

    run_demo(out_dir=args.out, scale=args.scale, seed=args.seed)


def _continual(args: argparse.Namespace) -> None:
    from selfreplay.experiments.continual import continual_cli

    continual_cli(args.config, args.overrides)


def _sweep(args: argparse.Namespace) -> None:
    from selfreplay.experiments.sweep import sweep_cli

    sweep_cli(args.sweep_file, args.overrides, args.out, args.workers, args.launcher, args.cluster)


def _report(args: argparse.Namespace) -> None:
    from selfreplay.experiments.report import write_report

    print(f"report -> {write_report(args.directory)}")


def _reproduce(args: argparse.Namespace) -> None:
    from selfreplay.experiments.reproduce import reproduce

    only = [name for name in args.only.split(",") if name] if args.only else None
    reproduce(args.profile, args.out, args.experiments, only, args.overrides, args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfreplay",
        description="Finetune language models without forgetting, by replaying "
                    "sequences the frozen pretrained model samples from itself.")
    from selfreplay import __version__

    parser.add_argument("--version", action="version", version=f"selfreplay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tokenizer = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tokenizer_sub.add_parser(
        "train", help="train a tokenizer on one or more corpora",
        description="Train a byte-level BPE tokenizer, reserving ids 0-7 for domain tokens and one for EOS.")
    train.add_argument("corpus", nargs="+", help="corpus: .jsonl, .jsonl.gz, .txt or hf:NAME[:CONFIG[:SPLIT]]")
    train.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, special ids included")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    train.add_argument("--domains", default="",
                       help="comma-separated domain names for the reserved domain ids, in order (e.g. en,es)")
    train.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    train.set_defaults(func=_tokenizer_train)

    tokenize = sub.add_parser(
        "tokenize", help="turn a corpus into a flat uint16 token file",
        description="Tokenize a corpus into a flat uint16 token file (documents joined by EOS) "
                    "with a JSON metadata sidecar.")
    tokenize.add_argument("corpus", help="corpus: .jsonl, .jsonl.gz, .txt or hf:NAME[:CONFIG[:SPLIT]]")
    tokenize.add_argument("--tokenizer", required=True, help="tokenizer directory (holds tokenizer.json)")
    tokenize.add_argument("--domain", required=True, help="domain name (or reserved id) of this corpus")
    tokenize.add_argument("--out", required=True, help="token file to write (metadata goes to FILE.json)")
    tokenize.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    tokenize.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    tokenize.set_defaults(func=_tokenize)

    synth = sub.add_parser(
        "synth", help="write the built-in synthetic two-language corpus",
        description="Generate the built-in synthetic corpus: two languages with shared meaning "
                    "structure and different vocabulary, morphology and word order (JSONL).")
    synth.add_argument("--out", required=True, help="directory to write one JSONL file per language into")
    synth.add_argument("--words", type=int, default=1_000_000, help="approximate words per language")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    synth.set_defaults(func=_synth)

    sample = sub.add_parser(
        "sample", help="print sequences sampled from a trained model",
        description="Sample sequences from a run directory's model, starting at a domain token.")
    sample.add_argument("run_dir", metavar="SOURCE",
                        help="run directory (weights.safetensors, config.yaml, tokenizer.json), "
                             "or init=hf:NAME_OR_PATH for a Hugging Face model (with --out)")
    sample.add_argument("--domain", help="domain name (or reserved id) to start from (selfreplay runs)")
    sample.add_argument("-n", type=int, default=4, help="number of samples (default: 4)")
    sample.add_argument("--out", help="write the samples as a replay pool directory (ids + text + what drew "
                                      "them) that runs reuse with replay.pool=DIR, instead of printing")
    sample.add_argument("--chat", action="store_true",
                        help="pool: sample conversations inside the chat template (the model writes the user turn "
                             "and the answer) instead of from BOS")
    sample.add_argument("--system", help="pool: a system turn for chat sampling")
    sample.add_argument("--prompts", help="pool: a .txt (one a line) or .jsonl (`prompt`) file of user turns to answer")
    sample.add_argument("--no-stop-at-eos", action="store_true", help="pool: keep sampling past EOS (base models)")
    sample.add_argument("--trust-remote-code", action="store_true", help="pool: allow the model's own code")
    sample.add_argument("--length", type=int, default=None, help="tokens per sample, first included (default: model T)")
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1)")
    sample.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    sample.add_argument("--top-p", type=float, default=None, help="keep the smallest set with probability >= p")
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    sample.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    sample.set_defaults(func=_sample)

    export = sub.add_parser(
        "export", help="write a selfreplay run as a transformers model directory",
        description="Export a selfreplay-pretrained run as a transformers model directory with its tokenizer "
                    "(Apertus architecture: loads with AutoModelForCausalLM, no remote code).")
    export.add_argument("run_dir", help="run directory (weights.safetensors, config.yaml, tokenizer.json)")
    export.add_argument("--hf", required=True, metavar="OUT", help="directory to write (must be new or empty)")
    export.add_argument("--domain", help="domain whose token becomes BOS (default: the one the run trained on)")
    export.set_defaults(func=_export)

    for name, func, what in (("pretrain", _pretrain, "pretrain a model on the old domain"),
                             ("finetune", _finetune, "finetune on the new domain with replay")):
        p = sub.add_parser(name, help=what,
                           description=f"{what[0].upper()}{what[1:]}. Settings come from an optional YAML "
                                       "file, then dotted overrides such as model.D=128 replay.coeff=10.")
        p.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
        p.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE")
        p.set_defaults(func=func)

    demo = sub.add_parser(
        "demo", help="pretrain, then finetune three ways, and compare forgetting",
        description="The main job on the built-in synthetic corpus: pretrain on language A, finetune "
                    "on language B to one target loss with no replay, self-replay KL and real-replay "
                    "KL; print a table and write a figure.")
    demo.add_argument("--out", default="demo_runs", help="output directory (default: demo_runs)")
    demo.add_argument("--scale", choices=("small", "large"), default="small",
                      help="small runs in minutes on a laptop CPU; large is a bigger model and corpus")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)

    continual = sub.add_parser(
        "continual", help="learn algorithmic tasks in sequence, with or without self-replay",
        description="Train a small model on algorithmic tasks one after another (addition, reversal, sorting, "
                    "modular addition; a task token each), optionally with self-replay sampled from the snapshot "
                    "taken at each task's start; print the accuracy matrix, average accuracy and backward "
                    "transfer. Settings: an optional YAML file, then dotted overrides such as replay.method=ntp "
                    "replay.coeff=10 tasks.steps=1000.")
    continual.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    continual.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE")
    continual.set_defaults(func=_continual)

    sweep = sub.add_parser(
        "sweep", help="run a grid of runs in stages from a sweep file",
        description="Run every point of a sweep file (stages of pretrain/finetune grids), each in its own run "
                    "directory under --out, several at a time; finished points are skipped, so the same command "
                    "resumes a killed sweep. Writes OUT/results.csv. The sweep file format is documented in "
                    "selfreplay/sweep.py and the README.")
    sweep.add_argument("sweep_file", help="sweep YAML file (for example experiments/capacity/sweep.yaml)")
    sweep.add_argument("overrides", nargs="*", help="NAME=VALUE: profile=small|paper, or a var of the sweep file "
                                                    "(old=TOKEN_FILE new=TOKEN_FILE tokenizer=DIR for your own data)")
    sweep.add_argument("--out", default=None, help="sweep directory (default: sweeps/<sweep file name>)")
    sweep.add_argument("--workers", type=int, default=None,
                       help="points run at once (default: 2, or 1 on one core); each gets cores/workers threads")
    sweep.add_argument("--launcher", choices=("local", "submitit"), default="local",
                       help="local subprocesses, or submitit jobs (Slurm on a cluster)")
    sweep.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                       help="submitit: where jobs run (default: Slurm when available, else this machine)")
    sweep.set_defaults(func=_sweep)

    report = sub.add_parser(
        "report", help="write a Markdown report with figures for a run or a sweep",
        description="Write DIR/report.md and PNG figures under DIR/figures/ for a run directory or a sweep "
                    "directory: the figures its sweep file lists, the claim each tests with the measured numbers, "
                    "and a table of every run.")
    report.add_argument("directory", help="a sweep directory (holds sweep.yaml) or a finished run directory")
    report.set_defaults(func=_report)

    reproduce = sub.add_parser(
        "reproduce", help="run every experiment of a profile and write one report of the paper's claims",
        description="Run each experiments/NAME/sweep.yaml with the chosen profile into OUT/NAME (finished points "
                    "are kept, so the same command resumes), then write OUT/report.md: every figure and a table "
                    "of the paper's claims, what this run found, and whether it reproduced.")
    reproduce.add_argument("overrides", nargs="*",
                           help="VAR=VALUE for every experiment (old=, new=, tokenizer= for your own token files), "
                                "or NAME:VAR=VALUE for one")
    reproduce.add_argument("--profile", default="small", help="small (a 2-core CPU) or paper (a GPU); default small")
    reproduce.add_argument("--out", default="reproduce", help="output directory (default: reproduce)")
    reproduce.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these experiments")
    reproduce.add_argument("--experiments", default=None, help="folder of NAME/sweep.yaml (default: experiments/)")
    reproduce.add_argument("--workers", type=int, default=None, help="points run at once (default: 2, or 1 on one core)")
    reproduce.set_defaults(func=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `pretrain CONFIG k=v` vs `pretrain k=v`: a first positional with '=' is an override.
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        args.func(args)
    except SelfReplayError as e:
        print(f"selfreplay: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("selfreplay: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
