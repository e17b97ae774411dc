"""The typed-config machinery under ``aptos_ray.config``: value rules carried by the types, type
checks and coercion, key lookup over sections, and the YAML reader. Knows no particular section.

A field's type says what it accepts: ``Literal[...]`` lists the choices, ``Annotated[int,
Range(ge=1)]`` the range, ``Annotated[str, OUTPUT_DIR]`` a folder a job writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from aptos_ray import storage
from aptos_ray.errors import ConfigError

# --- value rules carried by the types ------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A numeric range: ``ge``/``gt`` lower, ``le``/``lt`` upper bound; ``zero`` also allows 0 (a
    "pick it for me" value, e.g. ``data.image_size=0`` -> the model's input size)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    zero: bool = False

    def problem(self, value: float) -> str | None:
        if self.zero and value == 0:
            return None
        ok = not (isinstance(value, float) and math.isnan(value))
        ok = ok and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        ok = ok and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        return None if ok else f"must be {self}, got {shown(value)}"

    def __str__(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        text = " and ".join(p for p in (low, high) if p)
        return f"0 or {text}" if self.zero else text


class OutputDir:
    """Marks a folder a job writes: refused below a file or inside /proc, /sys, /dev."""

    SYSTEM = ("/proc", "/sys", "/dev")

    def problem(self, value: str) -> str | None:
        if not value:
            return "must not be empty"
        if storage.is_uri(value):  # checked when it is written
            return None
        path = Path(value).expanduser().resolve()
        if any(path == Path(s) or Path(s) in path.parents for s in self.SYSTEM):
            return f"'{value}' is inside {', '.join(self.SYSTEM)}: pick a folder of your own"
        for folder in (path, *path.parents):
            if folder.exists():
                if not folder.is_dir():
                    return f"'{value}' is below the file {folder}, not a folder"
                return None
        return None

    def __str__(self) -> str:
        return "a folder"


OUTPUT_DIR = OutputDir()
POSITIVE = Range(gt=0)
AT_LEAST_1 = Range(ge=1)
NON_NEGATIVE = Range(ge=0)
FRACTION = Range(ge=0, lt=1)  # 0 <= x < 1
IMAGE_SIZE = Range(ge=32)

PositiveInt = Annotated[int, AT_LEAST_1]
Count = Annotated[int, NON_NEGATIVE]
Fraction = Annotated[float, FRACTION]
OutputPath = Annotated[str, OUTPUT_DIR]


# --- fields of a section ---------------------------------------------------------------------------


def section_fields(sections: dict[str, type]) -> dict[str, dict[str, dataclasses.Field]]:
    return {section: {g.name: g for g in dataclasses.fields(cls)} for section, cls in sections.items()}


def resolve_key(sections: dict[str, type], key: str) -> tuple[str, str]:
    """'optim.lr' -> ('optim', 'lr'); 'lr' -> ('optim', 'lr') when unique; else ConfigError."""
    known = section_fields(sections)
    key = key.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in known:
            raise ConfigError(f"unknown config section '{section}' in '{key}'; sections: {', '.join(known)}")
        if name not in known[section]:
            raise ConfigError(f"unknown config key '{key}'; '{section}' has: {', '.join(known[section])}")
        return section, name
    owners = [s for s, names in known.items() if key in names]
    if not owners:
        raise ConfigError(f"unknown config key '{key}'")
    if len(owners) > 1:
        options = ", ".join(f"{s}.{key}" for s in owners)
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {options}")
    return owners[0], key


@lru_cache(maxsize=None)
def annotated_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls, include_extras=True)[name]


def field_type(cls: type, name: str) -> Any:
    """The field's type without its ``Annotated`` rules."""
    typ = annotated_type(cls, name)
    return typing.get_args(typ)[0] if typing.get_origin(typ) is Annotated else typ


def field_rules(cls: type, name: str) -> list:
    typ = annotated_type(cls, name)
    return list(typ.__metadata__) if typing.get_origin(typ) is Annotated else []


def field_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for this field (its choices, range, folder rule), or None."""
    typ = field_type(cls, name)
    if typing.get_origin(typ) is Literal and value not in typing.get_args(typ):
        return f"must be one of {', '.join(map(str, typing.get_args(typ)))}, got {shown(value)}"
    for rule in field_rules(cls, name):
        problem = rule.problem(value)
        if problem:
            return problem
    return None


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a parsed value against the field's type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin is Annotated:
        return coerce(value, typing.get_args(typ)[0], key)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {shown(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(typ):
            try:
                return coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be one of {', '.join(union_choices(typing.get_args(typ)))}, "
                          f"got {shown(value)}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # a quoted "1e-3" in a YAML file
        try:
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. --train.name=42
    if typ is str and value is None:
        return ""
    base = origin or typ
    if base is typing.Any or isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {shown(value)}")


def union_choices(options: tuple) -> list[str]:
    """What a union of ``bool`` / ``Literal`` / plain types accepts, as a user types it."""
    out = []
    for option in options:
        if typing.get_origin(option) is Literal:
            out += [value_text(v) for v in typing.get_args(option)]
        else:
            out += ["true", "false"] if option is bool else [getattr(option, "__name__", str(option)).upper()]
    return out


# --- YAML ----------------------------------------------------------------------------------------


# A config is a few hundred values: more, once aliases are expanded, is an alias bomb (a few hundred
# bytes that expand to billions of values and blow up whatever walks or prints them).
MAX_YAML_VALUES = 10_000
SHOWN_CHARS = 120  # a value quoted in an error is cut to this length


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (1e-4 is a number, not the string '1e-4'), that
    refuses a key given twice in one mapping (PyYAML keeps the last silently) and aliases that
    expand past ``MAX_YAML_VALUES`` values."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Checked on the pairs as written: keys merged in by ``<<: *anchor`` may be overridden.
        first_line: dict[tuple, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"duplicate key '{cut(key_node.value)}' on line {line}, "
                                  f"first on line {first_line[key]}")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)

    def compose_document(self) -> yaml.Node:
        document = super().compose_document()
        expanded = _expanded_size(document, {})
        if expanded > MAX_YAML_VALUES:
            raise ConfigError(f"its aliases expand to {expanded:.3g} values, more than {MAX_YAML_VALUES}: "
                              "refused as an alias bomb")
        return document


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded, counted without expanding (an aliased node is
    the same object each time, so its size is computed once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts as nothing more while it is open
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML text -> value; ConfigError for a duplicate key, an alias bomb or nesting too deep."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except RecursionError:  # PyYAML composes and constructs recursively
        raise ConfigError("nested too deeply") from None


def read_yaml_file(path: str | Path) -> dict:
    """A config file's mapping of sections; ConfigError naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({cut(str(e).splitlines()[0], 200)})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {cut(str(e), 200)})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data or {}


def override_value(raw: str) -> Any:
    """A YAML value; text that is no valid YAML (``...``, ``a: b: c``) stays text, for the
    field's type check to accept or name."""
    if raw == "":
        return ""
    try:
        return yaml_load(raw)
    except yaml.YAMLError:
        return raw


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, SHOWN_CHARS, SHOWN_CHARS
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 4
    return short


_SHORT = _short_repr()


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: Any) -> str:
    """``repr(value)`` as an error quotes it: nested and long values abridged by ``reprlib`` (which
    never walks more than it shows), then cut to ``SHOWN_CHARS``."""
    return cut(_SHORT.repr(value))


def value_text(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value).replace('"', "'")
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)
