"""One exception type for every problem a user can fix (bad path, mismatched bundle, corrupt file).

The CLI turns it into a one-line `error: ...` and a non-zero exit; anything else is a bug and
keeps its traceback.
"""


class DejavuError(Exception):
    """A problem with the user's input or artifacts, described so they can act on it."""
