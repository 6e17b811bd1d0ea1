"""The one check of a file the project reads back: each field's dtype kind, shape (its rank and the length of each
axis), smallest value and allowed values. The hard-negative file (docs/hard_negatives.md) and the local-feature
store's header (docs/feature_store.md) declare their fields with ``Field`` and read through ``check_fields``; a field
that does not fit is one line naming the file, the field, what was found and what was expected.

A JSON value is checked as numpy sees it: ``[30, 40]`` is an integer array of shape (2,), ``"nodes"`` text of rank 0,
``true`` a boolean (so it is not taken for an integer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from util import PRGSError

KIND_NAMES = {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point", "U": "text", "S": "bytes"}


class FileFormatError(PRGSError, ValueError):
    """A file the project wrote and reads back that does not follow its format (hand-edited, truncated, written by
    another program); the message names the file, the field and what was expected."""


@dataclass(frozen=True)
class Field:
    """What one field of a file must be.

    kinds: numpy dtype kinds accepted ("iu" integers, "f" floats, "U" text, "b" booleans). shape: one entry per axis
    (so its length is the rank): a length, a name (every field using the name must have the same length there;
    ``check_fields`` may be told it beforehand), or None for any length. minimum: the smallest value any element may
    take. below: every element must be smaller: a number, or a named length (indices into an axis of that length,
    e.g. database indices below "Nd"; the name must be set before, by an earlier field or ``known_lengths``).
    choices: the values a rank-0 field may take (empty: any). required: False for a field older files lack."""

    kinds: str
    shape: tuple[int | str | None, ...] = ()
    minimum: float | None = None
    below: int | str | None = None
    choices: tuple = ()
    required: bool = True

    def expected(self, lengths: Mapping[str, int]) -> str:
        """The field as words, e.g. 'integer of shape (Nq, any)'."""
        kinds = " or ".join(dict.fromkeys(KIND_NAMES.get(kind, kind) for kind in self.kinds))
        if not self.shape:
            return f"a single {kinds} value"
        axes = [
            str(a) if isinstance(a, int) else "any" if a is None else f"{a}={lengths[a]}" if a in lengths else a
            for a in self.shape
        ]
        return f"{kinds} of rank {len(self.shape)}, shape ({', '.join(axes)})"


def check_fields(
    path: str | Path,
    values: Mapping[str, Any],
    schema: Mapping[str, Field],
    known_lengths: Mapping[str, int] | None = None,
    error: type[PRGSError] = FileFormatError,
    hint: str = "",
) -> dict[str, int]:
    """Check ``values`` (the arrays of an .npz, or the entries of a JSON object) against ``schema``.

    Returns the named lengths found (with ``known_lengths``). Raises ``error`` with one line: '<path>: field <name>
    <what is wrong>, expected <what the schema says>' followed by ``hint`` (e.g. how to rebuild the file)."""
    lengths = dict(known_lengths or {})
    suffix = f". {hint}" if hint else ""
    for name, field in schema.items():
        if name not in values:
            if field.required:
                raise error(f"{path}: field '{name}' is missing, expected {field.expected(lengths)}{suffix}")
            continue
        problem = _field_problem(values[name], field, lengths)
        if problem:
            raise error(f"{path}: field '{name}' {problem}{suffix}")
    return lengths


def _field_problem(value: Any, field: Field, lengths: dict[str, int]) -> str:
    """What is wrong with one value, or ''; records the named lengths it sets."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return f"is not an array (ragged or mixed values), expected {field.expected(lengths)}"
    if array.dtype.kind not in field.kinds or array.ndim != len(field.shape):
        return f"has dtype {array.dtype} and shape {array.shape}, expected {field.expected(lengths)}"
    for axis, (length, rule) in enumerate(zip(array.shape, field.shape)):
        wanted = lengths.setdefault(rule, length) if isinstance(rule, str) else rule
        if wanted is not None and length != wanted:
            return f"has {length} entries along axis {axis}, expected {field.expected(lengths)}"
    if field.minimum is not None and array.size and array.min() < field.minimum:
        return f"holds {array.min()}, expected values >= {field.minimum}"
    if field.below is not None and array.size:
        bound = lengths[field.below] if isinstance(field.below, str) else field.below
        if array.max() >= bound:
            named = f" ({field.below})" if isinstance(field.below, str) else ""
            return f"holds {array.max()}, expected values < {bound}{named}"
    if field.choices and array.item() not in field.choices:
        return f"is {array.item()!r}, expected one of {', '.join(repr(c) for c in field.choices)}"
    return ""
