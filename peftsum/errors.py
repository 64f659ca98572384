"""The one exception type for mistakes a user can make (bad flag, missing file, unknown column...).

The CLI turns it into a one-line message and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
