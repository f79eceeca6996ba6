"""What is wrong with a config, in one line: each validation error with its full key, the nearest
known key for an unknown one, and where it came from (the ``--set`` that wrote it, else the file).

Kept apart from config.py, which defines the settings; this only words their errors.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from concise_rl.errors import did_you_mean

# Keys that older configs may still carry, and what replaced them.
_RENAMED = {
    "whiten_advantages": "advantage_norm: 'whiten' for true, 'none' for false (or 'scale': divide by the std only)",
}


def _unwrap_optional(t: Any) -> Any:
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _keys_at(root: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The keys a config section takes: the fields of the model at ``loc`` below ``root`` ([] if none)."""
    t: Any = root
    parts = list(loc)
    while parts:
        t = _unwrap_optional(t)
        if get_origin(t) is dict:  # a named entry (evaluation.benchmarks.NAME): the key is the user's
            t, _ = get_args(t)[1], parts.pop(0)
        elif isinstance(t, type) and issubclass(t, BaseModel) and parts[0] in t.model_fields:
            t = t.model_fields[parts.pop(0)].annotation
        else:
            return []
    t = _unwrap_optional(t)
    return list(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else []


def _errors(exc: ValidationError, prefix: str, root: type[BaseModel]) -> list[tuple[str, str]]:
    """Each validation error as (its full key, one sentence); an unknown key comes with the nearest known one."""
    out = []
    for err in exc.errors():
        path = tuple(str(p) for p in err["loc"])
        loc = ".".join(path)
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        key = path[-1] if path else ""
        if err["type"] == "extra_forbidden" and key in _RENAMED:
            out.append((loc, f"key '{loc}' was replaced; use {_RENAMED[key]}"))
        elif err["type"] == "extra_forbidden":
            known = _keys_at(root, path[:-1])
            parent = loc.rpartition(".")[0]
            hint = did_you_mean(key, known, prefix=f"{parent}." if parent else "")
            out.append((loc, f"unknown key '{loc}'{hint or ' (check the spelling against configs/demo.yaml)'}"))
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            out.append((loc, f"'{loc}': {msg}{got_txt}" if loc else f"{msg}{got_txt}"))
    return out


def describe(exc: ValidationError, prefix: str, root: type[BaseModel]) -> str:
    """Every error of ``exc`` in one line, keys in full (``prefix`` + the error's place below ``root``)."""
    return "; ".join(text for _, text in _errors(exc, prefix, root))


def blame(exc: ValidationError, path: Path | None, overrides, root: type[BaseModel]) -> str:
    """Each error with where its key came from: the ``--set`` that wrote it, else the config file."""
    keys = {assignment: assignment.partition("=")[0].strip().strip(".") for assignment in overrides}
    where = f"config {path}" if path else "config"
    parts = []
    for loc, text in _errors(exc, "", root):
        # The last --set wins, as it does when the overrides are applied; a --set of a whole
        # section (--set evaluation={...}) owns every key below it.
        # A section's own check (loc empty, e.g. a phase's PPO overrides) names the key in its text.
        source = next((f"--set {a}" for a, k in reversed(keys.items())
                       if (loc and (loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")))
                       or (not loc and f"'{k}'" in text)), where)
        parts.append(f"{source}: {text}")
    return "; ".join(parts)
