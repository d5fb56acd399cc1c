"""Where a chat template's turns begin and end, in the model's own tokens.

Both jobs render conversations through `tokenizer.apply_chat_template` and map
character positions to tokens through the fast tokenizer's offsets:

- training on conversations: which tokens are the assistant's (the loss mask);
- sampling conversations: the tokens before the user's text, the token that ends
  the user's turn, the tokens that open the answer, and the token that ends it.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfreplay.errors import SelfReplayError

# stand-ins for a turn's text while cutting a rendered template apart (no spaces: templates may trim)
_USER_TEXT, _ANSWER_TEXT = "USERTURNTEXT", "ANSWERTURNTEXT"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it; one line of error without a template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise SelfReplayError(f"tokenizer {name} has no chat template: chat data and chat sampling need one "
                              "(set tokenizer.chat_template, or use plain text and BOS sampling)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of rendered text (the template writes its own special tokens) and their character spans."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


def assistant_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(token ids of the conversation, True on each token the assistant wrote: its text and the
    template's end of its turn). Each assistant turn spans from the end of the generation
    prompt before it to the end of the conversation rendered up to it."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
            upto = render(tokenizer, messages[: i + 1])
            if not text.startswith(upto):
                raise SelfReplayError("the chat template writes earlier turns differently once later ones follow: "
                                      "cannot tell which tokens are the assistant's")
            spans.append((start, len(upto)))
    ids, offsets = encode(tokenizer, text)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    return ids, mask


@dataclass
class ChatTurns:
    """Token ids that frame one sampled exchange: the model writes the user's text after
    `user_prefix`, ends it with `user_end`, the template's `assistant_header` follows, then the
    model writes the answer and ends it with `answer_end`."""

    user_prefix: list[int]
    user_end: int
    assistant_header: list[int]
    answer_end: int


def chat_turns(tokenizer, system: str | None = None) -> ChatTurns:
    """Cut the chat template around a user turn and an answer (after a system turn when given)."""
    head = [{"role": "system", "content": system}] if system else []
    text = render(tokenizer, head + [{"role": "user", "content": _USER_TEXT},
                                     {"role": "assistant", "content": _ANSWER_TEXT}])
    ids, offsets = encode(tokenizer, text)
    user_at, answer_at = text.index(_USER_TEXT), text.index(_ANSWER_TEXT)
    cuts = [user_at, user_at + len(_USER_TEXT), answer_at, answer_at + len(_ANSWER_TEXT)]
    if not all(any(end == cut for _, end in offsets) for cut in cuts):
        raise SelfReplayError("the chat template's turn markers merge with the turn text into one token: "
                              "cannot sample inside this template (sample from BOS instead)")
    between = [t for t, (lo, _) in zip(ids, offsets) if cuts[1] <= lo < cuts[2]]
    after = [t for t, (lo, _) in zip(ids, offsets) if lo >= cuts[3]]
    if not between:
        raise SelfReplayError("the chat template puts nothing between a user turn and the answer: "
                              "cannot tell where the model's user turn ends")
    return ChatTurns(user_prefix=[t for t, (_, hi) in zip(ids, offsets) if hi <= cuts[0]],
                     user_end=between[0], assistant_header=between[1:],
                     answer_end=after[0] if after else tokenizer.eos_token_id)


def prompt_tokens(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """A given user turn and the opening of the answer: the model writes only the answer."""
    head = [{"role": "system", "content": system}] if system else []
    return encode(tokenizer, render(tokenizer, head + [{"role": "user", "content": prompt}],
                                    add_generation_prompt=True))[0]
