"""Output formats of the service: VOTable, FITS, CSV and JSON.

Every format carries the column metadata declared once in :mod:`etl.schema` (unit, UCD,
description: :class:`etl.schema.ColumnDescription`), so a TOPCAT user, a FITS reader and a
JSON client see the same units and UCDs as the database documentation.

* VOTable (1.4, TABLEDATA) is written directly as text: the cone search answers in about
  a millisecond and building an ``astropy.io.votable`` tree costs about as much again.
  Its output is checked against astropy's parser, pyvo and STILTS ``votlint`` in the tests.
* FITS is written from an :class:`astropy.table.Table` (:func:`to_astropy_table`): one
  binary-table extension with TUNITn, plus the TUCDn and TCOMMn keywords that TOPCAT and
  STILTS read for UCDs and descriptions; the tests run ``fitsverify`` on it.
* CSV: one header line of column names, then the rows (null = empty field).
* JSON: ``{"columns": [metadata...], "rows": [{name: value}, ...], ...}``; NaN and
  infinities are written as null (JSON has no NaN).
"""
import csv
import datetime as _dt
import io
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence
from xml.sax.saxutils import escape, quoteattr

from flask import Response

from etl.schema import ColumnDescription

VOTABLE_MIME = "application/x-votable+xml"
FITS_MIME = "application/fits"
CSV_MIME = "text/csv"
JSON_MIME = "application/json"

FORMATS = ("json", "csv", "votable", "fits")
MIME_TYPES = {"json": JSON_MIME, "csv": CSV_MIME, "votable": VOTABLE_MIME, "fits": FITS_MIME}
EXTENSIONS = {"json": "json", "csv": "csv", "votable": "vot", "fits": "fits"}

# SCS 1.03/1.1 clients find the identifier and position by these UCD1 words; the schema
# declares the UCD1+ equivalents, translated here only for cone-search output.
UCD1_FOR_SCS = {
    "meta.id;meta.main": "ID_MAIN",
    "pos.eq.ra;meta.main": "POS_EQ_RA_MAIN",
    "pos.eq.dec;meta.main": "POS_EQ_DEC_MAIN",
}

DISTANCE_COLUMN = ColumnDescription(
    name="distance", kind="float", unit="deg", ucd="pos.angDistance",
    description="angular distance from the cone centre (great circle, ICRS)", nullable=False)

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def with_scs_ucds(columns: Sequence[ColumnDescription]) -> list:
    """The columns with their main identifier and position UCDs in SCS (UCD1) form."""
    return [replace(c, ucd=UCD1_FOR_SCS.get(c.ucd, c.ucd)) for c in columns]


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


def dumps(document) -> str:
    """JSON text of ``document`` (non-finite floats -> null; strict JSON)."""
    return json.dumps(json_value(document), allow_nan=False, separators=(",", ":"))


def json_response(document, status=200, headers=None) -> Response:
    return Response(dumps(document), status=status, mimetype=JSON_MIME, headers=headers)


def dali_timestamp(value) -> str:
    """DALI timestamp: UTC, ``YYYY-MM-DDThh:mm:ss[.SSS]`` without an offset."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        text = value.isoformat(timespec="milliseconds")
        return text[:-4] if text.endswith(".000") else text
    return value.isoformat()


def _text(value) -> str:
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


def _xml_text(value: str) -> str:
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
        return f"{indent}<INFO {attrs}>{_xml_text(info.content)}</INFO>\n"
    return f"{indent}<INFO {attrs}/>\n"


def xml_id(name: str) -> str:
    """``name`` as an XML ID (an NCName): other characters become ``_``."""
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return text if re.match(r"[A-Za-z_]", text) else "_" + text


def field_xml(column: ColumnDescription) -> str:
    attrs = [f"name={_xml_attr(column.name)}", f"ID={_xml_attr(xml_id(column.name))}",
             f'datatype="{column.votable_datatype}"']
    if column.votable_datatype in ("char", "unicodeChar"):
        attrs.append('arraysize="*"')
    if column.kind == "datetime":
        attrs.append('xtype="timestamp"')
    if column.unit:
        attrs.append(f"unit={_xml_attr(column.unit)}")
    if column.ucd:
        attrs.append(f"ucd={_xml_attr(column.ucd)}")
    description = ""
    if column.description:
        description = f"<DESCRIPTION>{_xml_text(column.description)}</DESCRIPTION>"
    return f"    <FIELD {' '.join(attrs)}>{description}</FIELD>\n"


def fields_xml(columns) -> str:
    """The FIELD elements of ``columns`` (callers cache this for a fixed column set)."""
    return "".join(field_xml(c) for c in columns)


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
        parts.append(f"    <DESCRIPTION>{_xml_text(description)}</DESCRIPTION>\n")
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
    return "" if value is None else _xml_text(_text(value))


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


def binary2_rows(rows: Iterable[Sequence], columns) -> str:
    """BINARY2 stream of ``rows``, base64 (VOTable 1.3 section 5.5): per row a null-flag
    bit mask, then each cell big-endian (long, double, boolean ``T``/``F``/``?``, char
    arrays as a byte count and UTF-8 bytes). Null numbers are written as 0 / NaN and
    flagged."""
    import base64
    import struct

    packers = []
    for column in columns:
        if column.kind == "int":
            packers.append(lambda v: struct.pack(">q", 0 if v is None else int(v)))
        elif column.kind == "float":
            packers.append(lambda v: struct.pack(">d", math.nan if v is None else float(v)))
        elif column.kind == "bool":
            packers.append(lambda v: b"?" if v is None else (b"T" if v else b"F"))
        else:
            def pack_text(v):
                data = _text(v).encode("utf-8")
                return struct.pack(">i", len(data)) + data
            packers.append(pack_text)
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


def votable_document(columns, rows, *, table_name="results", description=None, infos=(),
                     status_infos=(), post_infos=(), fields=None,
                     serialization="tabledata", resources=()) -> str:
    """A VOTable 1.4 document with one RESOURCE type="results" holding one TABLE.

    ``infos`` go under VOTABLE; ``status_infos`` in the RESOURCE before the TABLE
    (QUERY_STATUS OK); ``post_infos`` after it (the DALI overflow INFO).
    ``serialization``: ``tabledata`` or ``binary2``. ``resources``: further RESOURCE
    elements (XML text) after the results, e.g. DataLink service descriptors.
    """
    header = votable_header(columns, table_name=table_name, description=description,
                            infos=infos, status_infos=status_infos, fields=fields,
                            serialization=serialization)
    tail = [_DATA_CLOSE[serialization], "    </TABLE>\n"]
    tail.extend(_info_xml(i, "    ") for i in post_infos)
    tail.append("  </RESOURCE>\n")
    tail.extend(resources)
    tail.append("</VOTABLE>\n")
    body = (votable_rows(rows, columns) if serialization == "tabledata"
            else binary2_rows(rows, columns))
    return header + body + "".join(tail)


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


# ---------------------------------------------------------------------------------------
# CSV
def csv_document(columns, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.name for c in columns])
    for row in rows:
        writer.writerow([_text(v) for v in row])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# JSON
def columns_metadata(columns) -> list:
    return [{"name": c.name, "datatype": c.votable_datatype, "unit": c.unit, "ucd": c.ucd,
             "description": c.description} for c in columns]


def json_document(columns, rows, **extra) -> dict:
    names = [c.name for c in columns]
    document = {"columns": columns_metadata(columns),
                "rows": [dict(zip(names, row)) for row in rows]}
    document["count"] = len(document["rows"])
    document.update(extra)
    return document


# ---------------------------------------------------------------------------------------
# FITS (from an astropy Table)
def _astropy_unit(unit):
    if not unit:
        return None
    from astropy import units as u

    try:
        parsed = u.Unit(unit)
        parsed.to_string(format="fits")
        return parsed
    except (ValueError, TypeError):
        return None     # log(cm.s**-2), dex: kept as text in the FITS header only


def to_astropy_table(columns, rows, meta=None):
    """An astropy Table of ``rows`` with units and descriptions from the column metadata.

    Null integers become masked values (written as TNULL in FITS), null floats NaN, null
    text the empty string.
    """
    import numpy as np
    from astropy.table import Column, MaskedColumn, Table

    table = Table(meta=meta or {})
    rows = list(rows)
    for index, column in enumerate(columns):
        values = [row[index] for row in rows]
        unit = _astropy_unit(column.unit)
        if column.kind == "int":
            mask = np.array([v is None for v in values], dtype=bool)
            data = np.array([0 if v is None else v for v in values], dtype="i8")
            table[column.name] = MaskedColumn(data, mask=mask, unit=unit,
                                              description=column.description)
        elif column.kind == "float":
            data = np.array([np.nan if v is None else v for v in values], dtype="f8")
            table[column.name] = Column(data, unit=unit, description=column.description)
        elif column.kind == "bool":
            table[column.name] = Column(np.array([bool(v) for v in values], dtype=bool),
                                        description=column.description)
        else:
            text = [_text(v).encode("utf-8") for v in values]
            width = max([len(t) for t in text] + [1])
            table[column.name] = Column(np.array(text, dtype=f"S{width}"),
                                        description=column.description)
    return table


def fits_document(columns, rows, meta=None) -> bytes:
    """One binary-table extension; TUNITn, TUCDn, TCOMMn from the column metadata."""
    from astropy.io import fits

    hdu = fits.table_to_hdu(to_astropy_table(columns, rows, meta))
    for index, column in enumerate(columns, start=1):
        if column.unit:
            hdu.header[f"TUNIT{index}"] = column.unit
        if column.ucd:
            hdu.header[f"TUCD{index}"] = column.ucd
        if column.description:
            hdu.header[f"TCOMM{index}"] = column.description[:68]
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
def render(fmt, columns, rows, *, filename="results", json_extra=None, votable_kwargs=None,
           headers=None) -> Response:
    """A response in ``fmt`` (json, csv, votable or fits) for ``columns`` x ``rows``."""
    headers = dict(headers or {})
    if fmt == "json":
        return json_response(json_document(columns, rows, **(json_extra or {})),
                             headers=headers)
    if fmt == "csv":
        body = csv_document(columns, rows)
    elif fmt == "votable":
        body = votable_document(columns, rows, **(votable_kwargs or {}))
    elif fmt == "fits":
        body = fits_document(columns, rows)
    else:  # pragma: no cover -- formats are validated before rendering
        raise ValueError(f"unknown format {fmt!r}")
    headers.setdefault("Content-Disposition",
                       f'inline; filename="{filename}.{EXTENSIONS[fmt]}"')
    return Response(body, mimetype=MIME_TYPES[fmt], headers=headers)
