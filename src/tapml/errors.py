"""The one exception type for errors a user can cause (bad model name, missing store, ...).

The CLI maps it to a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class TapmlError(Exception):
    """A user-facing error; the message says what is wrong and what to do."""


class UnknownOp(TapmlError):
    """An op name that is not an overload of this torch (e.g. a TVM kernel case offered to an ATen backend)."""


class StoreCorrupt(TapmlError):
    """A case store whose files no longer hold what was written (a damaged shard or SQLite page): the store's
    fault, never the backend's; carving it again is the fix."""
