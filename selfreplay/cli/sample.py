"""`selfreplay sample`: print a run's samples, or draw a Hugging Face model's replay pool once."""

from __future__ import annotations

import argparse

from selfreplay.errors import SelfReplayError
from selfreplay.replay.sampling import sample_cli
from selfreplay.training.pools import parse_targets, sample_builtin_pool, sample_hf_pool


def register(sub) -> None:
    """Add `sample` to `sub` (the top parser's subparsers)."""
    p = sub.add_parser(
        "sample", help="print sequences sampled from a trained model",
        description="Sample sequences from a run directory's model, starting at a domain token.")
    p.add_argument("run_dir", metavar="SOURCE",
                   help="run directory (weights.safetensors, config.yaml, tokenizer.json), "
                        "or init=hf:NAME_OR_PATH for a Hugging Face model (with --out)")
    p.add_argument("--domain", help="domain name (or reserved id) to start from (selfreplay runs)")
    p.add_argument("-n", type=int, default=4, help="number of samples (default: 4)")
    p.add_argument("--out", help="write the samples as a replay pool directory that runs replay with "
                                 "replay.pool=DIR, instead of printing them")
    p.add_argument("--targets", default="hidden",
                   help="pool: what it keeps of π0 beside each sample, so that the KL runs no π0: hidden (its final "
                        "hidden states: exact), topk:K (its K most likely tokens: the (K+1)-bucket KL) or none "
                        "(default: hidden)")
    p.add_argument("--chat", action="store_true",
                   help="pool: sample conversations inside the chat template (the model writes the user turn "
                        "and the answer) instead of from BOS")
    p.add_argument("--system", help="pool: a system turn for chat sampling")
    p.add_argument("--prompts", help="pool: a .txt (one a line) or .jsonl (`prompt`) file of user turns to answer")
    p.add_argument("--no-stop-at-eos", action="store_true", help="pool: keep sampling past EOS (base models)")
    p.add_argument("--trust-remote-code", action="store_true", help="pool: allow the model's own code")
    p.add_argument("--length", type=int, default=None, help="tokens per sample, first included (default: model T)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="keep the smallest set with probability >= p")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.set_defaults(func=sample)


def sample(args: argparse.Namespace) -> None:
    source = args.run_dir.removeprefix("init=")
    if args.out is not None:
        write_pool(source, args)
        return
    if args.domain is None:
        raise SelfReplayError("give --domain, the domain a sample starts from")
    sample_cli(source, domain=args.domain, num_samples=args.n, length=args.length,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, device=args.device)


def write_pool(source: str, args: argparse.Namespace) -> None:
    """A replay pool of π0's samples and its targets, drawn once and replayed by runs (replay.pool=DIR)."""
    parse_targets(args.targets)  # a misspelt kind is refused before a model is loaded
    if source.startswith("hf:"):
        if args.length is None:
            raise SelfReplayError("a Hugging Face model's replay pool needs --length, the tokens per sample")
        header = sample_hf_pool(source, args.out, count=args.n, length=args.length, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system,
                                prompts=args.prompts, stop_at_eos=not args.no_stop_at_eos, device=args.device,
                                trust_remote_code=args.trust_remote_code, targets=args.targets)
    else:
        if args.domain is None:
            raise SelfReplayError("give --domain, the domain the pool's samples start from")
        header = sample_builtin_pool(source, args.out, count=args.n, domain=args.domain, targets=args.targets,
                                     temperature=args.temperature, seed=args.seed, device=args.device)
    print(f"{header['rows']} samples of {header['meta']['model']} with targets {header['targets']} -> {args.out}")
