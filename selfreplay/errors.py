"""The one exception type that the command line turns into a one-line message."""


class SelfReplayError(Exception):
    """Bad input or configuration: the message says what was wrong and what to do.

    The command line prints it as one line (no traceback) and exits non-zero.
    """
