"""Forgetting measured the way a chat model is used: its answers to held-out prompts (eval.prompts),
never replayed (docs/method.md, "What is measured").

π0 answers each prompt greedily once, before the first step. At every log point `chat_kl` is
KL(π0 ‖ πθ) on those answers, the answer tokens only (a ValidationSet over the prompt-and-answer
rows whose mask counts the answer); at the start and the end θ answers the same prompts greedily
and `answer_agreement` is the mean token F1 of its answers against π0's (1: the same answers),
`answers_identical` the share it answers token for token as π0 did.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from selfreplay.evaluation.validation import ValidationSet
from selfreplay.replay.hf_pool import read_prompts
from selfreplay.replay.hf_sampling import ReplayFormat, chat_format, sample_replay
from selfreplay.rundir import write_atomic


@dataclass
class HeldOutPrompts:
    """The held-out prompts, as token rows of the chat template's opening (`form`), and π0's greedy
    answers to them (token ids, the stop token included where it stopped)."""

    prompts: list[str]
    form: ReplayFormat
    length: int  # prompt and answer, in tokens
    answers: list[list[int]]
    tokens: torch.Tensor  # [N, length]: prompt and π0's answer, padded
    mask: torch.Tensor  # [N, length]: π0's answer tokens

    def validation_set(self, reference) -> ValidationSet:
        """The rows measured at each log point: chat_loss (θ's loss on π0's answers) and chat_kl."""
        return ValidationSet(self.tokens, reference, self.mask, batch_size=8)

    def agreement(self, model) -> tuple[dict[str, float], list[list[int]]]:
        """({answer_agreement, answers_identical}, θ's greedy answers) of `model` (θ) against π0's."""
        theirs = greedy_answers(model, self.form, len(self.prompts), self.length)[0]
        scores = [token_f1(answer, reference) for answer, reference in zip(theirs, self.answers)]
        identical = [answer == reference for answer, reference in zip(theirs, self.answers)]
        return {"answer_agreement": sum(scores) / len(scores), "answers_identical": sum(identical) / len(identical)}, theirs

    def write_side_by_side(self, path: Path, tokenizer, theirs: list[list[int]]) -> None:
        """rundir.ANSWERS_NAME: each prompt with π0's answer and θ's, as text, one JSON line a prompt."""
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
        lines = [json.dumps({"prompt": prompt, "pi0": decode(pi0), "theta": decode(theta)}, ensure_ascii=False)
                 for prompt, pi0, theta in zip(self.prompts, self.answers, theirs)]
        write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8"))


def held_out_prompts(path: str, tokenizer, pi0, answer_tokens: int) -> HeldOutPrompts:
    """The prompts of `path` (.txt: a user turn a line; .jsonl: `prompt`) and π0's greedy answers of
    at most `answer_tokens` tokens, inside the chat template."""
    prompts = read_prompts(path)
    form = chat_format(tokenizer, None, prompts)
    length = max(len(p) for p in form.prompts) + answer_tokens
    answers, samples = greedy_answers(pi0, form, len(prompts), length)
    mask = samples.mask.clone()
    for i, prompt in enumerate(form.prompts):
        mask[i, : len(prompt)] = False
    return HeldOutPrompts(prompts, form, length, answers, samples.tokens, mask)


def greedy_answers(model, form: ReplayFormat, count: int, length: int):
    """(answers as token ids, the samples) of `model` answering form's prompts greedily, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        samples = sample_replay(model, form, count, length, temperature=0.0)
    finally:
        model.train(was_training)
    answers = []
    for i, prompt in enumerate(form.starts(count)):
        row = samples.tokens[i][samples.mask[i]].tolist()
        answers.append(row[len(prompt):])
    return answers, samples


def token_f1(answer: list[int], reference: list[int]) -> float:
    """The harmonic mean of precision and recall of `answer`'s tokens against `reference`'s, counted
    as bags (each token as often as it occurs in both): 1 for the same tokens, 0 for none shared;
    two empty answers agree."""
    if not answer or not reference:
        return float(answer == reference)
    shared = sum((Counter(answer) & Counter(reference)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(answer), shared / len(reference)
    return 2 * precision * recall / (precision + recall)
