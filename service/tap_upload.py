"""TAP ``UPLOAD`` (DALI 1.1 section 3.4): a client's VOTable as ``TAP_UPLOAD.<name>``.

``UPLOAD=name,param:part`` names a part of the multipart POST holding a VOTable (a URL is
accepted only for a result of this service's own async jobs: the service fetches nothing
on a client's behalf). Its first
table becomes a ``VALUES`` common table expression in front of the query (no temporary
table: the read-only reader role may not create one), column names in lower case, typed
from the VOTable (integers, floats, booleans, text). A positional cross-match joins it
through the catalogue's Q3C index, e.g. ``CONTAINS(POINT(s.ra, s.dec), CIRCLE(u.ra, u.dec,
0.001)) = 1`` with ``spectra AS s`` (the index is on the first POINT's table).

Limits (settings, published in the capabilities): LAMOST_VAC_TAP_UPLOAD_MAX_ROWS rows
and LAMOST_VAC_TAP_UPLOAD_MAX_BYTES bytes per table; beyond them, or for anything but an
inline VOTable, the query is refused with a message naming the upload.
"""
import io
import math
import re
import warnings
from dataclasses import dataclass

from sqlglot import exp

from service.tap_schema import values_cte

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# VOTable datatype -> SQL type, so that a column comes back as it was sent.
SQL_TYPES = {"boolean": "BOOLEAN", "unsignedByte": "SMALLINT", "short": "SMALLINT",
             "int": "INTEGER", "long": "BIGINT", "float": "REAL",
             "double": "DOUBLE PRECISION", "char": "TEXT", "unicodeChar": "TEXT"}
TEXT_TYPES = ("char", "unicodeChar")


class UploadError(ValueError):
    """An upload this service refuses; the message names it."""


@dataclass(frozen=True)
class UploadedTable:
    name: str
    column_names: tuple
    cte: exp.CTE
    rows: int


def cte_name(name: str) -> str:
    return f"lamost_vac_tap_upload_{name.lower()}"


def read_uploads(parameter: str, files, max_rows: int, max_bytes: int,
                 fetch_own=lambda url: None) -> dict:
    """{name: UploadedTable} of an UPLOAD parameter; ``files``: the request's parts;
    ``fetch_own(url)``: the bytes of a URL of this service (a job's result), or None."""
    tables = {}
    for item in (part.strip() for part in parameter.split(";")):
        if not item:
            continue
        name, _, source = item.partition(",")
        name, source = name.strip(), source.strip()
        if not _NAME.fullmatch(name):
            raise UploadError(f"UPLOAD: {name[:40]!r} is not a table name (a letter, then "
                              "letters, digits or _)")
        if name.lower() in tables:
            raise UploadError(f"UPLOAD: the table name {name} is given twice")
        if source.startswith(("http://", "https://")):
            data = fetch_own(source)
            if data is None:
                raise UploadError(f"UPLOAD {name}: a URL upload must be the result of "
                                  "one of this service's completed jobs; send other "
                                  "tables inline (name,param:part)")
        elif source.startswith("param:"):
            part = files.get(source[len("param:"):])
            if part is None:
                raise UploadError(f"UPLOAD {name}: the request has no part named "
                                  f"{source[len('param:'):][:40]!r}")
            data = part.read(max_bytes + 1)
        else:
            raise UploadError(f"UPLOAD {name}: {source[:60]!r} is neither param:part nor "
                              "an http(s) URL")
        if len(data) > max_bytes:
            raise UploadError(f"UPLOAD {name}: more than {max_bytes} bytes; the limit is "
                              f"{max_bytes}")
        tables[name.lower()] = read_votable(name, data, max_rows)
    return tables


def read_votable(name: str, data: bytes, max_rows: int) -> UploadedTable:
    from astropy.io.votable import parse_single_table

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            votable = parse_single_table(io.BytesIO(data))
            table = votable.to_table()
    except Exception as error:  # noqa: BLE001 -- any parse failure is the client's file
        raise UploadError(f"UPLOAD {name}: not a readable VOTable "
                          f"({type(error).__name__}: {str(error)[:200]})") from None
    if len(table) > max_rows:
        raise UploadError(f"UPLOAD {name}: {len(table)} rows; at most {max_rows} are "
                          "accepted")
    columns, seen = [], set()
    for votable_field, column in zip(votable.fields, table.columns.values()):
        lower = column.name.lower()
        if lower in seen:
            raise UploadError(f"UPLOAD {name}: two columns are named {lower!r} (names "
                              "are case-insensitive)")
        seen.add(lower)
        datatype = votable_field.datatype
        is_text = datatype in TEXT_TYPES
        if datatype not in SQL_TYPES or (column.shape[1:] and not is_text) or (
                not is_text and votable_field.arraysize not in (None, "1")):
            raise UploadError(f"UPLOAD {name}: column {column.name} is an array or of an "
                              "unsupported type; numbers, booleans and text are accepted")
        sql_type = ("TIMESTAMP" if is_text and votable_field.xtype == "timestamp"
                    else SQL_TYPES[datatype])
        columns.append((lower, sql_type))
    rows = [tuple(_value(table[c.name], i) for c in table.columns.values())
            for i in range(len(table))]
    return UploadedTable(name, tuple(n for n, _ in columns),
                         values_cte(cte_name(name), columns, rows), len(rows))


def _value(column, index):
    if getattr(column, "mask", None) is not None and column.mask[index]:
        return None
    value = column[index]
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
