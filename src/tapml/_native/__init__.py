"""Native (C++) helpers, built on first use with torch's extension loader into a per-user cache.

`carve_hook()` returns the compiled carving hook module, or raises RuntimeError saying why it is unavailable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

_SRC = Path(__file__).with_name("carve_hook.cpp")
_module = None
_error: str | None = None


def _cache_dir() -> Path:
    """Beside the environment it was built for (`make setup` builds it into .venv), so every process of that
    environment finds it whatever its TAPML_CACHE_DIR; ~/.cache/tapml when the environment is not writable."""
    import sys

    import torch

    # The source's path is in the tag too: torch's loader writes it into the build's ninja file, so two checkouts
    # sharing one environment (git worktrees) in one folder would rebuild it for each other on every carve.
    tag = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + str(_SRC.resolve()).encode()).hexdigest()[:12]
    base = os.environ.get("TAPML_NATIVE_DIR")
    root = Path(base) if base else Path(sys.prefix) / "share" / "tapml-native"
    if not base and not os.access(sys.prefix, os.W_OK):
        root = Path.home() / ".cache" / "tapml" / "native"
    return root / f"carve_hook_{tag}"


@contextlib.contextmanager
def _exclusive(build: Path):
    """Hold an flock on the build folder while torch's loader runs, and clear the loader's own `lock` file.
    Torch takes that file on every load and waits forever for whoever made it, so a process killed while loading
    (a kill -9, a machine restart) left every later carve hanging; an flock dies with its holder, so under ours a
    leftover `lock` can only be stale."""
    with open(build / ".tapml-build.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def carve_hook():
    """Build (once, cached) and import the carving hook extension."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(_error)
    try:
        import io

        from torch.utils.cpp_extension import load

        build = _cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        log = io.StringIO()
        with _exclusive(build), contextlib.redirect_stdout(log):
            _module = load(name="tapml_carve_hook", sources=[str(_SRC)], build_directory=str(build),
                           extra_cflags=["-O2"], verbose=False)
    except Exception as e:  # no compiler, no headers, a build failure: the caller falls back
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        raise RuntimeError(_error) from None
    return _module
