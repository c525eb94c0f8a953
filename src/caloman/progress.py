"""The one progress facility of the package.

Library code wraps long loops in :func:`progress`; nothing is shown unless the
CLI (or a user) calls :func:`enable`. This keeps library code silent by default.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("caloman")

_enabled = False


def enable(on: bool = True) -> None:
    """Turn progress bars on (the CLI does this) or off."""
    global _enabled
    _enabled = on


def is_enabled() -> bool:
    return _enabled


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None,
             unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar when enabled, silently otherwise."""
    if not _enabled:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr,
                    dynamic_ncols=True, leave=False)


class ProgressBar:
    """A manually advanced bar (for chunked work whose steps are not an iterable)."""

    def __init__(self, total: int, desc: str = "", unit: str = "it") -> None:
        self._bar = (tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                          dynamic_ncols=True, leave=False) if _enabled else None)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: object) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
