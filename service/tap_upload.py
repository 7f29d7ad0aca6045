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

The byte limit bounds what astropy reads only if the file's declarations are bounded
too: astropy allocates every row at a FIELD's declared ``arraysize`` (a 244-byte file
declaring ``arraysize="50000000"`` took a gigabyte), for the declared ``nrows``, and it
inflates gzip, bzip2 and xz files itself. So a compressed upload is inflated here, to at
most the byte limit, and the XML is scanned with expat (:func:`prescan`) before astropy
sees it: an ``arraysize`` of more elements than the byte limit, an ``nrows`` larger than
it, or declared row widths x rows beyond :data:`READ_MEMORY_FACTOR` times it are
refused, naming the upload and the FIELD; so is a ``STREAM href`` (astropy would read
that address: a file of the server, or a URL fetched for the client).
"""
import bz2
import gzip
import io
import lzma
import math
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional
from xml.parsers import expat

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
        tables[name.lower()] = read_votable(name, data, max_rows, max_bytes)
    return tables


# ---------------------------------------------------------------------------------------
# Before astropy: inflate within the byte limit, then check the declarations (expat).
# Bytes of memory astropy's numpy arrays take per element of a column (char and
# unicodeChar become numpy "U": 4 bytes a character).
ELEMENT_BYTES = {"boolean": 1, "bit": 1, "unsignedByte": 1, "short": 2, "int": 4,
                 "long": 8, "float": 4, "double": 8, "floatComplex": 8,
                 "doubleComplex": 16, "char": 4, "unicodeChar": 4}
# What a table's declared row width x rows may come to, in multiples of the byte limit
# (80 MB at the default 5 MB): 10,000 rows of 8 kB declared width. Beyond it a small
# file would make astropy allocate far more than the upload.
READ_MEMORY_FACTOR = 16
# One array dimension: N, N* (at most N, the last one) or * (any number, the last one).
_DIMENSION = re.compile(r"\s*(?:([0-9]+)\s*(\*?)|(\*))\s*")
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f), "gzip"),
               (b"BZh", bz2.BZ2File, "bzip2"), (b"\xfd7zXZ\x00", lzma.LZMAFile, "xz"))


def inflated(name: str, data: bytes, max_bytes: int) -> bytes:
    """``data``, decompressed if it is gzip, bzip2 or xz (astropy would inflate it itself,
    without a limit), to at most ``max_bytes``."""
    for magic, opener, label in _COMPRESSED:
        if data.startswith(magic):
            try:
                with opener(io.BytesIO(data)) as stream:
                    data = stream.read(max_bytes + 1)
            except (OSError, EOFError, lzma.LZMAError, zlib.error) as error:
                raise UploadError(f"UPLOAD {name}: not a readable VOTable ({label} data "
                                  f"that cannot be decompressed: {error})") from None
            if len(data) > max_bytes:
                raise UploadError(f"UPLOAD {name}: more than {max_bytes} bytes once "
                                  f"decompressed ({label}); the limit is {max_bytes}")
            return data
    return data


def array_elements(arraysize: str, cap: int) -> Optional[int]:
    """Elements per row of a VOTable ``arraysize`` ("10", "10*", "*", "2x3", "10x*"):
    the product of its numbers (a variable dimension counts 1: its data are in the file,
    which the byte limit bounds); anything above ``cap`` as ``cap + 1``. None when the
    text is not an array size."""
    parts = arraysize.split("x")
    elements = 1
    for index, part in enumerate(parts):
        match = _DIMENSION.fullmatch(part)
        if match is None or ((match.group(2) or match.group(3)) and index < len(parts) - 1):
            return None
        digits = match.group(1)
        if digits is not None:
            # int() of thousands of digits is refused by Python (and slow): by length first.
            number = int(digits) if len(digits) <= 18 else cap + 1
            elements = min(elements * number, cap + 1)
    return elements


@dataclass
class _TableScan:
    element_bytes: int = 0      # memory of one row (declared widths)
    nrows: int = 0
    rows: int = 0               # TR elements (TABLEDATA)
    widest: str = ""            # the FIELD of the largest width, for the message
    widest_bytes: int = 0


def prescan(name: str, data: bytes, max_bytes: int) -> None:
    """Refuse, before astropy parses ``data``, what would make it allocate far beyond
    the byte limit: a FIELD or PARAM ``arraysize`` of more than ``max_bytes`` elements,
    a TABLE ``nrows`` above ``max_bytes`` (a row takes at least a byte of the file), and
    a TABLE whose declared row width x rows would exceed :data:`READ_MEMORY_FACTOR` x
    ``max_bytes`` bytes. The scan is expat's (the parser astropy uses too), with DTD
    entity declarations refused as defusedxml does; it costs one pass over the bytes."""
    parser = expat.ParserCreate()
    tables = []
    budget = READ_MEMORY_FACTOR * max_bytes

    def refuse(message):
        raise UploadError(f"UPLOAD {name}: {message}")

    def table_done():
        scan = tables.pop()
        rows = max(scan.nrows, scan.rows, 1)
        if scan.element_bytes * rows > budget:
            refuse(f"its FIELDs declare {scan.element_bytes} bytes a row (the widest: "
                   f"{scan.widest}) for {rows} rows, more than the {budget} bytes an "
                   f"upload may take to read ({READ_MEMORY_FACTOR} x the {max_bytes}-byte "
                   "limit); declare the arraysize the values need, or '*'")

    def start(tag, attributes):
        tag = tag.rpartition(":")[2]
        if tag == "TABLE":
            tables.append(_TableScan())
            nrows = attributes.get("nrows", "").strip()
            if nrows.isascii() and nrows.isdigit():     # else astropy's own error
                tables[-1].nrows = int(nrows) if len(nrows) <= 18 else max_bytes + 1
                if tables[-1].nrows > max_bytes:
                    refuse(f"TABLE nrows={nrows[:20]} is more rows than the {max_bytes} "
                           "bytes of an upload can hold")
        elif tag in ("FIELD", "PARAM"):
            label = f"{tag} {attributes.get('name', attributes.get('ID', '?'))[:40]!r}"
            arraysize = attributes.get("arraysize")
            elements = 1
            if arraysize is not None:
                elements = array_elements(arraysize, max_bytes)
                if elements is None:
                    refuse(f"{label}: arraysize={arraysize[:40]!r} is not a VOTable array "
                           "size (e.g. 10, 10*, *, 2x3, 10x*)")
                if elements > max_bytes:
                    refuse(f"{label}: arraysize={arraysize[:40]!r} declares more than "
                           f"{max_bytes} elements, the upload byte limit; declare the size "
                           "the values need, or '*'")
            if tag == "FIELD" and tables:
                scan = tables[-1]
                width = elements * ELEMENT_BYTES.get(attributes.get("datatype"), 8)
                if arraysize is not None and arraysize.strip().endswith("*"):
                    width += 8                      # a variable array: an object a row
                if width > scan.widest_bytes:
                    scan.widest, scan.widest_bytes = label, width
                scan.element_bytes += width + 1     # + the null mask
        elif tag == "TR" and tables:
            tables[-1].rows += 1
        elif tag == "STREAM" and attributes.get("href", "").strip():
            # astropy would open the address: a file of the server, or a URL fetched for
            # the client. Data come inline (TABLEDATA, or BINARY/BINARY2 base64).
            refuse(f"a STREAM by reference (href={attributes['href'][:60]!r}) is not "
                   "accepted; put the data in the file (TABLEDATA, or BINARY/BINARY2 "
                   "with encoding=\"base64\")")

    def end(tag):
        if tag.rpartition(":")[2] == "TABLE" and tables:
            table_done()

    def entity(*_):
        refuse("DTD entity declarations are not accepted in a VOTable")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
    except expat.ExpatError as error:
        raise UploadError(f"UPLOAD {name}: not a readable VOTable (XML: {error})") from None


def read_votable(name: str, data: bytes, max_rows: int, max_bytes: int) -> UploadedTable:
    """The first table of the VOTable ``data`` as an :class:`UploadedTable`;
    ``max_bytes``: the upload byte limit the declarations are checked against."""
    from astropy.io.votable import parse_single_table

    data = inflated(name, data, max_bytes)
    prescan(name, data, max_bytes)
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
