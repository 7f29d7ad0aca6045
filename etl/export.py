"""``lamost-vac export``: the value-added catalogue of one model version as a release file.

Columns (names, types, units, UCDs and descriptions all from ``etl.schema``, the same
metadata the service uses): obsid, ra, dec, snrg, teff, teff_err, teff_err_model, logg,
logg_err, logg_err_model, feh, feh_err, feh_err_model, flags, model_version. Following
the schema, ``<label>_err`` is the integrated uncertainty (model and noise, calibrated on
held-out stars: the one to quote) and ``<label>_err_model`` the ensemble standard deviation.

Formats: ``csv`` (missing and non-finite values empty), ``fits`` (binary table, streamed
chunk by chunk; TUNITn, TCOMMn = description, TUCDn = UCD; MODELVER, PREPHASH, CODEVER,
ARTSHA whole in the header) and ``votable`` (TABLEDATA; FIELD unit, ucd and DESCRIPTION
from ``etl.votable``, the writer of the service's VOTables; INFO elements for the
provenance). Every format streams in constant memory. The FITS and VOTable files pass
fitsverify and STILTS votlint (tests/test_release_files.py). Only estimates are
exported; spectra that failed are in ``estimate_failures``.

Two ways to read the rows, one file format each way:

* On PostgreSQL the server writes the rows through ``COPY ... TO STDOUT``: CSV and the
  VOTable's ``<TR>`` lines as text, the FITS columns as binary COPY records that numpy
  reads whole chunks at a time. Python never touches a single value, which is what makes
  a ten-million-row export take minutes, not an hour (bench/scale.py).
* Elsewhere (the embedded SQLite catalogue) the rows come through SQLAlchemy, chunk by
  chunk, and Python formats them. tests/test_release_files.py checks that both give the
  same table.
"""
import csv
import itertools
import os
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import BigInteger, cast, func, literal_column, select

from etl import db, schema
from etl.inference import model_row
from etl.votable import (Info, cell_text, sql_finite_or_null, tabledata_row_sql,
                         votable_footer, votable_header, votable_rows)
from models.labels import estimate_columns

S, E = schema.spectra, schema.estimates
EXPORT_COLUMNS = [
    ("obsid", E), ("ra", S), ("dec", S), ("snrg", S),
    *((name, E) for name in estimate_columns()),
    ("flags", E), ("model_version", E),
]
FORMATS = ("csv", "fits", "votable")


def column_descriptions():
    return schema.describe_columns(
        "estimates", [f"{table.name}.{name}" for name, table in EXPORT_COLUMNS])


def export_query(model_version, columns=None):
    """The rows of ``model_version`` in obsid order; ``columns`` (default: the table
    columns of EXPORT_COLUMNS) are SQL expressions, e.g. the COPY writers' formatted ones."""
    if columns is None:
        columns = [table.c[name] for name, table in EXPORT_COLUMNS]
    return (select(*columns).select_from(E.join(S, S.c.obsid == E.c.obsid))
            .where(E.c.model_version == model_version).order_by(E.c.obsid))


def provenance(connection, model_version):
    """Model row plus the distinct code versions / preprocessing hashes of its estimates."""
    model = model_row(connection, model_version)
    model_version = model["version"]
    hashes = sorted(r[0] for r in connection.execute(
        select(E.c.preprocessing_hash).where(E.c.model_version == model_version).distinct()))
    codes = sorted(r[0] for r in connection.execute(
        select(E.c.code_version).where(E.c.model_version == model_version).distinct()))
    count = connection.execute(select(func.count()).select_from(E)
                               .where(E.c.model_version == model_version)).scalar_one()
    return {"model_version": model["version"], "model_status": model["status"],
            "artifact_sha256": model["artifact_sha256"], "preprocessing_hash": ",".join(hashes),
            "code_version": ",".join(codes), "rows": count,
            "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def export_catalogue(engine, path, fmt, model_version=None, chunk_rows=100000, use_copy=None):
    """Write the catalogue of ``model_version`` (default: current) to ``path``; returns
    the provenance dict (with ``rows``). ``use_copy`` (default: on PostgreSQL) lets the
    server format the rows (module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if use_copy is None:
        use_copy = db.is_postgres(engine)
    # The file is written beside the target and renamed over it, so that a reader never
    # sees half a catalogue: that would replace a device or a pipe (/dev/stdout) by a file.
    if os.path.exists(path) and not os.path.isfile(path):
        raise ExportTargetError(f"{path} exists and is not a regular file: the export writes "
                                f"a new file and renames it into place; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.part"
    try:
        with engine.connect() as connection:
            info = provenance(connection, model_version)
            if use_copy:
                if fmt == "fits":
                    _copy_fits(connection, tmp, info, chunk_rows)
                else:
                    {"csv": _copy_csv, "votable": _copy_votable}[fmt](connection, tmp, info)
            else:
                result = connection.execution_options(stream_results=True, yield_per=chunk_rows) \
                    .execute(export_query(info["model_version"]))
                partitions = result.partitions(chunk_rows)
                if fmt == "csv":
                    _write_csv(tmp, partitions)
                elif fmt == "fits":
                    _write_fits(tmp, info, (_row_columns(rows) for rows in partitions))
                else:
                    _write_votable(tmp, info, (votable_rows(rows, column_descriptions())
                                               for rows in partitions))
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)          # no half-written file left behind
        raise
    return info


class ExportTargetError(ValueError):
    """The export cannot write to the path it was given."""


# ---------------------------------------------------------------------------------------
# The file formats: each writer takes chunks (of rows, columns or text)
def _csv_header():
    return ",".join(d.name for d in column_descriptions()) + "\n"


def _write_csv(path, partitions):
    with open(path, "w", newline="") as handle:
        handle.write(_csv_header())
        writer = csv.writer(handle, lineterminator="\n")
        for rows in partitions:
            writer.writerows([[cell_text(v) for v in row] for row in rows])


def _write_votable(path, info, row_texts):
    """TABLEDATA: the FIELD metadata of the one schema, the provenance as INFO elements,
    then the ``<TR>`` lines chunk by chunk."""
    provenance_infos = [Info(key, str(info[key])) for key in
                        ("model_version", "preprocessing_hash", "code_version", "artifact_sha256",
                         "exported_at")]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(votable_header(
            column_descriptions(), table_name="catalogue", status_infos=provenance_infos,
            description="LAMOST LRS value-added catalogue: Teff, log g, [Fe/H] by LASSO-MLPNet"))
        for text in row_texts:
            handle.write(text)
        handle.write(votable_footer())


def _column_values(values, kind):
    """(data, mask) arrays for one chunk of one column; NULL (and NaN) are masked."""
    if kind in ("int", "float"):
        data = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        mask = ~np.isfinite(data)
        if kind == "int":
            data = np.where(mask, 0, data).astype(np.int64)
        return data, mask
    return (np.array(["" if v is None else str(v) for v in values], dtype=str),
            np.array([v is None for v in values], dtype=bool))


def _row_columns(rows):
    """One chunk of query rows as {column name: (data, mask)}."""
    descriptions = column_descriptions()
    values = list(zip(*rows)) if rows else [()] * len(descriptions)
    return {d.name: _column_values(v, d.kind) for d, v in zip(descriptions, values)}


def _table(columns):
    """The astropy Table of one chunk of columns ({name: (data, mask)}), with the schema's
    descriptions and UCDs: the FITS writer takes its header from it."""
    from astropy.table import Column, MaskedColumn, Table

    table = Table()
    for desc in column_descriptions():
        data, mask = columns[desc.name]
        if desc.kind == "float" or mask.any():
            column = MaskedColumn(data, name=desc.name, mask=mask)
        else:
            column = Column(data, name=desc.name)
        # Units are written verbatim from the schema (FITS TUNITn) by the writer: astropy
        # cannot parse some (log(cm.s**-2)) and would warn or mangle them.
        column.description = desc.description
        if desc.ucd:
            column.meta["ucd"] = desc.ucd
        table.add_column(column)
    return table


def _write_fits(path, info, column_chunks):
    """Stream a binary table: the header comes from the first chunk, every chunk is
    appended as big-endian records, and NAXIS2 is set to the rows written at the end."""
    from astropy.io import fits

    descriptions = column_descriptions()
    first = next(column_chunks, None) or _row_columns([])
    hdu = fits.table_to_hdu(_table(first))
    hdu.name = "CATALOGUE"
    header = hdu.header
    schema.describe_fits_columns(header, descriptions)
    header["MODELVER"] = (info["model_version"], "LASSO-MLPNet model version")
    # Provenance is written whole: astropy continues a string longer than one card on
    # CONTINUE cards. A SHA-256 leaves no room for a comment on its card (astropy would
    # cut the comment with a warning), so the hashes have none: PREPHASH is the
    # preprocessing configuration hash(es), ARTSHA the SHA-256 of the model artifact.
    header["PREPHASH"] = info["preprocessing_hash"]
    header["CODEVER"] = (info["code_version"], "lamost-vac version of the estimates")
    header["ARTSHA"] = info["artifact_sha256"]
    # fitsverify asks for this declaration wherever CONTINUE cards may appear.
    header["LONGSTRN"] = ("OGIP 1.0", "The OGIP long string convention may be used")
    # FITS dates are UTC without a zone designator (fitsverify refuses a trailing "Z").
    header["DATE"] = (info["exported_at"].removesuffix("Z"), "export time (UTC)")
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = "lamost-vac"
    primary.header["COMMENT"] = ("LAMOST LRS value-added catalogue: Teff, log g, [Fe/H] by "
                                 "LASSO-MLPNet")
    record = np.dtype([(name, hdu.data.dtype[name].newbyteorder(">")
                        if hdu.data.dtype[name].kind in "iuf" else hdu.data.dtype[name])
                       for name in hdu.data.dtype.names])
    rows = 0
    with open(path, "wb") as handle:
        handle.write(primary.header.tostring().encode("ascii"))
        header_at = handle.tell()
        handle.write(header.tostring().encode("ascii"))
        for columns in itertools.chain([first], column_chunks):
            count = len(columns[descriptions[0].name][0])
            data = np.empty(count, dtype=record)
            for name in record.names:
                values, mask = columns[name]
                if values.dtype.kind == "f":                # NULL, NaN and +-inf: NaN
                    values = np.where(mask, np.nan, values)
                data[name] = values                             # NULL int: 0, text: ""
            handle.write(data.tobytes())
            rows += count
        handle.write(b"\0" * (-(rows * record.itemsize) % 2880))    # FITS blocks of 2880
        header["NAXIS2"] = rows                                     # same card, same length
        handle.seek(header_at)
        handle.write(header.tostring().encode("ascii"))


# ---------------------------------------------------------------------------------------
# PostgreSQL: the server formats the rows (COPY ... TO STDOUT)
NAN = literal_column("'NaN'::float8")


def _copy(connection, query, options):
    """The data blocks of ``COPY (query) TO STDOUT (options)``; the query's parameters are
    bound by psycopg (COPY takes no server-side parameters)."""
    compiled = query.compile(dialect=connection.dialect)
    raw = connection.connection.driver_connection
    with raw.cursor() as cursor:
        with cursor.copy(f"COPY ({compiled.string}) TO STDOUT ({options})",
                         compiled.params) as copy:
            yield from copy


def _formatted_columns():
    """Each export column as the SQL expression whose text is the cell."""
    return [sql_finite_or_null(table.c[name]) if desc.kind == "float" else table.c[name]
            for (name, table), desc in zip(EXPORT_COLUMNS, column_descriptions())]


def _copy_csv(connection, path, info):
    # PostgreSQL writes float8 with the shortest text that reads back exactly
    # (extra_float_digits 1, PostgreSQL >= 12), as Python's repr does.
    with open(path, "wb") as handle:
        handle.write(_csv_header().encode("utf-8"))
        query = export_query(info["model_version"], _formatted_columns())
        for block in _copy(connection, query, "FORMAT csv"):
            handle.write(block)


def _copy_votable(connection, path, info):
    """Each row is one ``<TR>`` line written by the server (etl.votable.tabledata_row_sql)."""
    line = tabledata_row_sql(list(zip(
        [table.c[name] for name, table in EXPORT_COLUMNS], column_descriptions())))
    # CSV with one column: PostgreSQL writes a line as it is unless it holds the quote,
    # the delimiter, CR or LF, which tabledata_row_sql never leaves (the delimiter is
    # \x01, which XML does not allow; text COPY would double every backslash instead).
    blocks = _copy(connection, export_query(info["model_version"], [line]),
                   "FORMAT csv, DELIMITER E'\\x01'")
    _write_votable(path, info, (bytes(block).decode("utf-8") for block in blocks))


def _copy_fits(connection, path, info, chunk_rows):
    """Binary COPY records with a fixed layout (every cell 8 bytes, never NULL: NULL
    floats come as NaN), read by numpy a chunk at a time."""
    descriptions = column_descriptions()
    numeric = [(name, table, desc) for (name, table), desc in zip(EXPORT_COLUMNS, descriptions)
               if desc.kind in ("int", "float")]
    for name, _, desc in numeric:
        if desc.kind == "int" and desc.nullable:
            raise NotImplementedError(f"COPY FITS export of nullable integer column {name}")
    expressions = [cast(table.c[name], BigInteger) if desc.kind == "int"
                   else func.coalesce(table.c[name], NAN) for name, table, desc in numeric]
    record = np.dtype([("fields", ">i2")] + [
        field for name, _, desc in numeric
        for field in ((f"{name}__length", ">i4"), (name, ">i8" if desc.kind == "int" else ">f8"))])
    blocks = _copy(connection, export_query(info["model_version"], expressions),
                   "FORMAT binary")

    def column_chunks():
        for records in binary_copy_records(blocks, record, chunk_rows):
            if (records["fields"] != len(numeric)).any() or any(
                    (records[f"{name}__length"] != 8).any() for name, _, _ in numeric):
                raise RuntimeError("unexpected record layout in the binary COPY stream")
            columns = {}
            for desc in descriptions:
                if desc.kind == "int":
                    data = records[desc.name]
                    columns[desc.name] = (data, np.zeros(len(data), bool))
                elif desc.kind == "float":
                    data = records[desc.name]
                    columns[desc.name] = (data, ~np.isfinite(data))
                else:                                   # the constant model version
                    columns[desc.name] = (np.full(len(records), str(info[desc.name])),
                                          np.zeros(len(records), bool))
            yield columns

    _write_fits(path, info, column_chunks())


PGCOPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def binary_copy_records(blocks, record, chunk_rows):
    """Structured arrays of ``record`` (one field per COPY tuple field, each with its
    length word) from the blocks of a binary COPY stream whose tuples all have that
    fixed layout, ``chunk_rows`` at a time (the last chunk may be shorter)."""
    buffer = bytearray()
    header = None                                      # bytes of header still to skip
    for block in blocks:
        buffer += block
        if header is None:
            if len(buffer) < 19:
                continue
            if bytes(buffer[:11]) != PGCOPY_SIGNATURE:
                raise RuntimeError("not a binary COPY stream")
            header = 19 + int.from_bytes(buffer[15:19], "big")
        if header:
            if len(buffer) < header:
                continue
            del buffer[:header]
            header = 0
        if len(buffer) >= chunk_rows * record.itemsize:
            count = len(buffer) // record.itemsize
            yield np.frombuffer(bytes(buffer[:count * record.itemsize]), dtype=record)
            del buffer[:count * record.itemsize]
    if not buffer.endswith(b"\xff\xff"):
        raise RuntimeError("binary COPY stream ended without its trailer")
    count = (len(buffer) - 2) // record.itemsize
    if count * record.itemsize != len(buffer) - 2:
        raise RuntimeError("binary COPY stream ended inside a tuple")
    if count:
        yield np.frombuffer(bytes(buffer[:-2]), dtype=record)
