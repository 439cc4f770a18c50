"""The command line of every pipeline entry point: jsonargparse reads a dataclass from YAML and flags.

`parse(Config, argv)` builds the parser from the dataclass (jsonargparse takes each field's type and
default from it), reads `--config FILE.yaml` (several compose, later ones win; flags win over them)
and returns the dataclass. jsonargparse's own spellings work (`--num_shards 2`, `--input [a,b]`,
`--input+ c`, `--overwrite true`, `--min_rating null`, `--print_config`), and so do the ones the
pipeline's commands have always taken (docs/data_format.md), translated by `_jsonargparse_argv`:
`--kebab-case`, several values after a list flag (`--input a.csv b.csv`; none empties it), `none`
for an optional value, and `--x` / `--no-x` for a boolean.

Every problem is a PipelineError with one line that names the key, or the file, and what is right.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from pipeline.errors import PipelineError

T = TypeVar("T")


def parser(cls: type, prog: str, description: str, extra: dict[str, type] | None = None) -> ArgumentParser:
    """`--config` + one flag per field of `cls` + a required `--<name>` per `extra` entry."""
    p = ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file(s) of keys; flags override them")
    for name, kind in (extra or {}).items():
        p.add_argument(f"--{name}", type=kind, required=True)
    p.add_class_arguments(cls, None)
    return p


def parse(cls: type[T], argv: list[str], prog: str, description: str = "",
          extra: dict[str, type] | None = None) -> tuple[T, list[Path], dict[str, Any]]:
    """(the dataclass from defaults <- YAML files <- flags, the config files read in order, the extras)."""
    p = parser(cls, prog, description, extra)
    try:
        ns = p.parse_args(_jsonargparse_argv(cls, [str(a) for a in argv])).clone(with_meta=False)
    except (ArgumentError, TypeError, ValueError, KeyError) as e:  # what jsonargparse and the types raise
        raise PipelineError(_message(e, cls, argv)) from None
    configs = [Path(str(c)) for c in (ns.pop("config", None) or [])]
    extras = {name: ns.pop(name) for name in (extra or {})}
    return instantiate(cls, ns), configs, extras


def instantiate(cls: type[T], ns: Namespace) -> T:
    try:
        return cls(**ns.as_dict())
    except (TypeError, ValueError) as e:
        raise PipelineError(str(e)) from None


# ---- the flag spellings the pipeline's commands took before jsonargparse (docs/data_format.md) ----

def _field_types(cls: type) -> dict[str, Any]:
    """field name -> its type without Optional (a union with a list: the list, e.g. `list[str] | str`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(hint) if a is not type(None)]
            lists = [a for a in rest if typing.get_origin(a) is list]
            hint = lists[0] if lists else rest[0] if len(rest) == 1 else hint
        out[f.name] = hint
    return out


def _jsonargparse_argv(cls: type, argv: list[str]) -> list[str]:
    kinds = _field_types(cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        m = re.fullmatch(r"--(no-)?([a-z][a-z0-9_-]*)(=.*)?", token)
        name = m.group(2).replace("-", "_") if m else None
        if m is None or name not in kinds:
            out.append(token)  # --config, --print_config, --help, a value, or an unknown flag (jsonargparse says)
            continue
        kind, negated, inline = kinds[name], bool(m.group(1)), m.group(3)
        if negated:
            if kind is not bool:
                out.append(token)
                continue
            out.append(f"--{name}=false")
        elif inline is not None:
            out.append(f"--{name}={_value(inline[1:])}")
        elif kind is bool and (i == len(argv) or argv[i].startswith("--")):
            out.append(f"--{name}=true")
        elif typing.get_origin(kind) is list and not (i < len(argv) and argv[i].startswith("[")):
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out.append(f"--{name}={json.dumps(values)}")
        else:
            out.append(f"--{name}")
            if i < len(argv):
                out.append(_value(argv[i]))
                i += 1
    return out


def _value(v: str) -> str:
    return "null" if v.lower() == "none" else v


def _message(e: Exception, cls: type, argv: list[str]) -> str:
    text = " ".join(str(e).split())
    keys = [f.name for f in dataclasses.fields(cls)]
    configs = [a for i, a in enumerate(argv) if i and argv[i - 1] == "--config"]
    unknown = re.findall(r"(?:Option|Key|key) ['\"]([\w.-]+)['\"] is not accepted", text)
    unknown += re.findall(r"unrecognized arguments: --([\w.-]+)", text)
    if unknown:
        key = unknown[0].replace("-", "_")
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        where = "on the command line" if "unrecognized" in text else f"in {', '.join(configs) or 'the config'}"
        return (f"unknown config key {key!r} ({where})" + (f"; did you mean {near[0]!r}?" if near else "")
                + f" Known keys: {', '.join(keys)}")
    missing = re.search(r'Configuration check failed :: Key "([\w.]+)" is required', text)
    if missing:
        return f"config key {missing.group(1)!r} is required: give --{missing.group(1).replace('_', '-')} VALUE"
    return text
