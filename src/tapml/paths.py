"""Checks of the paths a user names (command-line arguments, environment variables, fields of a result file),
made before any work starts: a bad path is a one-line TapmlError naming it and what to do, not an OSError
(or a traceback) after a model run.

One helper per kind of use, shared by every command and API function: `check_path` (any path: not empty, no
NUL, every name within the file system's limit), `check_output_file` (a file to write: its folder is or can be
made a directory, it is not a directory or a device) and `check_output_dir` (a directory to create or extend).

This module only looks (stat, access); it must not create, write or remove anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tapml.errors import TapmlError

_NAME_MAX = 255  # when the file system does not say (POSIX's usual limit, Linux's for every common one)
_PATH_MAX = 4096


def short(path: str | os.PathLike, limit: int = 80) -> str:
    """The path as it can be shown in a one-line message: long ones are cut in the middle."""
    s = os.fspath(path)
    s = s if isinstance(s, str) else os.fsdecode(s)
    return s if len(s) <= limit else f"{s[: limit // 2]}…{s[-limit // 2:]} ({len(s)} characters)"


def _existing_ancestor(path: str) -> str:
    """The nearest folder above `path` (or `path` itself) that exists; os.path.lexists swallows every OSError, so
    a component that is too long or a file in the middle just moves the walk up."""
    a = os.path.abspath(path)
    while not os.path.lexists(a):
        parent = os.path.dirname(a)
        if parent == a:
            break
        a = parent
    return a


def _limit(folder: str, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder if os.path.isdir(folder) else os.path.dirname(folder) or "/", name))
    except (OSError, ValueError):
        return default


def check_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when the OS can take it as a name at all; else a TapmlError naming `what`
    (e.g. "--json", "STORE", "TAPML_CACHE_DIR")."""
    if not isinstance(path, (str, os.PathLike)):
        raise TapmlError(f"{what} must be a path, got {type(path).__name__} {path!r}")
    s = os.fspath(path)
    s = s if isinstance(s, str) else os.fsdecode(s)
    if not s.strip():
        raise TapmlError(f"{what} is empty; give a path")
    if "\0" in s:
        raise TapmlError(f"{what} {short(s)!r} contains a NUL character; give a path without one")
    try:
        raw = os.fsencode(s)  # non-UTF-8 bytes from argv come back as surrogates and encode again
    except UnicodeEncodeError:
        raise TapmlError(f"{what} {short(s)!r} cannot be a file name here (characters the file system encoding "
                         f"cannot represent)") from None
    base = _existing_ancestor(s)
    name_max = _limit(base, "PC_NAME_MAX", _NAME_MAX)
    for part in raw.split(b"/"):
        if len(part) > name_max:
            raise TapmlError(f"{what} {short(s)}: the name {short(os.fsdecode(part), 40)!r} is {len(part)} bytes, "
                             f"longer than the file system allows ({name_max}); choose a shorter name")
    path_max = _limit(base, "PC_PATH_MAX", _PATH_MAX)
    if len(raw) >= path_max:
        raise TapmlError(f"{what} {short(s)} is {len(raw)} bytes long, longer than the file system allows "
                         f"({path_max - 1}); choose a shorter path")
    return Path(s)


def _check_folder_for(p: Path, what: str, start: str) -> None:
    """The nearest existing folder at or above `start` must be a directory this process can write into."""
    a = _existing_ancestor(start)
    if not os.path.isdir(a):
        raise TapmlError(f"{what} {short(p)}: {short(a)} is a file, not a directory; choose another path")
    if not os.access(a, os.W_OK | os.X_OK):
        raise TapmlError(f"{what} {short(p)}: cannot write in {short(a)} (permission denied); choose another path")


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """A file about to be written whole (`report.write_atomic`): its folder exists or can be made, and it is not
    a directory or anything but a regular file (a device, a FIFO: replacing those is never what was meant)."""
    p = check_path(path, what)
    if os.path.isdir(p):
        raise TapmlError(f"{what} {short(p)} is a directory; name a file to write (e.g. {short(p / 'out', 60)})")
    try:
        st = os.stat(p)
    except OSError:
        st = None  # absent (or a dangling link, which the write replaces): the folder decides
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise TapmlError(f"{what} {short(p)} exists and is not a regular file; name a file to write")
    _check_folder_for(p, what, os.path.dirname(os.path.abspath(p)))
    return p


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """A directory to create or extend: it is one already, or the nearest folder above it is a writable one."""
    p = check_path(path, what)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise TapmlError(f"{what} {short(p)} exists and is not a directory; choose another path")
    _check_folder_for(p, what, os.fspath(p))
    return p


def check_not_inside(path: str | os.PathLike, folder: str | os.PathLike, what: str, folder_what: str) -> None:
    """An output must not land inside an input folder (a report written into the case store it reports on would
    replace or clutter the store's own files)."""
    try:
        inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return
    if inside:
        raise TapmlError(f"{what} {short(path)} is inside {folder_what} {short(folder)}; write it somewhere else")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (existing or not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_report_paths(json_out: str | os.PathLike | None, html_out: str | os.PathLike | None,
                       store: str | os.PathLike | None = None) -> None:
    """Check the report files of `tapml test` before the run they report on: each can be written (see
    `paths.check_output_file`), outside the store it reads, and they are two files."""
    for path, what in ((json_out, "--json"), (html_out, "--html")):
        if path is not None:
            check_output_file(path, what)
            if store is not None:
                check_not_inside(path, store, what, "the case store")
    if json_out is not None and html_out is not None and same_file(json_out, html_out):
        raise TapmlError(f"--json and --html name the same file {short(json_out)}; give two files")
