"""Remote targets: the TapML wire protocol, `tapml serve`, the `remote` client backend and the browser target.

The host keeps the model and the reference; a device runs a small server (or a browser page) that executes
op calls on its backend. Only data crosses the wire (docs/PROTOCOL.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tapml.backends import Backend, get_backend
from tapml.errors import TapmlError


def open_backend(name: str, remote: str | None = None, token_file: str | Path | None = None,
                 **options: Any) -> Backend:
    """The backend a command asked for: `name` here, or, with `remote` (ws://HOST:PORT), the backend the
    server at that URL hosts (`name` "remote" takes whatever it hosts; another name must match it)."""
    if remote is None:
        if name == "remote" and token_file is not None:
            options["token_file"] = token_file
        elif token_file is not None:
            raise TapmlError(f"--token-file is for a remote target; backend {name} runs here (add --remote URL)")
        return get_backend(name, **options)
    if options:
        raise TapmlError(f"options for backend {name} ({', '.join(sorted(options))}) are set where it is served "
                         "(`tapml serve`), not with --remote")
    return get_backend("remote", url=remote, token_file=token_file, expect=None if name == "remote" else name)
