"""How long-running library functions report progress without knowing about the terminal.

Library code calls ``reporter.start(...)``, ``reporter.advance(...)`` and ``reporter.log(...)``;
the CLI passes a rich-backed reporter that draws on stderr, a Python user passes nothing (silent)
or their own object with these three methods.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def start(self, task: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1, **metrics: float) -> None: ...

    def log(self, message: str) -> None: ...


class NullReporter:
    def start(self, task: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, **metrics: float) -> None:
        pass

    def log(self, message: str) -> None:
        pass
