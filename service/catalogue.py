"""The catalogue as both query blueprints (``/scs``, ``/api/v1/estimates``) see it.

:data:`CATALOGUE` is the output columns (SQL expression and the metadata declared once in
:mod:`etl.schema`); :func:`cone_filter` the positional condition (Q3C on PostgreSQL, the
declination-zone index on SQLite); :func:`current_model_version` the model whose
estimates are the catalogue; :func:`selection_conditions` the rows a range query selects
and :func:`selection_histograms` their histograms, counted by the database on the whole
selection (the plots of the search page, ``/api/v1/estimates/histograms``). One module,
as pyvo's protocols share ``dal/query.py``.
"""
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
from sqlalchemy import (ARRAY, Float, Integer, and_, bindparam, case, cast, func, literal,
                        null, select, union_all)

from etl import db as etl_db
from etl import schema
from models.labels import estimate_columns
from service.db import custom_plans

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
RANGE_COLUMNS = [*estimate_columns(), "snrg"]
"""Columns a range query bounds (``<name>_min``, ``<name>_max``)."""

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


# ---------------------------------------------------------------------------------------
# The selection of a range query
@dataclass(frozen=True)
class Filter:
    """One condition of a range query: the parameters it comes from, the catalogue column
    it constrains (None for the cone) and its SQL."""
    parameters: tuple
    column: Optional[str]
    condition: object


def catalogue_expressions(bind, cone):
    """{column name: SQL expression}, with ``distance`` from the centre of ``cone``."""
    expressions = {name: CATALOGUE[name].expression for name in CATALOGUE}
    if cone is not None:
        expressions["distance"] = etl_db.distance_deg(spectra, cone[0], cone[1], bind)
    return expressions


def selection_filters(bind, args, cone, expressions):
    """The :class:`Filter` of each constraint of the validated ``/api/v1/estimates``
    parameters ``args`` (the model version apart), on the columns of ``expressions``; a
    column's minimum and maximum make one."""
    filters = []
    if cone is not None:
        ra, dec, radius = cone
        filters.append(Filter(("ra", "dec", "radius"), None,
                              cone_filter(spectra, ra, dec, radius, bind)))
    for name in RANGE_COLUMNS:
        expression = expressions[name]
        low, high = args[f"{name}_min"], args[f"{name}_max"]
        bounds = ([(f"{name}_min", expression >= low)] if low is not None else []) + \
                 ([(f"{name}_max", expression <= high)] if high is not None else [])
        if bounds:
            filters.append(Filter(tuple(p for p, _ in bounds), name,
                                  and_(*(condition for _, condition in bounds))))
    if args["flags"] is not None:
        filters.append(Filter(("flags",), "flags", expressions["flags"] == args["flags"]))
    if args["exclude_flags"]:
        filters.append(Filter(("exclude_flags",), "flags",
                              expressions["flags"].op("&")(args["exclude_flags"]) == 0))
    return filters


def selection_conditions(bind, args, model_version, cone):
    """WHERE conditions of the rows the validated ``/api/v1/estimates`` parameters
    ``args`` select: ``model_version``'s estimates, in the ``cone`` (``(ra, dec, radius)``
    or None), within the inclusive ranges, with the flags asked for."""
    filters = selection_filters(bind, args, cone, catalogue_expressions(bind, cone))
    return [estimates.c.model_version == model_version, *(f.condition for f in filters)]


def selection_needs_spectra(args, cone) -> bool:
    """Whether the selection's conditions read ``spectra`` (a cone or an SNRg range);
    otherwise they read ``estimates`` alone and no join is needed to select."""
    return cone is not None or args["snrg_min"] is not None or args["snrg_max"] is not None


# ---------------------------------------------------------------------------------------
# Histograms of a selection, counted by the database
@dataclass(frozen=True)
class Bins:
    """``count`` equal bins from ``low`` to ``high``: bin k holds
    ``edges[k] <= x < edges[k + 1]`` and the last bin also ``x == high``, with the edges of
    ``numpy.linspace(low, high, count + 1)`` -- the bins of ``numpy.histogram(x, count,
    (low, high))``, value for value."""
    low: float
    high: float
    count: int

    @property
    def edges(self):
        return np.linspace(self.low, self.high, self.count + 1)

    def index(self, x, bind):
        """SQL: the bin of ``x``: 0 .. count - 1, -1 below ``low``, ``count`` above
        ``high``, NULL for NULL. PostgreSQL: ``width_bucket`` over the edges (a binary
        search, in C). SQLite: as numpy does, a first guess from the scaled value,
        corrected by one where rounding put it next to the bin whose edges hold ``x``
        (e.g. 5900 K scales to 57.99999... but lies on the edge of bin 58)."""
        if etl_db.is_postgres(bind):
            # the last edge nudged up: x == high falls in the last bin, as in numpy
            thresholds = [*self.edges[:-1].tolist(), float(np.nextafter(self.high, np.inf))]
            return func.width_bucket(x, bindparam(None, thresholds, ARRAY(Float))) - 1
        step = (self.high - self.low) / self.count           # numpy.linspace's step
        # only taken for low <= x <= high: scaled >= 0, so truncation is the floor
        # (SQLAlchemy replaces SQLite's floor() by Python's, called per row)
        guess = cast((x - self.low) / (self.high - self.low) * self.count, Integer)
        return case(
            (x.is_(None), None),
            (x < self.low, -1),
            (x > self.high, self.count),
            (x == self.high, self.count - 1),
            (x < guess * step + self.low, guess - 1),
            (x >= (guess + 1) * step + self.low, guess + 1),
            else_=guess)


HISTOGRAM_BINS = {
    "teff": Bins(3000.0, 8000.0, 100), "teff_err": Bins(0.0, 500.0, 50),
    "logg": Bins(-0.5, 5.5, 60), "logg_err": Bins(0.0, 1.0, 50),
    "feh": Bins(-3.0, 1.0, 80), "feh_err": Bins(0.0, 0.5, 50),
}
"""The fixed bins of the selection's histograms (``/api/v1/estimates/histograms``, the
search page's plots): 50 K, 0.1 dex and 0.05 dex wide for Teff, log g and [Fe/H], over
ranges that hold the valid domain (3500-6500 K, [Fe/H] >= -1.5) with room on either side
for the flagged estimates outside it; uncertainties from 0 (10 K, 0.02 dex, 0.01 dex).
Values outside a range are counted as below or above it; the Kiel diagram bins Teff and
log g with the same bins."""
KIEL_AXES = ("teff", "logg")
# The histograms come from three GROUP BYs, each one scan of the selection: the Kiel
# diagram's cells (summed over log g and over Teff they are the Teff and log g
# histograms), [Fe/H], and the three uncertainties together (few of the 52^3 combinations
# occur: they all grow as SNRg falls). A GROUP BY per histogram would scan six times.
HISTOGRAM_GROUPS = (KIEL_AXES, ("feh",), ("teff_err", "logg_err", "feh_err"))


@dataclass(frozen=True)
class Histogram:
    """Counts per bin of one column; ``below``/``above`` its range, ``missing`` NULL."""
    bins: Bins
    counts: np.ndarray
    below: int
    above: int
    missing: int


@dataclass(frozen=True)
class SelectionHistograms:
    """The histograms of a selection of ``rows`` estimates of ``model_version``: one per
    column of :data:`HISTOGRAM_BINS`, and the Kiel diagram's Teff x log g cells
    (``kiel_counts[i, j]``: stars in Teff bin i and log g bin j; ``kiel_mean_feh``: their
    mean [Fe/H], NaN where no star has one)."""
    model_version: str
    rows: int
    histograms: dict
    kiel_counts: np.ndarray
    kiel_mean_feh: np.ndarray


def selection_histograms(connection, args, model_version, cone) -> SelectionHistograms:
    """Histograms of every row the validated ``/api/v1/estimates`` parameters ``args``
    select (not one page of them), counted by the database in :data:`HISTOGRAM_BINS`
    (:meth:`Bins.index`): one statement, the GROUP BYs of :data:`HISTOGRAM_GROUPS`. A few
    thousand rows come back whatever the size of the selection."""
    source = (estimates.join(spectra, spectra.c.obsid == estimates.c.obsid)
              if selection_needs_spectra(args, cone) else estimates)
    conditions = selection_conditions(connection, args, model_version, cone)
    width = max(len(names) for names in HISTOGRAM_GROUPS)
    no_bin = cast(null(), Integer)
    parts = []
    for group, names in enumerate(HISTOGRAM_GROUPS):
        bins = [HISTOGRAM_BINS[name].index(CATALOGUE[name].expression, connection)
                for name in names]
        mean_feh = (func.avg(CATALOGUE["feh"].expression) if names == KIEL_AXES
                    else cast(null(), Float))
        parts.append(select(literal(group), *bins, *[no_bin] * (width - len(bins)),
                            func.count(), mean_feh)
                     .select_from(source).where(*conditions).group_by(*bins))
    with custom_plans(connection):
        counted = connection.execute(union_all(*parts)).all()

    kiel_shape = tuple(HISTOGRAM_BINS[name].count for name in KIEL_AXES)
    kiel_counts = np.zeros(kiel_shape, dtype=np.int64)
    kiel_mean_feh = np.full(kiel_shape, np.nan)
    per_bin = {name: Counter() for name in HISTOGRAM_BINS}   # bin (None: NULL) -> rows
    for group, *bins, n, mean_feh in counted:
        names = HISTOGRAM_GROUPS[group]
        for name, index in zip(names, bins):
            per_bin[name][index] += n
        if names == KIEL_AXES and all(index is not None and 0 <= index < shape
                                      for index, shape in zip(bins, kiel_shape)):
            kiel_counts[bins[0], bins[1]] = n
            kiel_mean_feh[bins[0], bins[1]] = np.nan if mean_feh is None else mean_feh
    histograms = {}
    for name, bins in HISTOGRAM_BINS.items():
        counts = per_bin[name]
        histograms[name] = Histogram(
            bins, np.array([counts[k] for k in range(bins.count)], dtype=np.int64),
            below=counts[-1], above=counts[bins.count], missing=counts[None])
    rows = sum(per_bin[KIEL_AXES[0]].values())
    return SelectionHistograms(model_version, rows, histograms, kiel_counts, kiel_mean_feh)
