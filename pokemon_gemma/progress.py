"""Progress bars that suit where the output goes.

On a terminal: tqdm. Anywhere else (`nohup`, CI, `./demo.sh > log`) a redrawn bar writes a carriage-
return update per step (a demo log was ~340 KB of them), so a plain line is written every
`interval` seconds (30 by default) and once at the end instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    interval: float = LOG_INTERVAL_S,
    file: TextIO | None = None,
):
    """A tqdm-like bar (update, set_postfix, write, close, iteration, context manager)."""
    stream = file or sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            disable=disable,
            leave=leave,
            dynamic_ncols=True,
            file=stream,
        )
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval=interval, file=stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """One plain line per `interval` seconds (and a last one at close), formatted like tqdm's."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = LOG_INTERVAL_S,
        file: TextIO | None = None,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = interval
        self.file = file or sys.stderr
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, message: str) -> None:
        print(message, file=self.file, flush=True)

    def refresh(self) -> None:
        self._emit()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()

    def _emit(self) -> None:
        line = tqdm.format_meter(
            self.n,
            self.total,
            time.monotonic() - self.start,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix or None,
            ncols=100,
        )
        print(line, file=self.file, flush=True)
