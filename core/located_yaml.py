"""YAML loading that remembers where every value came from.

pydantic reports errors by field path (``model.timeout_s``); an engineer
editing a site file wants ``sites/acme.yaml:31``. We compose the YAML node
tree once, keep ``path -> line`` for every mapping key and sequence item, and
translate validation errors back to lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ehrbridge.core.errors import ConfigError

PathKey = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass
class LocatedYaml:
    """Parsed YAML data plus the 1-based line of every key path."""

    data: Any
    file: str
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line of ``path``, or of its nearest ancestor present in the file."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), None)


def load_located(path: Path | str) -> LocatedYaml:
    """Read a YAML file, keeping line numbers. Raises ConfigError on bad YAML."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror}", file=file) from exc
    return parse_located(text, file)


def parse_located(text: str, file: str = "<string>") -> LocatedYaml:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from exc
    located = LocatedYaml(data=data if data is not None else {}, file=file)
    if node is not None:
        _index_lines(node, (), located.lines)
    return located


def _index_lines(node: yaml.Node, path: PathKey, lines: dict[PathKey, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            lines[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _index_lines(item, child, lines)


def validate_located(model: type[ModelT], located: LocatedYaml, **context: Any) -> ModelT:
    """Validate with pydantic; the first error becomes a ConfigError with file:line:field.

    All errors are listed in the message so one edit round fixes them all.
    """
    try:
        return model.model_validate(located.data, context={"located": located, **context})
    except ValidationError as exc:
        raise config_error_from(exc, located) from exc


def located_problems(
    exc: ValidationError, located: LocatedYaml, prefix: PathKey = ()
) -> list[tuple[int | None, str, str]]:
    """(line, dotted field, message) of every error; ``prefix``: where the validated data sits."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = _data_path((*prefix, *err["loc"]), located.data)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field (not allowed here; check its spelling and indentation)"
        elif err["type"] == "value_error":
            message = message.removeprefix("Value error, ")  # our validators' own sentences
        problems.append((located.line_of(loc), _dotted(loc), message))
    return problems


def config_error_from(exc: ValidationError, located: LocatedYaml) -> ConfigError:
    problems = []
    first: tuple[int | None, str] | None = None
    for line, dotted, message in located_problems(exc, located):
        problems.append(f"{located.file}:{line}: {dotted}: {message}")
        if first is None:
            first = (line, dotted)
    assert first is not None
    detail = problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems)
    error = ConfigError(detail, field=None)
    # The structured attributes point at the first problem.
    error.file, error.line, error.field = located.file, first[0], first[1]
    return error


def _data_path(loc: Sequence[Any], data: Any) -> PathKey:
    """Drop pydantic's union/tagged-union tags so the path matches the YAML keys."""
    path: list[str | int] = []
    node = data
    for part in loc:
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_mapping or in_list:
            path.append(part)
            node = node[part]
        elif isinstance(node, Mapping) and isinstance(part, str) and not path_is_tag(part):
            path.append(part)  # a missing required field: name it under its parent
            node = None
    return tuple(path)


def path_is_tag(part: str) -> bool:
    """pydantic inserts model or type names into union error paths."""
    return part[:1].isupper() or "[" in part or part.startswith("function-")


def _dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"
