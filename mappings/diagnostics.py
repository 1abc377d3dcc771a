"""A problem in a mapping, and where in its file it sits (file:line, dotted field).

Kept apart from the semantic checks (``lint.py``) so that the per-message hot
path, which needs :class:`Locator` to name a code map line, does not load them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ehrbridge.core.located_yaml import LocatedYaml

PathKey = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: str  # "error" | "warning" | "note" (worth knowing, nothing wrong)
    message: str
    file: str | None = None
    line: int | None = None
    field: str = ""
    check_only: bool = False  # about the mapping's upkeep (tests), not worth logging at start

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.file, self.line) if p is not None)
        parts = [p for p in (where, self.severity, self.field) if p]
        return ": ".join(parts) + f": {self.message}"


@dataclass(frozen=True, slots=True)
class Locator:
    """Turns a path inside the mapping into file:line (``prefix`` is where the mapping sits)."""

    located: LocatedYaml | None = field(repr=False)
    prefix: PathKey = ()

    @property
    def file(self) -> str | None:
        return self.located.file if self.located is not None else None

    def line(self, path: Sequence[str | int]) -> int | None:
        if self.located is None:
            return None
        return self.located.line_of((*self.prefix, *path))

    def dotted(self, path: Sequence[str | int]) -> str:
        out = ""
        for part in (*self.prefix, *path):
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out

    def place(self, path: Sequence[str | int]) -> str:
        """``mapping.yaml:31`` ('' when the mapping was not read from a file)."""
        if self.located is None:
            return ""
        line = self.line(path)
        name = Path(self.located.file).name
        return f"{name}:{line}" if line is not None else name

    def diagnostic(self, severity: str, path: Sequence[str | int], message: str) -> Diagnostic:
        return Diagnostic(severity, message, self.file, self.line(path), self.dotted(path))
