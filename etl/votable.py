"""VOTable 1.4 as text, for the columns of the one schema (:mod:`etl.schema`): the release
export (``lamost-vac export --format votable``) and every VOTable the service answers with
are written by these functions.

Written directly as text, row chunk by row chunk: a cone search answers in about a
millisecond (building an ``astropy.io.votable`` tree costs about as much again), and an
export of ten million rows streams in constant memory. The output is checked against
astropy's parser, pyvo and STILTS ``votlint`` in the tests.
"""
import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence
from xml.sax.saxutils import escape, quoteattr

from etl.schema import ColumnDescription

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass
class Info:
    """An ``INFO name=... value=...`` element (text content optional)."""
    name: str
    value: str
    content: Optional[str] = None


# ---------------------------------------------------------------------------------------
# Values
def json_value(value):
    if value is None:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def dali_timestamp(value) -> str:
    """DALI timestamp: UTC, ``YYYY-MM-DDThh:mm:ss[.SSS]`` without an offset."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        text = value.isoformat(timespec="milliseconds")
        return text[:-4] if text.endswith(".000") else text
    return value.isoformat()


def cell_text(value) -> str:
    """A cell as text (VOTable TABLEDATA, CSV); None and NaN -> empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (_dt.datetime, _dt.date)):
        return dali_timestamp(value)
    if isinstance(value, (dict, list)):
        return json.dumps(json_value(value))
    return str(value)


def xml_text(value: str) -> str:
    return escape(_INVALID_XML.sub("", value))


def _xml_attr(value: str) -> str:
    return quoteattr(_INVALID_XML.sub("", value))


# ---------------------------------------------------------------------------------------
# VOTable
VOTABLE_HEAD = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n')


def _info_xml(info: Info, indent="  ") -> str:
    attrs = f"name={_xml_attr(info.name)} value={_xml_attr(str(info.value))}"
    if info.content:
        return f"{indent}<INFO {attrs}>{xml_text(info.content)}</INFO>\n"
    return f"{indent}<INFO {attrs}/>\n"


def xml_id(name: str) -> str:
    """``name`` as an XML ID (an NCName): other characters become ``_``."""
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return text if re.match(r"[A-Za-z_]", text) else "_" + text


def field_xml(column: ColumnDescription, datatype: Optional[str] = None) -> str:
    """The FIELD of ``column``; ``datatype``: instead of the column's own (see
    :func:`row_datatypes`)."""
    datatype = datatype or column.votable_datatype
    attrs = [f"name={_xml_attr(column.name)}", f"ID={_xml_attr(xml_id(column.name))}",
             f'datatype="{datatype}"']
    if datatype in ("char", "unicodeChar"):
        attrs.append('arraysize="*"')
    if column.kind == "datetime":
        attrs.append('xtype="timestamp"')
    if column.unit:
        attrs.append(f"unit={_xml_attr(column.unit)}")
    if column.ucd:
        attrs.append(f"ucd={_xml_attr(column.ucd)}")
    description = ""
    if column.description:
        description = f"<DESCRIPTION>{xml_text(column.description)}</DESCRIPTION>"
    return f"    <FIELD {' '.join(attrs)}>{description}</FIELD>\n"


def fields_xml(columns, datatypes=None) -> str:
    """The FIELD elements of ``columns`` (callers cache this for a fixed column set);
    ``datatypes``: one per column, instead of the columns' own."""
    datatypes = datatypes or [None] * len(columns)
    return "".join(field_xml(c, d) for c, d in zip(columns, datatypes))


def _is_ascii(value) -> bool:
    """Whether :func:`cell_text` of ``value`` is ASCII (numbers, timestamps, JSON with
    its escapes and bytes as hex always are)."""
    if isinstance(value, str):
        return value.isascii()
    if value is None or isinstance(value, (int, float, _dt.date, dict, list, tuple, bytes,
                                           bytearray, memoryview)):
        return True
    return cell_text(value).isascii()


def row_datatypes(columns, rows) -> list:
    """The VOTable datatype of each column for these ``rows``: the column's own, except
    that a ``char`` column holding a non-ASCII character is declared ``unicodeChar``.
    VOTable ``char`` is ASCII: BINARY2 writes it one byte a character (astropy cannot
    decode UTF-8 there) and a parser warns about it in TABLEDATA (astropy W55), while
    ``unicodeChar`` holds any text in both serializations (UTF-16 big-endian in
    BINARY2). Both serializations declare the same, so a table reads the same in
    either."""
    datatypes = [c.votable_datatype for c in columns]
    for index, datatype in enumerate(datatypes):
        if datatype == "char" and not all(_is_ascii(row[index]) for row in rows):
            datatypes[index] = "unicodeChar"
    return datatypes


def votable_header(columns, *, table_name="results", description=None, infos=(),
                   status_infos=(), fields=None, serialization="tabledata") -> str:
    """Everything up to ``<TABLEDATA>`` (or BINARY2's ``<STREAM>``); ``fields``:
    pre-rendered :func:`fields_xml`."""
    parts = [VOTABLE_HEAD]
    parts.extend(_info_xml(i) for i in infos)
    parts.append('  <RESOURCE type="results">\n')
    parts.extend(_info_xml(i, "    ") for i in status_infos)
    parts.append(f"    <TABLE name={_xml_attr(table_name)}>\n")
    if description:
        parts.append(f"    <DESCRIPTION>{xml_text(description)}</DESCRIPTION>\n")
    parts.append(fields if fields is not None else fields_xml(columns))
    parts.append(_DATA_OPEN[serialization])
    return "".join(parts)


_DATA_OPEN = {"tabledata": "    <DATA><TABLEDATA>\n",
              "binary2": '    <DATA><BINARY2><STREAM encoding="base64">\n'}
_DATA_CLOSE = {"tabledata": "    </TABLEDATA></DATA>\n",
               "binary2": "\n    </STREAM></BINARY2></DATA>\n"}


def _td_int(value):
    return "" if value is None else str(value)


def _td_float(value):
    return repr(value) if value is not None and math.isfinite(value) else ""


def _td_text(value):
    return "" if value is None else xml_text(cell_text(value))


def _cell_formatter(column):
    if column is None:
        return _td_text
    return {"int": _td_int, "float": _td_float}.get(column.kind, _td_text)


def votable_rows(rows: Iterable[Sequence], columns=None) -> str:
    """TABLEDATA rows; one formatter per column (chosen from its kind) keeps this cheap."""
    rows = list(rows)
    if not rows:
        return ""
    formatters = ([_cell_formatter(c) for c in columns] if columns is not None
                  else [_cell_formatter(None)] * len(rows[0]))
    return "".join(
        "<TR><TD>" + "</TD><TD>".join([f(v) for f, v in zip(formatters, row)])
        + "</TD></TR>\n" for row in rows)


# BINARY2 cells by declared datatype (VOTable 1.4 section 5.4): big-endian numbers of the
# declared width, boolean as one byte, arrays ("*") as an element count and the elements.
_BINARY_NUMBERS = {"unsignedByte": ">B", "short": ">h", "int": ">i", "long": ">q",
                   "float": ">f", "double": ">d"}
_BINARY_FLOATS = ("float", "double")


def _binary2_packer(datatype):
    """A function: cell value (None for a null cell) -> its BINARY2 bytes. A null cell
    is flagged in the row's mask and its bytes are ignored by a reader, but they are
    written all the same (0, NaN, ``?``, an empty array)."""
    import struct

    if datatype in _BINARY_NUMBERS:
        pack = struct.Struct(_BINARY_NUMBERS[datatype]).pack
        if datatype in _BINARY_FLOATS:
            null = pack(math.nan)
            return lambda v: null if v is None else pack(float(v))
        null = pack(0)
        return lambda v: null if v is None else pack(int(v))
    if datatype == "boolean":
        return lambda v: b"?" if v is None else (b"T" if v else b"F")
    count = struct.Struct(">I").pack
    if datatype == "unicodeChar":
        def pack_unicode(v):
            # UTF-16 code units (a character beyond the BMP is a surrogate pair), as
            # astropy reads and writes unicodeChar.
            data = b"" if v is None else cell_text(v).encode("utf-16-be")
            return count(len(data) // 2) + data
        return pack_unicode

    def pack_char(v):
        data = b"" if v is None else cell_text(v).encode("ascii")
        return count(len(data)) + data
    return pack_char


def binary2_rows(rows: Iterable[Sequence], columns, datatypes=None) -> str:
    """BINARY2 stream of ``rows``, base64 (VOTable 1.3 section 5.5): per row a null-flag
    bit mask, then each cell as its FIELD declares it (``datatypes``, one per column;
    default the columns' own): ``unsignedByte``, ``short``, ``int``, ``long``, ``float``,
    ``double`` big-endian of their width, ``boolean`` ``T``/``F``/``?``, ``char`` and
    ``unicodeChar`` (``arraysize="*"``) as a count and ASCII bytes / UTF-16 big-endian
    code units. Null cells (None, NaN, +-Infinity) are flagged and written as 0 / NaN /
    empty."""
    import base64

    if datatypes is None:
        datatypes = [c.votable_datatype for c in columns]
    packers = [_binary2_packer(d) for d in datatypes]
    mask_bytes = (len(columns) + 7) // 8
    stream = bytearray()
    for row in rows:
        mask = bytearray(mask_bytes)
        cells = bytearray()
        for index, (pack, value) in enumerate(zip(packers, row)):
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                mask[index // 8] |= 0x80 >> (index % 8)
                value = None
            cells += pack(value)
        stream += mask + cells
    return base64.encodebytes(bytes(stream)).decode("ascii").rstrip("\n")


# TABLEDATA rows written by PostgreSQL: the same cells as votable_rows, built in SQL so
# that large answers (a release export, a wide cone) never format a value in Python.
_SQL_INVALID_XML = "[\x01-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]"   # (text never holds NUL)
_SQL_TEXT_REFERENCES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"),
                        ("\n", "&#10;"), ("\r", "&#13;"))


def sql_finite_or_null(expression):
    """SQL: NULL for NaN and +-Infinity (PostgreSQL compares NaN equal to NaN, so NULLIF
    finds it), as the Python writers leave them empty."""
    from sqlalchemy import func, literal_column

    for value in ("'NaN'", "'Infinity'", "'-Infinity'"):
        expression = func.nullif(expression, literal_column(f"{value}::float8"))
    return expression


def _sql_cell(expression, kind):
    from sqlalchemy import func

    if kind == "int":
        return expression
    if kind == "float":
        return sql_finite_or_null(expression)
    if kind == "text":
        # Quotes and line breaks become character references too (the same text to an XML
        # parser): a line then holds neither, which COPY ... (FORMAT csv) needs to write
        # it as it is.
        text = func.regexp_replace(expression, _SQL_INVALID_XML, "", "g")
        for char, reference in _SQL_TEXT_REFERENCES:
            text = func.replace(text, char, reference)
        return text
    return None


def tabledata_row_sql(cells):
    """A PostgreSQL expression whose value is one TABLEDATA row, ``<TR><TD>..</TD></TR>``
    (no line end), with the cells :func:`votable_rows` would write (NULL, NaN and
    +-Infinity empty; floats in the server's shortest exact form, e.g. ``80`` where
    Python writes ``80.0``). ``cells``: (SQL expression, :class:`ColumnDescription`)
    pairs. None when a column's kind has no SQL form here (timestamps, booleans, JSON):
    then the rows are written by :func:`votable_rows`."""
    from sqlalchemy import func, literal

    parts = []
    for index, (expression, column) in enumerate(cells):
        cell = _sql_cell(expression, column.kind)
        if cell is None:
            return None
        parts += [literal("<TR><TD>" if index == 0 else "</TD><TD>"), cell]
    return func.concat(*parts, literal("</TD></TR>"))


def votable_footer(*, post_infos=(), resources=(), serialization="tabledata") -> str:
    """Everything after the rows: closes the DATA, the TABLE (``post_infos`` after it, e.g.
    the DALI overflow INFO), the results RESOURCE (then ``resources``) and the document."""
    tail = [_DATA_CLOSE[serialization], "    </TABLE>\n"]
    tail.extend(_info_xml(i, "    ") for i in post_infos)
    tail.append("  </RESOURCE>\n")
    tail.extend(resources)
    tail.append("</VOTABLE>\n")
    return "".join(tail)


def votable_document(columns, rows, *, table_name="results", description=None, infos=(),
                     status_infos=(), post_infos=(), fields=None,
                     serialization="tabledata", resources=(), tabledata=None) -> str:
    """A VOTable 1.4 document with one RESOURCE type="results" holding one TABLE.

    ``infos`` go under VOTABLE; ``status_infos`` in the RESOURCE before the TABLE
    (QUERY_STATUS OK); ``post_infos`` after it (the DALI overflow INFO).
    ``serialization``: ``tabledata`` or ``binary2``. ``resources``: further RESOURCE
    elements (XML text) after the results, e.g. DataLink service descriptors.
    ``tabledata``: the rows as ``<TR>`` lines already written (:func:`tabledata_row_sql`),
    used instead of ``rows``. A ``char`` column whose ``rows`` hold non-ASCII text is
    declared ``unicodeChar`` (:func:`row_datatypes`), in ``fields`` too.
    """
    datatypes = None
    if tabledata is None:
        rows = list(rows)
        datatypes = row_datatypes(columns, rows)
        if datatypes != [c.votable_datatype for c in columns]:
            fields = fields_xml(columns, datatypes)     # not the callers' cached FIELDs
    header = votable_header(columns, table_name=table_name, description=description,
                            infos=infos, status_infos=status_infos, fields=fields,
                            serialization=serialization)
    if tabledata is not None:
        body = "".join(f"{line}\n" for line in tabledata)
    elif serialization == "tabledata":
        body = votable_rows(rows, columns)
    else:
        body = binary2_rows(rows, columns, datatypes)
    return header + body + votable_footer(post_infos=post_infos, resources=resources,
                                          serialization=serialization)


def votable_error(message: str, *, infos=()) -> str:
    """A DALI / SCS error document: QUERY_STATUS = ERROR with the message.

    The RESOURCE carries the DALI form; the top-level ``INFO name="Error"`` is the SCS 1.03
    form that older clients look for.
    """
    parts = [VOTABLE_HEAD, _info_xml(Info("Error", message))]
    parts.extend(_info_xml(i) for i in infos)
    parts.append('  <RESOURCE type="results">\n')
    parts.append(_info_xml(Info("QUERY_STATUS", "ERROR", message), "    "))
    parts.append("  </RESOURCE>\n</VOTABLE>\n")
    return "".join(parts)
