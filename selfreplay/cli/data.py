"""`selfreplay tokenizer train`, `tokenize` and `synth`: text corpora to tokenizers and token files."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfreplay.config import check_output_dir
from selfreplay.data.synth import write_corpus
from selfreplay.data.tokenizer import TOKENIZER_FILE, load_tokenizer, train_tokenizer
from selfreplay.data.tokens import write_token_file
from selfreplay.errors import SelfReplayError

CORPUS_HELP = "corpus: .jsonl, .jsonl.gz, .txt or hf:NAME[:CONFIG[:SPLIT]]"
TEXT_FIELD_HELP = "JSON field holding the text (default: text)"


def register(sub) -> None:
    """Add the data-preparation subcommands to `sub` (the top parser's subparsers)."""
    tokenizer = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tokenizer_sub.add_parser(
        "train", help="train a tokenizer on one or more corpora",
        description="Train a byte-level BPE tokenizer, reserving ids 0-7 for domain tokens and one for EOS.")
    train.add_argument("corpus", nargs="+", help=CORPUS_HELP)
    train.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, special ids included")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    train.add_argument("--domains", default="",
                       help="comma-separated domain names for the reserved domain ids, in order (e.g. en,es)")
    train.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    train.set_defaults(func=tokenizer_train)

    tokenize_parser = sub.add_parser(
        "tokenize", help="turn a corpus into a flat uint16 token file",
        description="Tokenize a corpus into a flat uint16 token file (documents joined by EOS) "
                    "with a JSON metadata sidecar.")
    tokenize_parser.add_argument("corpus", help=CORPUS_HELP)
    tokenize_parser.add_argument("--tokenizer", required=True, help="tokenizer directory (holds tokenizer.json)")
    tokenize_parser.add_argument("--domain", required=True, help="domain name (or reserved id) of this corpus")
    tokenize_parser.add_argument("--out", required=True, help="token file to write (metadata goes to FILE.json)")
    tokenize_parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    tokenize_parser.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    tokenize_parser.set_defaults(func=tokenize)

    synth_parser = sub.add_parser(
        "synth", help="write the built-in synthetic two-language corpus",
        description="Generate the built-in synthetic corpus: two languages with shared meaning "
                    "structure and different vocabulary, morphology and word order (JSONL).")
    synth_parser.add_argument("--out", required=True, help="directory to write one JSONL file per language into")
    synth_parser.add_argument("--words", type=int, default=1_000_000, help="approximate words per language")
    synth_parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    synth_parser.set_defaults(func=synth)


def tokenizer_train(args: argparse.Namespace) -> None:
    check_output_dir(args.out, "--out")
    if (Path(args.out) / TOKENIZER_FILE).exists():
        raise SelfReplayError(f"{args.out} already holds a tokenizer, and token files made with it would stop "
                              "loading if it changed: choose another --out, or delete it first")
    domains = [d for d in args.domains.split(",") if d] if args.domains else []
    tok = train_tokenizer(args.corpus, vocab_size=args.vocab_size, out_dir=args.out,
                          domains=domains, text_field=args.text_field)
    print(f"tokenizer: vocab {tok.vocab_size}, domains {tok.domain_ids}, eos {tok.eos_id} -> {args.out}")


def tokenize(args: argparse.Namespace) -> None:
    tok = load_tokenizer(args.tokenizer)
    meta = write_token_file(args.corpus, tok, domain=args.domain, out=args.out,
                            max_tokens=args.max_tokens, text_field=args.text_field)
    print(f"{meta.num_tokens:,} tokens from {meta.num_documents:,} documents "
          f"(domain {meta.domain!r} = id {meta.domain_id}) -> {args.out} "
          f"in {meta.seconds:.2f} s")


def synth(args: argparse.Namespace) -> None:
    paths = write_corpus(args.out, num_words=args.words, seed=args.seed)
    for language, path in paths.items():
        print(f"{language}: {path}")
