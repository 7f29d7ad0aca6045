"""The catalogue as both query blueprints (``/scs``, ``/api/v1/estimates``) see it.

:data:`CATALOGUE` is the output columns (SQL expression and the metadata declared once in
:mod:`etl.schema`); :func:`cone_filter` the positional condition (Q3C on PostgreSQL, the
declination-zone index on SQLite); :func:`current_model_version` the model whose
estimates are the catalogue. One module, as pyvo's protocols share ``dal/query.py``.
"""
from dataclasses import dataclass

from sqlalchemy import and_, select

from etl import db as etl_db
from etl import schema
from models.labels import estimate_columns

spectra = schema.spectra
estimates = schema.estimates
models = schema.models


def _column(table, name):
    for column in table.columns:
        if column.name == name:
            return column
    raise KeyError(name)


@dataclass(frozen=True)
class CatalogueColumn:
    name: str
    expression: object
    description: schema.ColumnDescription


def _catalogue():
    sources = [
        (spectra, ["obsid", "designation", "ra", "dec", "snrg"]),
        (estimates, ["model_version", *estimate_columns(), "flags"]),
        (spectra, ["snru", "snrr", "snri", "snrz", "lmjd", "mjd", "planid", "spid", "fiberid",
                   "class", "subclass", "z", "z_err"]),
        (estimates, ["code_version", "preprocessing_hash", "run_id", "created_at"]),
    ]
    out = {}
    for table, names in sources:
        for name in names:
            column = _column(table, name)
            out[name] = CatalogueColumn(name, column, schema.describe_column(column))
    return out


CATALOGUE = _catalogue()
"""Output columns of the catalogue (current model's estimates joined to spectra)."""

MIN_INDEX_RADIUS_DEG = 1e-9     # 3.6 micro-arcsec; below it Q3C's arithmetic underflows
COORDINATE_DECIMALS = 12        # 3.6 nano-arcsec: positions are rounded to this


def cone_centre(ra, dec):
    """(ra, dec) normalised: RA in [0, 360), both rounded to 1e-12 deg (no float underflow
    in the database's trigonometry for denormal inputs)."""
    ra = round(ra % 360.0, COORDINATE_DECIMALS) % 360.0
    return ra, round(dec, COORDINATE_DECIMALS)


def cone_filter(table, ra, dec, radius, bind):
    """Exact cone condition; radii too small for the index get an exact distance test."""
    if radius >= MIN_INDEX_RADIUS_DEG:
        return etl_db.cone_condition(table, ra, dec, radius, bind)
    return and_(etl_db.cone_condition(table, ra, dec, MIN_INDEX_RADIUS_DEG, bind),
                etl_db.distance_deg(table, ra, dec, bind) <= radius)


def current_model_version():
    """SQL scalar subquery: the current model version."""
    return select(models.c.version).where(models.c.status == "current").scalar_subquery()
