"""argparse ``type=`` checkers for the command-line options that are not Config fields.

Config fields (``dnnrl train`` / ``reproduce``) are checked by :func:`dnnrl.config.validate`,
which API callers reach too. The options of ``predict``, ``export``, ``eval`` and ``embed``
go straight to functions, so they are checked here, at parse time: a bad value stops the
command in its first second with ``argument --NAME: expected ...``, before a model or a
data set is loaded, instead of a torch error (or a silently changed value) later.
"""
import argparse
import math
import os
from typing import Callable, Sequence


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer >= lo."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError("expected an integer >= %d, got %r" % (lo, text))
        return value
    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def float_above(lo: float) -> Callable[[str], float]:
    """A finite number > lo."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > lo):
            raise argparse.ArgumentTypeError("expected a finite number > %g, got %r" % (lo, text))
        return value
    parse.__name__ = "float"
    return parse


def path_with_suffix(suffixes: Sequence[str]) -> Callable[[str], str]:
    """A file name ending in one of ``suffixes`` (case-insensitive): the suffix picks the
    format, so an unknown one would be written in a format its name does not say."""
    def parse(text: str) -> str:
        if not text.lower().endswith(tuple(suffixes)):
            raise argparse.ArgumentTypeError("expected a file name ending in %s, got %r"
                                             % (" or ".join(suffixes), text))
        return text
    parse.__name__ = "path"
    return parse


def directory(text: str) -> str:
    """A directory, or a path where one can be made (not an existing file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError("%r exists and is not a directory" % text)
    return text
