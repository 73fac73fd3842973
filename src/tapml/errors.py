"""The one exception type for errors a user can cause (bad model name, missing store, ...).

The CLI maps it to a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class TapmlError(Exception):
    """A user-facing error; the message says what is wrong and what to do."""


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message (its type's name when there is none), at most `limit`
    characters: what a one-line report of someone else's exception shows."""
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__ if
                isinstance(e, BaseException) else "")
    return line[:limit]


class UnknownOp(TapmlError):
    """An op name that is not an overload of this torch (e.g. a TVM kernel case offered to an ATen backend)."""


class StoreCorrupt(TapmlError):
    """A case store whose files no longer hold what was written (a damaged shard or SQLite page): the store's
    fault, never the backend's; carving it again is the fix."""
