"""The one exception type that the command line turns into a one-line message."""

import difflib


class SelfReplayError(Exception):
    """Bad input or configuration: the message says what was wrong and what to do.

    The command line prints it as one line (no traceback) and exits non-zero.
    """


def did_you_mean(word: str, options, cutoff: float = 0.5) -> str:
    """"; did you mean 'X'?" for the option closest to `word`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def one_line(message: object, limit: int = 300) -> str:
    """`message` as a single line of at most `limit` characters (for wrapped exceptions)."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
