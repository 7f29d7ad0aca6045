"""Reading catalogue and label tables (CSV or FITS, optionally gzipped) in chunks of raw
column values; converting and checking them is :mod:`etl.validation`'s job.

A row the file format itself spoils -- a CSV field longer than the csv module's limit,
a malformed quoted field, a quote left open at the end of its line -- becomes a row
problem of its chunk (quarantined with the reason, the reading goes on with the next
row), never an exception. CSV text is decoded as UTF-8 with undecodable bytes kept as
surrogate escapes, so that the validation can name them and refuse the row instead of
storing replacement characters.
"""
import csv
import gzip
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterable

import numpy as np


def is_fits_file(path) -> bool:
    opener = gzip.open if is_gzip(path) else open
    with opener(path, "rb") as handle:
        return handle.read(9) == b"SIMPLE  ="


def is_gzip(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def canonical_name(name: str) -> str:
    """A catalogue column name compared lower-case, without TOPCAT's ``combined_``."""
    name = name.strip().lower()
    if name.startswith("combined_"):
        name = name[len("combined_"):]
    return name


@dataclass
class CatalogueChunk:
    first_row: int                    # 1-based data row number of the chunk's first row
    columns: Dict[str, list]          # column key -> raw values (str, bytes or numbers)
    size: int
    problems: Dict[int, str] = field(default_factory=dict)   # row index -> unreadable why


def iter_catalogue_chunks(path, chunk_rows=50000, wanted=None,
                          name_of=canonical_name) -> Iterable[CatalogueChunk]:
    """Yield the table in chunks of raw column values, keyed by ``name_of(column name)``.

    Only the ``wanted`` keys are kept (all when None; the first column of a key wins).
    CSV values stay strings, FITS values are numpy arrays (text as bytes).
    """
    if is_fits_file(path):
        yield from _iter_fits_chunks(path, chunk_rows, wanted, name_of)
    else:
        yield from _iter_csv_chunks(path, chunk_rows, wanted, name_of)


def _pick_columns(names, wanted, name_of):
    """Map wanted key -> index of the first matching input column."""
    picked = {}
    for index, name in enumerate(names):
        key = name_of(name)
        if (wanted is None or key in wanted) and key not in picked:
            picked[key] = index
    return picked


def _open_text(path):
    opener = gzip.open if is_gzip(path) else open
    return opener(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape")


def _iter_csv_chunks(path, chunk_rows, wanted, name_of):
    with _open_text(path) as handle:
        header = _read_header(handle, path)
        if header is None:
            return
        picked = _pick_columns(header, wanted, name_of)
        width = len(header)
        first_row = 1
        while True:
            lines = list(itertools.islice(handle, chunk_rows))
            if not lines:
                return
            rows, problems = _parse_csv_lines(lines, width, first_line=first_row + 1)
            if min(map(len, rows)) < width:     # short rows: missing trailing fields are blank
                rows = [row + [""] * (width - len(row)) for row in rows]
            columns = {name: [row[index] for row in rows] for name, index in picked.items()}
            yield CatalogueChunk(first_row, columns, len(rows), problems)
            first_row += len(rows)


def _read_header(handle, path):
    """The header row (None for an empty file); a header the csv module refuses makes
    the whole file unusable."""
    line = handle.readline()
    if not line:
        return None
    try:
        return next(csv.reader([line], strict=True))
    except csv.Error as error:
        raise ValueError(f"{path}: unreadable CSV header: {_why(error)}") from None


def _why(error: csv.Error) -> str:
    return ("a quoted field is not closed on its line" if "end of data" in str(error)
            else str(error))


def _parse_csv_lines(lines, width, first_line):
    """One row per physical line (``first_line`` is the file's number of ``lines[0]``);
    a line the csv module refuses is a blank row with a problem.

    A catalogue field never holds a line break, so a quote left open at the end of its
    line spoils that line only: the csv module would read every following line into the
    field, and with it silently lose the rest of the file (or of the chunk)."""
    # strict: a malformed quoted field (an unclosed quote at the end of the input, text
    # after a closing quote) is an error, not a guess
    try:
        rows = list(csv.reader(lines, strict=True))    # the fast C loop
    except csv.Error:
        rows = None
    if rows is not None and len(rows) == len(lines):     # no row spans lines
        return rows, {}
    rows, problems = [], {}
    for number, line in enumerate(lines):
        try:
            row = next(csv.reader([line], strict=True), [])
        except csv.Error as error:
            problems[number] = f"unreadable CSV row (line {first_line + number}): {_why(error)}"
            row = [""] * width
        rows.append(row)
    return rows, problems


def _iter_fits_chunks(path, chunk_rows, wanted, name_of):
    from astropy.io import fits

    with fits.open(path, memmap=not is_gzip(path)) as hdus:
        table_hdu = next((h for h in hdus if isinstance(h, fits.BinTableHDU)), None)
        if table_hdu is None:
            raise ValueError(f"{path}: no binary table")
        data = table_hdu.data
        names = data.columns.names
        picked = _pick_columns(names, wanted, name_of)
        for name, index in picked.items():
            shape = data.dtype[names[index]].shape
            if shape:
                raise ValueError(f"{path}: column {names[index]!r} holds an array of "
                                 f"{'x'.join(map(str, shape))} values a row; a catalogue "
                                 f"column holds one value a row")
            # a logical column would pass as the numbers 0 and 1 (an RA of 1.0 deg)
            if data.columns[index].format.endswith("L"):
                raise ValueError(f"{path}: column {names[index]!r} is logical (T/F); a "
                                 f"catalogue column holds numbers or text")
        nulls = {name: _null_value(data.columns[index]) for name, index in picked.items()}
        total = len(data)
        for start in range(0, total, chunk_rows):
            stop = min(start + chunk_rows, total)
            columns = {}
            for name, index in picked.items():
                values = np.asarray(data.field(names[index])[start:stop])
                null = nulls[name]
                columns[name] = values if null is None else _missing_as_none(values, values == null)
            yield CatalogueChunk(start + 1, columns, stop - start)


def _null_value(column):
    """The value an integer FITS column's cells read as when blank: TNULL (a raw value)
    scaled as the column's values are, or None."""
    if column.null is None or column.null == "" or column.format.endswith(("E", "D", "A")):
        return None
    return int(column.null) * (column.bscale or 1) + (column.bzero or 0)


def _missing_as_none(values, missing):
    """``values`` with its blank cells (boolean ``missing``) missing, as the validation
    reads them: NaN in a float (or multi-dimensional) column, None in any other. A blank
    integer cell holds its column's TNULL, a number (999999 as an lmjd, which
    then overwrote a stored value)."""
    missing = np.asarray(missing, dtype=bool)
    if not missing.any():
        return values
    if values.dtype.kind == "f" or values.ndim > 1:
        out = values.astype(float)
        out[missing] = np.nan
        return out
    out = values.astype(object)
    out[missing] = None
    return out


def read_table(path):
    """A whole label table: (column name -> numpy array, {row index: unreadable why})."""
    if is_fits_file(path):
        from astropy.table import Table

        table = Table.read(path, hdu=_first_table_hdu(path))     # TNULL cells come masked
        return {name: _missing_as_none(np.asarray(table[name]), np.ma.getmaskarray(table[name]))
                for name in table.colnames}, {}
    with _open_text(path) as handle:
        header = _read_header(handle, path) or []     # a table may have no rows
    columns: Dict[str, list] = {name: [] for name in header}
    problems = {}
    for chunk in _iter_csv_chunks(path, 100000, None, str):
        for name, values in chunk.columns.items():
            columns[name].extend(values)
        problems.update({chunk.first_row - 1 + i: reason
                         for i, reason in chunk.problems.items()})
    return {name: np.asarray(values, dtype=object) for name, values in columns.items()}, \
        problems


def read_label_table(path):
    """The label catalogue as a dict of column name -> numpy array (FITS or CSV)."""
    return read_table(path)[0]


def _first_table_hdu(path):
    from astropy.io import fits

    with fits.open(path) as hdus:
        for number, hdu in enumerate(hdus):
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                return number
    raise ValueError(f"{path}: no table HDU")
