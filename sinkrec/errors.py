"""User-facing errors of `python -m sinkrec`: one paragraph, no traceback (SINKREC_DEBUG=1 or --debug shows it).

A `UserError` names what is wrong, where (file, key) and what would be right. `sinkrec.cli.run` prints
it as `error: <message>` and exits 2; the data path's `ShardError` is printed the same way.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix (a config value, a file, a store); the message says how."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (also a ValueError, as the model's own checks raise)."""


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SINKREC_DEBUG", "") not in ("", "0")


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of `word` (a config key or option), or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def where(key: str, argv: list[str], configs: list[str]) -> str:
    """'the command line' when `--key` was given there, else the config file(s)."""
    if any(a == f"--{key}" or a.startswith((f"--{key}=", f"--{key}.")) for a in argv):
        return "the command line"
    return ", ".join(configs) if configs else "the defaults"
