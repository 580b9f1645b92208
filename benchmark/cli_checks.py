"""Argument checks shared by benchmark/report.py and benchmark/sweep.py.

Every bad argument stops a tool with one line `error: ...` that names the flag (or the recipe file and key), exit
code 2, before anything is written. `Parser` is argparse with that one-line error (argparse's own: a bad int, a
choice not in `choices`, a flag without its values) and a `check=` per flag: a function of one value (each item of a
list) returning what is wrong with it, or None, run on every value after parsing. The `*_problem` helpers are those
functions; they are also used on the values a recipe gives.
"""

import argparse
import difflib
import math
import os
import re
from pathlib import Path

SEED_LIMIT = 2**32  # numpy, torch and Python's random all accept 0 <= seed < 2**32; numpy refuses anything else


def seed_problem(seed):
    """What is wrong with a seed, or None."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return "a seed must be an integer"
    if not 0 <= seed < SEED_LIMIT:
        return "a seed must be in 0 <= seed < 2**32 (what numpy, torch and Python's random all accept)"
    return None


def at_least(low, why: str = ""):
    """check=: a number >= low (and finite); `why` is said with the error."""

    def problem(value):
        if not math.isfinite(value):
            return "must be a finite number"
        return None if value >= low else f"must be >= {low}" + (f" ({why})" if why else "")

    return problem


def above(low):
    """check=: a finite number > low."""

    def problem(value):
        if not math.isfinite(value):
            return "must be a finite number"
        return None if value > low else f"must be > {low}"

    return problem


def finite_problem(value):
    """check=: a finite number (not nan, inf or -inf)."""
    return None if math.isfinite(value) else "must be a finite number"


def folder_problem(path):
    """What stops files being written into folder `path` (made with its parents if missing), or None."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return "is a file, not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else "the folder is not writable"
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot make it: {parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot make it: {parent} is not writable"


def did_you_mean(word: str, choices, what: str = "") -> str:
    """'; did you mean A or B?' over the close matches among `choices`; else ' (WHAT: a, b, ...)' listing them."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    if not what:
        return ""
    shown = ", ".join(choices[:15]) + (f" and {len(choices) - 15} more" if len(choices) > 15 else "")
    return f" ({what}: {shown or 'none'})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and `check=` on add_argument (see the module's docstring)."""

    def add_argument(self, *args, check=None, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if check is not None:
            self.__dict__.setdefault("checks", []).append((action, check))
        return action

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for action, check in self.__dict__.get("checks", []):
            value = getattr(parsed, action.dest)
            for v in value if isinstance(value, list) else [value]:
                problem = None if v is None else check(v)
                if problem:
                    self.error(f"{action.option_strings[0]} {v}: {problem}")
        return parsed

    def error(self, message):
        # argparse's "argument --reps: invalid int value: 'x'" -> "--reps: invalid int value: 'x'"
        message = re.sub(r"^argument ([^\s:/]+)(?:/\S+)?: ", r"\1: ", message)
        self.exit(2, f"error: {' '.join(message.split())}\n")
