"""``lamost-vac export``: the value-added catalogue of one model version as a release file.

Columns (names, types, units, UCDs and descriptions all from ``etl.schema``, the same
metadata the service uses): obsid, ra, dec, snrg, teff, teff_err, teff_err_model, logg,
logg_err, logg_err_model, feh, feh_err, feh_err_model, flags, model_version. Following
the schema, ``<label>_err`` is the integrated uncertainty (model and noise, calibrated on
held-out stars: the one to quote) and ``<label>_err_model`` the ensemble standard deviation.

Formats: ``csv`` (streamed; missing values empty), ``fits`` (binary table, streamed
chunk by chunk; TUNITn, TCOMMn = description, TUCDn = UCD; MODELVER, PREPHASH, CODEVER,
ARTSHA whole in the header) and ``votable`` (FIELD unit, ucd and DESCRIPTION; INFO elements
for the provenance; TABLEDATA streamed chunk by chunk by ``etl.votable``, the writer of
the service's VOTables). The FITS and
VOTable files pass fitsverify and STILTS votlint (tests/test_release_files.py). Only
estimates are exported; spectra that failed are in ``estimate_failures``.
"""
import csv
import itertools
import math
import os
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import func, select

from etl import schema
from etl.inference import model_row
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


def export_query(model_version):
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


def export_catalogue(engine, path, fmt, model_version=None, chunk_rows=100000):
    """Write the catalogue of ``model_version`` (default: current) to ``path``; returns
    the provenance dict (with ``rows``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with engine.connect() as connection:
        info = provenance(connection, model_version)
        query = export_query(info["model_version"])
        result = connection.execution_options(stream_results=True, yield_per=chunk_rows) \
            .execute(query)
        if fmt == "csv":
            _write_csv(path, result, chunk_rows)
        elif fmt == "fits":
            _write_fits(result, path, info, chunk_rows)
        else:
            _write_votable(result, path, info, chunk_rows)
    return info


def _write_csv(path, result, chunk_rows):
    names = [d.name for d in column_descriptions()]
    tmp = f"{path}.part"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for rows in result.partitions(chunk_rows):
            writer.writerows([["" if v is None or (isinstance(v, float) and math.isnan(v))
                               else v for v in row] for row in rows])
    os.replace(tmp, path)


def _table(partitions):
    """Chunks of query rows as one astropy Table, built into numpy columns chunk by chunk
    (a few tens of bytes per row, never the whole result as Python rows)."""
    from astropy.table import Column, MaskedColumn, Table

    descriptions = column_descriptions()
    parts = [[] for _ in descriptions]
    for rows in partitions:
        for index, values in enumerate(zip(*rows)):
            parts[index].append(_column_values(values, descriptions[index].kind))
    table = Table()
    for desc, chunks in zip(descriptions, parts):
        data, mask = (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])) \
            if chunks else _column_values((), desc.kind)
        if desc.kind == "float" or mask.any():
            column = MaskedColumn(data, name=desc.name, mask=mask)
        else:
            column = Column(data, name=desc.name)
        # Units are written verbatim from the schema (FITS TUNITn, VOTable unit) by the
        # writers: astropy cannot parse some (log(cm.s**-2)) and would warn or mangle them.
        column.description = desc.description
        if desc.ucd:
            column.meta["ucd"] = desc.ucd
        table.add_column(column)
    return table


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


def _write_fits(result, path, info, chunk_rows):
    """Stream a binary table: the header comes from the first chunk, every chunk is
    appended as big-endian records, and NAXIS2 is set to the rows written at the end."""
    from astropy.io import fits

    descriptions = column_descriptions()
    partitions = result.partitions(chunk_rows)
    first = next(partitions, [])
    hdu = fits.table_to_hdu(_table([first]))
    hdu.name = "CATALOGUE"
    header = hdu.header
    for index, desc in enumerate(descriptions, start=1):
        if desc.unit:
            header.set(f"TUNIT{index}", desc.unit, after=f"TFORM{index}")
        header[f"TCOMM{index}"] = desc.description[:68]
        if desc.ucd:
            header[f"TUCD{index}"] = desc.ucd
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
    tmp = f"{path}.part"
    rows = 0
    with open(tmp, "wb") as handle:
        handle.write(primary.header.tostring().encode("ascii"))
        header_at = handle.tell()
        handle.write(header.tostring().encode("ascii"))
        for chunk in itertools.chain([first], partitions):
            if not chunk:
                continue
            data = np.empty(len(chunk), dtype=record)
            for name, desc, values in zip(record.names, descriptions, zip(*chunk)):
                data[name] = _column_values(values, desc.kind)[0]     # NULL: NaN, 0 or ""
            handle.write(data.tobytes())
            rows += len(chunk)
        handle.write(b"\0" * (-(rows * record.itemsize) % 2880))    # FITS blocks of 2880
        header["NAXIS2"] = rows                                     # same card, same length
        handle.seek(header_at)
        handle.write(header.tostring().encode("ascii"))
    os.replace(tmp, path)


def _write_votable(result, path, info, chunk_rows):
    """TABLEDATA written chunk by chunk (constant memory, as the FITS writer), with the
    FIELD metadata of the one schema and the provenance as INFO elements."""
    from etl.votable import Info, votable_footer, votable_header, votable_rows

    columns = column_descriptions()
    provenance_infos = [Info(key, str(info[key])) for key in
                        ("model_version", "preprocessing_hash", "code_version", "artifact_sha256",
                         "exported_at")]
    tmp = f"{path}.part"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(votable_header(
            columns, table_name="catalogue", status_infos=provenance_infos,
            description="LAMOST LRS value-added catalogue: Teff, log g, [Fe/H] by LASSO-MLPNet"))
        for rows in result.partitions(chunk_rows):
            handle.write(votable_rows(rows, columns))
        handle.write(votable_footer())
    os.replace(tmp, path)
