"""The one exception type for user mistakes.

Anything raised as :class:`LilyDeployError` is the user's to fix (a bad path, flag,
file or model); the CLI prints its message on one line and exits 1. Every other
exception is a bug and keeps its traceback.
"""


class LilyDeployError(Exception):
    """A user error: bad input, missing file, incompatible model. Message is one line."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
