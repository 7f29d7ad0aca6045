"""Output formats of the service: VOTable, FITS, CSV and JSON.

Every format carries the column metadata declared once in :mod:`etl.schema` (unit, UCD,
description: :class:`etl.schema.ColumnDescription`), so a TOPCAT user, a FITS reader and a
JSON client see the same units and UCDs as the database documentation.

* VOTable (1.4, TABLEDATA or BINARY2) is written directly as text by :mod:`etl.votable`,
  which the release export shares.
* FITS is written from an :class:`astropy.table.Table` (:func:`to_astropy_table`): one
  binary-table extension with TUNITn, plus the TUCDn and TCOMMn keywords that TOPCAT and
  STILTS read for UCDs and descriptions; the tests run ``fitsverify`` on it.
* CSV: one header line of column names, then the rows (null = empty field).
* JSON: ``{"columns": [metadata...], "rows": [{name: value}, ...], ...}``; NaN and
  infinities are written as null (JSON has no NaN).
"""
import csv
import io
import json
from dataclasses import replace
from typing import Sequence

from flask import Response

from etl.schema import ColumnDescription, describe_fits_columns
# The VOTable writer is shared with the release export (etl/votable.py); the service's
# modules use it, and XML escaping, as ``formats.<name>``.
from etl.votable import (Info, cell_text, fields_xml, json_value, votable_document,  # noqa: F401
                         votable_error, xml_id)
from xml.sax.saxutils import escape  # noqa: F401

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


def with_scs_ucds(columns: Sequence[ColumnDescription]) -> list:
    """The columns with their main identifier and position UCDs in SCS (UCD1) form."""
    return [replace(c, ucd=UCD1_FOR_SCS.get(c.ucd, c.ucd)) for c in columns]


# ---------------------------------------------------------------------------------------
# JSON
def dumps(document) -> str:
    """JSON text of ``document`` (non-finite floats -> null; strict JSON)."""
    return json.dumps(json_value(document), allow_nan=False, separators=(",", ":"))


def json_response(document, status=200, headers=None) -> Response:
    return Response(dumps(document), status=status, mimetype=JSON_MIME, headers=headers)


# ---------------------------------------------------------------------------------------
# CSV
def csv_document(columns, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.name for c in columns])
    for row in rows:
        writer.writerow([cell_text(v) for v in row])
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
            text = [cell_text(v).encode("utf-8") for v in values]
            width = max([len(t) for t in text] + [1])
            table[column.name] = Column(np.array(text, dtype=f"S{width}"),
                                        description=column.description)
    return table


# A TTYPE value on one card: 68 characters, less the doubling of quotes.
FITS_NAME_MAX = 68


def _fits_name_char(char: str) -> str:
    """``char`` in a FITS column name: ASCII letters, digits and ``_`` as they are; an
    accented letter as its base letter(s) (é -> e, ﬁ -> fi); any other non-ASCII or
    control character as ``_u`` and its code point in hex (``_u6e29``)."""
    import unicodedata

    if char.isascii() and (char.isalnum() or char == "_"):
        return char
    if char.isascii() and char.isprintable():
        return char                    # ASCII punctuation and spaces are allowed in FITS
    base = "".join(c for c in unicodedata.normalize("NFKD", char)
                   if c.isascii() and (c.isalnum() or c == "_"))
    return base or f"_u{ord(char):04x}"


def fits_column_names(names) -> list:
    """TTYPE values for column ``names``: printable ASCII that fits on one card, unique
    (case-insensitively, as FITS readers match names).

    A TAP alias may be any text (``SELECT obsid AS "é"``) while a FITS header holds
    printable ASCII only: astropy refuses anything else. Answering 400 would deny a TOPCAT
    user a table they can have; a name close to theirs (é -> e, 温 -> _u6e29; letters,
    digits and _ are also what TOPCAT expressions can use as they are) keeps the columns
    recognisable, and the VOTable answer keeps the exact names. Names that need no change
    keep theirs; a changed name that meets another gets _2, _3, ... as in the VOTable
    FIELDs."""
    def fits(text):
        return len(text) + text.count("'") <= FITS_NAME_MAX

    names = list(names)
    made = ["".join(_fits_name_char(c) for c in name) or "col" for name in names]
    kept = [m == n and fits(n) for m, n in zip(made, names)]
    seen = {n.lower() for n, k in zip(names, kept) if k}
    out = []
    for name, text, keep in zip(names, made, kept):
        if keep:
            out.append(name)
            continue
        unique, number, suffix = text, 1, ""
        while not fits(unique) or unique.lower() in seen:
            if unique.lower() in seen:
                number += 1
                suffix = f"_{number}"
            text = text if fits(text + suffix) else text[:-1]
            unique = text + suffix
        seen.add(unique.lower())
        out.append(unique)
    return out


def fits_document(columns, rows, meta=None) -> bytes:
    """One binary-table extension; TUNITn, TUCDn, TCOMMn from the column metadata; column
    names as :func:`fits_column_names` makes them."""
    from astropy.io import fits

    columns = [replace(c, name=n) if n != c.name else c
               for c, n in zip(columns, fits_column_names(c.name for c in columns))]
    hdu = fits.table_to_hdu(to_astropy_table(columns, rows, meta))
    describe_fits_columns(hdu.header, columns)
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
