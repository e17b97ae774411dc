"""``--help`` text from the typed config: every key's type, range or choices, default, and the
``#`` comment beside (or above) the field in ``aptos_ray/config.py``, the one place it is written."""

from __future__ import annotations

import ast
import inspect
import textwrap
import tokenize
import types
import typing
from dataclasses import fields
from functools import lru_cache
from typing import Literal

from aptos_ray import config_types as ct
from aptos_ray.config import Config, _section_classes


@lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the trailing ``# ...`` of its line, or the
    ``#`` lines right above it. The source is the one place the help text lives."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    helps = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = node.lineno
        if line in comments:
            helps[node.target.id] = comments[line]
            continue
        above = []
        while line - 1 in comments and line - 1 not in code_lines:
            line -= 1
            above.insert(0, comments[line])
        helps[node.target.id] = " ".join(above)
    return helps


def type_text(section: str, name: str) -> str:
    cls = _section_classes()[section]
    typ = ct.field_type(cls, name)
    if typing.get_origin(typ) is Literal:
        text = "{" + ",".join(map(str, typing.get_args(typ))) + "}"
    elif typing.get_origin(typ) in (typing.Union, types.UnionType):  # e.g. bool | Literal["auto"]
        text = "{" + ",".join(ct.union_choices(typing.get_args(typ))) + "}"
    else:
        text = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT", dict: "YAML"}.get(typ, str(typ))
    rules = [str(r) for r in ct.field_rules(cls, name) if not isinstance(r, ct.OutputDir)]
    return f"{text} ({'; '.join(rules)})" if rules else text


def help_text(sections: list[str] | None = None) -> str:
    """Every key of ``sections`` (all by default): name, type, default and comment."""
    defaults = Config()
    lines = []
    for section, cls in _section_classes().items():
        if sections is not None and section not in sections:
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{section}: {doc}")
        helps = field_help(cls)
        for f in fields(cls):
            default = ct.value_text(getattr(getattr(defaults, section), f.name))
            lines.append(f"  --{section}.{f.name}={type_text(section, f.name)}  [default: {default}]")
            if helps.get(f.name):
                lines.extend(textwrap.wrap(helps[f.name], width=100, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))
        lines.append("")
    return "\n".join(lines)
