"""The one base class of errors caused by what a user gave us (a flag, a file, a checkpoint).

The command line turns a `UserError` into one line and exit status 2. Any other exception is a
bug in this package and keeps its traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the flag or file and says what is wrong, in one line.

    A ValueError, so the batch jobs that count and skip bad items (`except ValueError`) keep doing so.
    """
