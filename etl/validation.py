"""Raw input values -> values a database column accepts, one column at a time.

What a column accepts comes from the schema (:func:`etl.schema.value_limits`): an integer
type's range, a String's length, a declared physical range, NOT NULL. Every value that
would make the database refuse a batch (or that is not what it claims to be) is found
here first and reported per row, so that one bad value costs one row:

* numbers: ASCII decimal notation only (no Unicode digits, no ``1_000``); blank, NaN,
  infinity and -9999 are missing (a number too large for a double is out of range);
  integers are parsed exactly (an obsid beyond 64 bits is out of range, never wrapped)
  and must be integral; then the range.
* text: strictly UTF-8 (undecodable bytes make the row bad, they are never replaced),
  no NUL character (PostgreSQL text cannot hold one), at most the column's length;
  surrounding blanks are stripped and an empty text is missing.
* a missing value in a NOT NULL column.

The checks run over whole columns with C-level fast paths (one join, one min/max); only
a column that fails them is examined value by value to name the bad ones.
"""
import decimal
import math
from typing import Dict, List, Tuple

import numpy as np

from etl.schema import ValueLimits, value_limits

MISSING_SENTINEL = -9999
OUT_OF_RANGE = "{name} out of range {range}"
SHOWN_CHARACTERS = 60


def convert_column(column, raw, name=None) -> Tuple[list, Dict[int, str]]:
    """(values for ``column``, {index: reason}) from ``raw`` values.

    ``raw``: a list of strings (CSV), a numpy array (FITS), or a list of Python values
    (headers). Values at bad indices are None. ``name`` (default the column's name) is
    what reasons call the column.
    """
    limits = value_limits(column)
    name = name or column.name
    if limits.kind == "integer":
        values, problems = _integers(raw, limits, name)
    elif limits.kind == "float":
        values, problems = _floats(raw, limits, name)
    else:
        values, problems = _texts(raw, limits, name)
    if limits.required and None in values:
        for index, value in enumerate(values):
            if value is None and index not in problems:
                problems[index] = f"missing {name}"
    return values, problems


def shown(value) -> str:
    """A value as a reason quotes it: repr (so control characters and undecodable bytes
    are visible and the reason is plain text), cut to a readable length."""
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    if len(text) > SHOWN_CHARACTERS:
        length = f"{len(value)} characters" if isinstance(value, (str, bytes)) else "long"
        text = f"{text[:SHOWN_CHARACTERS]}... ({length})"
    return text


def _plain_ascii(texts) -> bool:
    """Every text is ASCII without '_' (so int()/float() read only ASCII notation)."""
    try:
        joined = "".join(texts)
    except TypeError:
        return False
    return joined.isascii() and "_" not in joined


def _is_text_list(raw) -> bool:
    return (not isinstance(raw, np.ndarray) or raw.dtype.kind in "UO") and \
        (len(raw) == 0 or isinstance(raw[0], str))


# ---------------------------------------------------------------------------------------
# Integers
def _integers(raw, limits: ValueLimits, name):
    numbers = None
    plain_texts = _is_text_list(raw) and _plain_ascii(raw)
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "iub":
        numbers = raw.tolist()                       # exact Python ints
    elif plain_texts:
        try:
            numbers = [int(text) if text.strip() else None for text in raw]
        except ValueError:                           # "12.0", "1e3", "abc", "nan", ...
            numbers = None
    if numbers is not None:
        if MISSING_SENTINEL in numbers:
            numbers = [None if n == MISSING_SENTINEL else n for n in numbers]
        present = [n for n in numbers if n is not None] if None in numbers else numbers
        if not present or (min(present) >= limits.minimum and max(present) <= limits.maximum):
            return numbers, {}
    else:
        numbers = _integral_floats(raw, limits, plain_texts)
        if numbers is not None:
            return numbers, {}
    values, problems = [], {}
    raw_values = raw.tolist() if isinstance(raw, np.ndarray) else raw
    for index, value in enumerate(raw_values):
        if _undecodable(value):
            problems[index] = _not_utf8(name, value)
            values.append(None)
            continue
        number, problem = _integer(value)
        if problem is None and number is not None and \
                not limits.minimum <= number <= limits.maximum:
            problem = OUT_OF_RANGE
        if problem:
            problems[index] = (f"{problem.format(name=name, range=limits.range_text())}: "
                               f"{shown(value)}")
            number = None
        values.append(number)
    return values, problems


def _integral_floats(raw, limits: ValueLimits, plain_texts):
    """Integers written as floats ("55862.0", as pandas writes them; FITS float columns):
    the values when every one is integral, in range and exact in a float, else None."""
    if isinstance(raw, np.ndarray) and raw.dtype.kind == "f":
        numbers = raw.astype(float)
    # 15 characters hold at most 15 significant digits, which a float keeps exactly.
    elif plain_texts and max(map(len, raw), default=0) <= 15:
        try:
            numbers = np.array([float(v) if v.strip() else math.nan for v in raw], dtype=float)
        except ValueError:
            return None
    else:
        return None
    if plain_texts and np.isinf(numbers).any():
        return None                                   # "inf" is missing, "1e999" is not
    missing = ~np.isfinite(numbers) | (numbers == MISSING_SENTINEL)
    present = numbers[~missing]
    if present.size and not (
            (present == np.floor(present)).all() and np.abs(present).max() < 2.0 ** 53
            and present.min() >= limits.minimum and present.max() <= limits.maximum):
        return None                                   # the exact path names the bad ones
    values = np.where(missing, 0, numbers).astype(np.int64).tolist()
    if missing.any():
        for index in np.flatnonzero(missing).tolist():
            values[index] = None
    return values


def _integer(value):
    """(int or None for missing, None) or (None, problem template)."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return int(value), None
    if isinstance(value, int):
        return _missing_if_sentinel(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, None
        number = value
    else:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        text = text.strip()
        if not text:
            return None, None
        if not text.isascii() or "_" in text:
            return None, "non-numeric {name}"
        try:
            number = decimal.Decimal(text)        # exact: "9007199254740993.0" stays odd
        except decimal.InvalidOperation:
            return None, "non-numeric {name}"
        if not number.is_finite():                # NaN, Infinity: missing, as for floats
            return None, None
        if number.adjusted() > 40:                # no 10**1000000-digit int() for "1e1000000"
            return None, OUT_OF_RANGE
    if number != int(number):
        return None, "non-integer {name}"
    return _missing_if_sentinel(int(number)), None


def _missing_if_sentinel(number):
    return None if number == MISSING_SENTINEL else number


# ---------------------------------------------------------------------------------------
# Floats
def _floats(raw, limits: ValueLimits, name):
    problems = {}
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "fiub":
        numbers = raw.astype(float)
    else:
        numbers = None
        if _is_text_list(raw) and _plain_ascii(raw):
            try:
                # float() per value is faster than numpy's string casts; blanks are missing.
                numbers = np.array([float(v) if v.strip() else math.nan for v in raw],
                                   dtype=float)
            except ValueError:
                numbers = None
        if numbers is None:
            numbers = np.empty(len(raw), dtype=float)
            raw_values = raw.tolist() if isinstance(raw, np.ndarray) else raw
            for index, value in enumerate(raw_values):
                numbers[index], problem = _float(value)
                if _undecodable(value):
                    problems[index] = _not_utf8(name, value)
                elif problem:
                    problems[index] = f"non-numeric {name}: {shown(value)}"
        infinite = np.isinf(numbers)
        if infinite.any():                  # "inf" is missing; "1e999" is out of range
            raw_values = raw.tolist() if isinstance(raw, np.ndarray) else raw
            for index in np.flatnonzero(infinite).tolist():
                if "inf" not in str(raw_values[index]).lower():
                    problems.setdefault(index, f"{name} out of range (beyond a double): "
                                               f"{shown(raw_values[index])}")
    missing = ~np.isfinite(numbers) | (numbers == MISSING_SENTINEL)
    if limits.minimum is not None or limits.maximum is not None:
        low = -np.inf if limits.minimum is None else limits.minimum
        high = np.inf if limits.maximum is None else limits.maximum
        outside = ~missing & ((numbers < low) | (numbers > high))
        if outside.any():
            raw_values = raw.tolist() if isinstance(raw, np.ndarray) else raw
            for index in np.flatnonzero(outside).tolist():
                problems[index] = (f"{name} out of range {limits.range_text()}: "
                                   f"{shown(raw_values[index])}")
            missing |= outside
    values = numbers.tolist()
    if missing.any():
        for index in np.flatnonzero(missing).tolist():
            values[index] = None
    return values, problems


def _float(value):
    """(float, None), NaN for missing, or (NaN, "non-numeric")."""
    if value is None:
        return math.nan, None
    if isinstance(value, (int, float)):
        try:
            return float(value), None
        except OverflowError:                      # an int beyond a double: out of range
            return math.inf, None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    text = text.strip()
    if not text:
        return math.nan, None
    if not text.isascii() or "_" in text:
        return math.nan, "non-numeric"
    try:
        return float(text), None
    except ValueError:
        return math.nan, "non-numeric"


# ---------------------------------------------------------------------------------------
# Text
def _texts(raw, limits: ValueLimits, name) -> Tuple[List, Dict[int, str]]:
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind == "S":
            try:
                raw = raw.astype(str)                 # ASCII: the usual FITS text
            except UnicodeDecodeError:
                raw = raw.tolist()                    # bytes, decoded one by one below
        if isinstance(raw, np.ndarray):
            raw = raw.tolist()
    if _is_text_list(raw):
        try:
            joined = "".join(raw)
        except TypeError:                             # None among the texts
            joined = None
        if joined is not None and (joined.isascii() or _encodes(joined)) \
                and "\x00" not in joined:
            # Unstripped lengths first: one C-level pass, enough for almost every column.
            if limits.max_length is None or max(map(len, raw), default=0) <= limits.max_length \
                    or max(len(text.strip()) for text in raw) <= limits.max_length:
                return [text.strip() or None for text in raw], {}
    values, problems = [], {}
    for index, value in enumerate(raw):
        text, problem = _text(value, limits, name)
        if problem:
            problems[index] = problem
        values.append(text)
    return values, problems


def _undecodable(value) -> bool:
    """A text holding bytes that were not UTF-8 (kept as surrogate escapes)."""
    return isinstance(value, str) and not value.isascii() and not _encodes(value)


def _not_utf8(name, value) -> str:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return f"{name} is not valid UTF-8: {shown(value)}"


def _encodes(text) -> bool:
    """False when ``text`` holds undecodable bytes (surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value, limits, name):
    """(stripped text or None, None) or (None, reason)."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, _not_utf8(name, value)
    elif not isinstance(value, str):
        value = str(value)
    elif _undecodable(value):
        return None, _not_utf8(name, value)
    if "\x00" in value:
        return None, f"{name} contains a NUL character: {shown(value)}"
    value = value.strip()
    if limits.max_length is not None and len(value) > limits.max_length:
        return None, f"{name} longer than {limits.max_length} characters: {shown(value)}"
    return value or None, None
