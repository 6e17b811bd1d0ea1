"""argparse's side of the flags: the help formatter and the type functions that range-check numbers, shared by
parser.py and training_flags.py."""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default after its help, except for flags whose default is filled in later (None): their
    help says where the value comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def checked_number(name: str, convert, accept, expected: str):
    """An argparse type called ``name`` (argparse's message for text that is no number): ``convert`` the text, and
    refuse a value ``accept`` rejects, saying what was ``expected``."""

    def parse(text: str):
        value = convert(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = checked_number("_positive_int", int, lambda v: v > 0, "a positive integer")
non_negative_int = checked_number("_non_negative_int", int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked_number("_positive_float", float, lambda v: 0 < v < math.inf, "a finite positive number")
non_negative_float = checked_number("_non_negative_float", float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
fraction = checked_number("_fraction", float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
seed = checked_number("_seed", int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32) (numpy's seed range)")
