"""Progress bars for long work (a carve's forward steps, a replay's cases, a migration's model runs): one rich bar
on stderr, silent when disabled or when stderr is not a terminal. It only draws; it must not decide anything."""

from __future__ import annotations

import sys
from typing import Any, Self


class Bar:
    """`with Bar(enabled, "carve", "llama (forward steps)", total) as bar: bar.advance(bad=...)`.

    `total` None draws a spinner with a count; `bad` (when given to `advance`) keeps a red count of failures."""

    def __init__(self, enabled: bool, verb: str, what: str, total: int | None = None, counts_bad: bool = False):
        self.enabled = enabled and sys.stderr.isatty()
        self.verb, self.what, self.total, self.counts_bad = verb, what, total, counts_bad
        self.bad = 0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Self:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn

        columns: list[Any] = [SpinnerColumn(), f"[bold]{self.verb}[/] {{task.description}}", BarColumn(),
                              MofNCompleteColumn()]
        if self.counts_bad:
            columns.append("[red]{task.fields[bad]} bad")
        columns.append(TimeElapsedColumn())
        self._progress = Progress(*columns, console=Console(stderr=True), transient=False)
        self._progress.__enter__()
        from rich.markup import escape

        self._task = self._progress.add_task(escape(self.what), total=self.total, bad=0)
        return self

    def advance(self, bad: bool = False) -> None:
        self.bad += bool(bad)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, bad=self.bad)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
