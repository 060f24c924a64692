"""The one exception type for user mistakes.

Library code raises :class:`SmolGPTError` with a message that says what is wrong and what
to do about it; only the command-line entry point turns it into a single line on stderr and
exit status 2. Anything else that escapes is a bug and keeps its traceback.
"""


class SmolGPTError(Exception):
    """A problem the user can fix: bad input, a bad file, a missing resource."""


class Relayed(SmolGPTError):
    """Under distributed training, rank 0's error raised on the other ranks too: rank 0 has
    already reported it, so they exit with it silently."""
