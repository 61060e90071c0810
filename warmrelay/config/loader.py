"""Loading: a YAML file, or a loaded document, into one ``Config``, or a ConfigError that
lists every problem at once, each with its key path (``ips[0].warmup.start``).

The order of the work: the file read as YAML (a syntax error in one line with its
source line, a key given twice reported with both lines), the cross-key rules
(``crosskeys``) and pydantic's validation run on the same document (so one wrong key
does not hide the others), pydantic's errors put in the words of someone editing YAML
(the nearest known key for a misspelt one, the value found, never a secret), and
relative paths anchored at the file's folder. ``config_error_lines`` is the one
formatter of what check-config and serve print for a file that cannot be loaded.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from warmrelay.config.crosskeys import cross_key_problems
from warmrelay.config.model import Config
from warmrelay.config.values import format_path, is_secret_key, yaml_kind
from warmrelay.errors import ConfigError, ConfigProblem

# -- pydantic's errors in the words of someone editing YAML ----------------------------


_SHAPE_ERRORS = {
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
}


# pydantic's type errors in the words of someone editing YAML ("a valid integer, unable to
# parse string as an integer" says less than "must be an integer (got 'ten')")
_TYPE_ERRORS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
}

# Errors whose message is ours (it shows the value where that helps) or already says what
# was found: no "(got ...)" after them.
_NO_ECHO = {
    "value_error",
    "assertion_error",
    "missing",
    "extra_forbidden",
    "too_short",
    "too_long",
    *_SHAPE_ERRORS,
}


def _got(value: Any) -> str:
    """The value found, as it was written in YAML, short enough for one line."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"


def _members(annotation: Any) -> list[Any]:
    """The types a field may hold: Annotated and unions (``X | None``) taken apart."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _known_keys(loc: Sequence[int | str]) -> list[str]:
    """The keys the mapping at ``loc`` may have (its model's fields), found by following
    the models from Config down; empty when ``loc`` leads to no model."""
    at: list[Any] = [Config]
    for part in loc:
        inside: list[Any] = []
        for member in (m for a in at for m in _members(a)):
            origin, args = get_origin(member), get_args(member)
            if isinstance(member, type) and issubclass(member, BaseModel):
                if isinstance(part, str) and part in member.model_fields:
                    inside.append(member.model_fields[part].annotation)
            elif origin in (tuple, list) and isinstance(part, int) and args:
                inside.append(args[0])
            elif origin in (Mapping, dict) and isinstance(part, str) and len(args) == 2:
                inside.append(args[1])
        at = inside
    models = [m for a in at for m in _members(a) if isinstance(m, type)]
    return [name for m in models if issubclass(m, BaseModel) for name in m.model_fields]


def _message(err: Mapping[str, Any]) -> str:
    """One pydantic error in YAML words: what is wrong, the nearest known key for a
    misspelt one, the value found for a type error (never a secret's)."""
    loc: Sequence[int | str] = err["loc"]
    kind = err["type"]
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
        return f"unknown key (did you mean {near[0]}?)" if near else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in _SHAPE_ERRORS:  # YAML words, not Python ones ("a valid tuple")
        return f"{_SHAPE_ERRORS[kind]}, not {yaml_kind(err.get('input'))}"
    if kind in ("too_short", "too_long") and isinstance(err.get("ctx"), Mapping):
        ctx = err["ctx"]
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"must have at {'least' if kind == 'too_short' else 'most'} {bound} item(s)"
    msg = _TYPE_ERRORS.get(kind) or str(err["msg"]).removeprefix("Value error, ")
    msg = re.sub(r"^Input should be ", "must be ", msg)
    secret = any(isinstance(part, str) and is_secret_key(part) for part in loc)
    if kind in _NO_ECHO or secret or "input" not in err:
        return msg
    return f"{msg} (got {_got(err['input'])})"


def _validation_problems(exc: ValidationError) -> list[ConfigProblem]:
    """Pydantic's errors as problems. A list whose items are wrong is also "too short"
    (it counts only valid items): that echo of the item's own error is left out."""
    errors = exc.errors()
    lists_with_bad_items = {
        tuple(e["loc"][:k])
        for e in errors
        for k, part in enumerate(e["loc"])
        if isinstance(part, int)
    }
    return [
        ConfigProblem(format_path(e["loc"]), _message(e))
        for e in errors
        if not (e["type"] == "too_short" and tuple(e["loc"]) in lists_with_bad_items)
    ]


# -- a document into a Config ----------------------------------------------------------


def parse_config(doc: Any, *, base_dir: Path | None = None) -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem."""
    if doc is None:
        raise ConfigError([ConfigProblem("", "the configuration is empty")])
    if not isinstance(doc, Mapping):
        raise ConfigError([ConfigProblem("", "the configuration must be a mapping of keys")])
    problems = cross_key_problems(doc)
    config: Config | None = None
    try:
        config = Config.model_validate(doc)
    except ValidationError as exc:
        problems = _validation_problems(exc) + problems
    if problems or config is None:
        raise ConfigError(problems)
    if base_dir is not None:
        anchored = _anchored(config, base_dir)
        assert isinstance(anchored, Config)
        config = anchored
    return config


def _anchored(value: Any, base_dir: Path) -> Any:
    """``value`` with every relative path in it (state.dir, key and certificate files, CA
    files) made relative to ``base_dir``, the configuration file's folder: the same file
    means the same files whatever the working directory (check-config run by hand in
    /etc/warmrelay, serve run by systemd in /)."""
    if isinstance(value, Path):
        return value if value.is_absolute() else base_dir / value
    if isinstance(value, BaseModel):
        changed = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = _anchored(old, base_dir)
            if new is not old:
                changed[name] = new
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, dict):
        items = {k: _anchored(v, base_dir) for k, v in value.items()}
        same = all(items[k] is v for k, v in value.items())
        return value if same else items
    if isinstance(value, tuple | list):
        anchored = [_anchored(v, base_dir) for v in value]
        if all(a is v for a, v in zip(anchored, value, strict=True)):
            return value
        return type(value)(anchored)
    return value


# -- a file into a Config: YAML, its syntax errors, keys given twice -------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML with two changes. Dates stay strings: pydantic then reports a bad date with
    its key path. A key given twice in one mapping is a problem (key path and both lines),
    not a silent "the second wins": an operator editing the first one would see no effect."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._duplicates: list[tuple[int, ConfigProblem]] = []  # (line, problem)
        self._paths: dict[int, list[int | str]] = {}  # id(node) -> where it first appears
        self._keys: dict[int, list[yaml.Node]] = {}  # id(mapping) -> its keys as written

    @property
    def duplicates(self) -> list[ConfigProblem]:
        """Keys given twice, in the order of the file."""
        return [problem for _, problem in sorted(self._duplicates, key=lambda d: d[0])]

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._index(node, [])
        return self.construct_document(node)

    def _index(self, node: yaml.Node, path: list[int | str]) -> None:
        """Record each node's key path and each mapping's keys before construction (which
        flattens ``<<`` merges in place). Anchors can make cycles: visit a node once."""
        if id(node) in self._paths:
            return
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            self._keys[id(node)] = [k for k, _ in node.value]
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                self._index(value, [*path, str(name)])
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, [*path, i])

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node in self._keys.get(id(node), ()):
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # "<<" merges are meant to be overridden; complex keys fail below
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = format_path([*self._paths.get(id(node), []), str(key_node.value)])
                message = f"duplicate key (lines {first_line[key]} and {line})"
                self._duplicates.append((line, ConfigProblem(where, message)))
            else:
                first_line[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    lambda loader, node: loader.construct_scalar(node),  # type: ignore[arg-type]
)


class ConfigSyntaxError(ConfigError):
    """The file is not YAML. One problem, ``FILE:LINE:COLUMN: not valid YAML: what``, and
    the line it is on (``source``, or None): PyYAML's own text is nine lines about a
    "<unicode string>" that names neither the file nor, plainly, the line."""

    def __init__(self, problem: ConfigProblem, source: str | None) -> None:
        super().__init__([problem])
        self.source = source


def _source_line(mark: yaml.Mark) -> str | None:
    """``  LINE | text``: the line ``mark`` is on, or the last non-blank one before it (an
    error found at a blank line or the end of the file was made above it)."""
    if not isinstance(mark.buffer, str):
        return None
    lines = mark.buffer.rstrip("\0").split("\n")
    for n in range(min(mark.line, len(lines) - 1), -1, -1):
        text = lines[n].rstrip("\r ")
        if text.strip():  # control characters and tabs shown as escapes, not rung or lost
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
            return f"  {n + 1} | {text if len(text) <= 120 else text[:117] + '...'}"
    return None


def _syntax_error(path: Path, text: str, exc: yaml.YAMLError) -> ConfigSyntaxError:
    """``exc`` as one line naming file, line and column (1-based, as editors count), with
    what was being parsed when that helps (an unclosed bracket), and the source line."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: only its offset
        line = text.count("\n", 0, exc.position)
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        mark = yaml.Mark(str(path), exc.position, line, column, text, exc.position)
        what = f"{exc.reason} (character U+{int(exc.character):04X})"
        where = f"{path}:{line + 1}:{column + 1}"
        problem = ConfigProblem("", f"{where}: not valid YAML: {what}")
        return ConfigSyntaxError(problem, _source_line(mark))
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        text = " ".join(str(exc).split())
        return ConfigSyntaxError(ConfigProblem("", f"{path} is not valid YAML: {text}"), None)
    mark, context_mark = exc.problem_mark, exc.context_mark
    what = exc.problem or exc.context or "syntax error"
    if exc.problem and exc.context and context_mark is not None:
        what += f" ({exc.context} at line {context_mark.line + 1})"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    source = _source_line(mark)
    return ConfigSyntaxError(ConfigProblem("", f"{where}: not valid YAML: {what}"), source)


def config_error_lines(path: str | Path, exc: ConfigError) -> list[str]:
    """What check-config and serve print for a file that cannot be loaded (one formatter,
    so both say the same): a syntax error in at most two lines, else a count and every
    problem with its key path."""
    if isinstance(exc, ConfigSyntaxError):
        return [str(p) for p in exc.problems] + ([exc.source] if exc.source else [])
    return [f"{path}: {len(exc.problems)} error(s)", *(f"  {p}" for p in exc.problems)]


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file. Relative paths in it are relative to the file.

    Every problem is reported at once: duplicate keys together with validation errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {p}: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigProblem("", f"{p} is not UTF-8 text (byte {exc.start} cannot be decoded)")]
        ) from None
    try:
        loader = _Loader(text)  # refuses control characters already
    except yaml.YAMLError as exc:
        raise _syntax_error(p, text, exc) from None
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _syntax_error(p, text, exc) from None
    except RecursionError:
        raise ConfigError([ConfigProblem("", f"{p} is nested too deeply")]) from None
    finally:
        loader.dispose()
    try:
        config = parse_config(doc, base_dir=p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(loader.duplicates + exc.problems) from None
    if loader.duplicates:
        raise ConfigError(loader.duplicates)
    return config
