"""Drawing a replay pool once, before training: π0's samples and, beside them, what the KL needs
from π0 at every position (docs/method.md, "Stored targets"), written by selfreplay.replay.store
for runs to replay (replay.pool=DIR, replay.reuse=N). The same for both model families:

    selfreplay sample runs/pre --domain en -n 4096 --out pool --targets topk:64
    selfreplay sample init=hf:MODEL -n 4096 --length 256 --out pool --targets hidden
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfreplay.config import ReplayConfig, RunConfig, is_hf
from selfreplay.data.tokenizer import load_tokenizer
from selfreplay.errors import SelfReplayError
from selfreplay.families.hf import model_name
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.hf import CausalLM, load_causal_lm
from selfreplay.model.transformer import Transformer
from selfreplay.objective.losses import topk_targets
from selfreplay.objective.methods import replay_method
from selfreplay.replay.hf_pool import hf_draw, replay_format
from selfreplay.replay.pool import Draw, builtin_draw
from selfreplay.replay.samples import ReplaySamples
from selfreplay.replay.store import PoolWriter
from selfreplay.runtime import resolve_device


def parse_targets(spec: str) -> tuple[str, int | None]:
    """("none" | "hidden" | "topk", K or None) for --targets none, hidden or topk:K."""
    if spec in ("none", "hidden"):
        return spec, None
    kind, _, k = spec.partition(":")
    if kind == "topk" and k.isdigit() and int(k) >= 1:
        return kind, int(k)
    raise SelfReplayError(f"--targets {spec!r}: choose none, hidden or topk:K (K >= 1, for example topk:64)")


def pool_targets(samples: ReplaySamples, head_weight: torch.Tensor, kind: str, k: int | None) -> dict:
    """π0's targets at every position of `samples` (drawn with their hidden states [n, t, D]):
    {} for none, {"hidden"} or {"logp", "ids", "rest"} [n, t, K] (objective.losses.topk_targets)."""
    if kind == "none":
        return {}
    if kind == "hidden":
        return {"hidden": samples.hidden}
    n, t = samples.tokens.shape
    logp, ids, rest = topk_targets(samples.hidden, head_weight, k)  # every position, row-major
    return {"logp": logp.view(n, t, k), "ids": ids.view(n, t, k), "rest": rest.view(n, t)}


def draw_pool(out: str | Path, draw: Draw, count: int, batch_size: int, targets: str, head_weight: torch.Tensor,
              fingerprint: str, meta: dict, seed: int, device) -> dict:
    """Draw `count` samples, `batch_size` at a time, into the new pool directory `out` with π0's
    `targets`; returns its header (pool.json)."""
    kind, k = parse_targets(targets)
    if count < 1 or batch_size < 1:
        raise SelfReplayError(f"a pool needs -n >= 1 samples, got {count}")
    writer = PoolWriter(out, fingerprint, {**meta, "seed": seed, "count": count})
    generator = torch.Generator(device=device).manual_seed(seed)
    for lo in range(0, count, batch_size):
        samples = draw(min(batch_size, count - lo), generator, lo)
        writer.write(ReplaySamples(samples.tokens, samples.mask), pool_targets(samples, head_weight, kind, k))
    return writer.close()


def sample_builtin_pool(run_dir: str, out: str | Path, count: int, domain: str | list[int], targets: str = "hidden",
                        temperature: float = 1.0, seed: int = 0, batch_size: int = 128, device: str = "cpu") -> dict:
    """`selfreplay sample RUN --domain D --out POOL`: a pool of a pretrained run's model, its samples
    started at the domain named `domain`, or at each of the domain ids given in turn."""
    device = resolve_device(device)
    model = Transformer.from_pretrained(run_dir, device=device).eval()
    domain_id = load_tokenizer(Path(run_dir)).domain_id(domain) if isinstance(domain, str) else domain
    replay = ReplayConfig(temperature=temperature, decode_batch=batch_size)
    draw = builtin_draw(model, domain_id, replay, keep_hidden=parse_targets(targets)[0] != "none")
    meta = {"model": str(Path(run_dir).resolve()), "domain": domain, "temperature": temperature, "targets": targets}
    return draw_pool(out, draw, count, batch_size, targets, model.head.weight, model_fingerprint(model), meta,
                     seed, device)


def sample_hf_pool(init: str, out: str | Path, count: int, length: int, temperature: float = 1.0,
                   top_p: float | None = None, seed: int = 0, chat: bool = False, system: str | None = None,
                   prompts: str | None = None, stop_at_eos: bool = True, batch_size: int = 64, device: str = "cpu",
                   trust_remote_code: bool = False, targets: str = "none") -> dict:
    """`selfreplay sample init=hf:MODEL --out POOL`: a pool of a Hugging Face model, from BOS or
    inside its chat template (answering the user turns of `prompts`, a .txt or .jsonl file)."""
    if length < 2:
        raise SelfReplayError(f"a pool needs --length >= 2, got {length}")
    name = init.removeprefix("hf:")
    # float32, as a run loads it: the pool's fingerprint is then the run's π0's whatever the checkpoint's dtype
    model, tokenizer = load_causal_lm(name, torch.float32, device=device, trust_remote_code=trust_remote_code)
    chat = chat or system is not None or prompts is not None
    replay = ReplayConfig(length=length, temperature=temperature, top_p=top_p, decode_batch=batch_size, chat=chat,
                          system=system, prompts=prompts, stop_at_eos=stop_at_eos)
    form = replay_format(tokenizer, chat, system, prompts, stop_at_eos)
    return draw_hf_pool(CausalLM(model.eval()), form, out, count, replay, seed, targets, name, model_fingerprint(model))


def draw_hf_pool(lm: CausalLM, form, out: str | Path, count: int, replay: ReplayConfig, seed: int, targets: str,
                 name: str, fingerprint: str) -> dict:
    """A pool of `count` samples of the Hugging Face model `lm` (π0: the model before its first step),
    drawn as `replay` and `form` say, with π0's `targets`, into `out`; returns its pool.json."""
    draw = hf_draw(lm, form, replay, keep_hidden=parse_targets(targets)[0] != "none")
    meta = {"model": name, "format": "chat" if replay.chat else "base", "system": replay.system,
            "prompts": replay.prompts, "stop_at_eos": replay.stop_at_eos or replay.chat,
            "temperature": replay.temperature, "top_p": replay.top_p, "length": replay.length, "pad_id": form.pad,
            "targets": targets}
    return draw_pool(out, draw, count, replay.decode_batch, targets, lm.head.weight, fingerprint, meta, seed,
                     lm.head.weight.device)


def sample_run_pool(config: RunConfig, domains: list[int] | None, out: Path) -> dict:
    """The pool a finetuning run draws before its first step (replay.draw_once samples into `out`),
    as its replay settings say, with π0's hidden states where its method's KL needs them; π0 is
    loaded for the drawing alone. domains: the ids built-in samples start from in turn (None for
    init=hf:). Returns its pool.json."""
    r, device = config.replay, str(resolve_device(config.device))
    targets = "hidden" if replay_method(r.method).keeps_hidden else "none"
    if is_hf(config):
        return sample_hf_pool(model_name(config), out, r.draw_once, r.length, r.temperature, r.top_p, config.seed, r.chat,
                              r.system, r.prompts, r.stop_at_eos, r.decode_batch, device,
                              config.model.trust_remote_code, targets)
    return sample_builtin_pool(config.init, out, r.draw_once, domains, targets, r.temperature, config.seed,
                               r.decode_batch, device)
