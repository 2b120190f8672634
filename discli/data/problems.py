"""``--skip-bad`` support: stop at the first bad item, or note it and carry on.

Preparing a dataset touches thousands of files; one truncated JPEG should either stop the run
with a message naming it (the default, so nothing bad slips in silently) or, when the user asks
for it, be left out and listed in the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from discli.errors import BadInputError


@dataclass
class Problems:
    skip_bad: bool = False
    items: list[dict[str, str]] = field(default_factory=list)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the body; a :class:`BadInputError` is raised again or, with skip_bad, recorded.

        Use one guard per item: with skip_bad, the rest of the body is skipped and the caller
        can see it by checking whether the item produced its result.
        """
        try:
            yield
        except BadInputError as exc:
            if not self.skip_bad:
                raise
            self.add(exc)

    def add(self, exc: BadInputError) -> None:
        message = str(exc)
        if exc.path and message.startswith(f"{exc.path}: "):
            message = message[len(exc.path) + 2:]
        self.items.append({"path": exc.path or "", "problem": message})
