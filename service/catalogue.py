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
from sqlalchemy import (Float, Integer, and_, cast, false, func, literal, null, or_, select,
                        union_all)

from etl import db as etl_db
from etl import schema
from etl.histogram_cells import (CELL_AXES, CELL_HISTOGRAMS, CELL_WIDTH, CELLS, HISTOGRAM_BINS,
                                 KIEL_AXES, MISSING_BIN, Bins, Cell)
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
# The scan counts three GROUP BYs, each one pass over the selection: the Kiel diagram's
# cells (summed over log g and over Teff they are the Teff and log g histograms), [Fe/H],
# and the three uncertainties together (few of the 52^3 combinations occur: they all grow
# as SNRg falls). A GROUP BY per histogram would scan six times.
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


class _Tally:
    """Counts per bin of every histogram, added up from the cells and the scan."""

    def __init__(self):
        self.per_bin = {name: Counter() for name in HISTOGRAM_BINS}  # bin (None: NULL) -> n
        shape = tuple(HISTOGRAM_BINS[name].count for name in KIEL_AXES)
        self.kiel_counts = np.zeros(shape, dtype=np.int64)
        self.kiel_feh_n = np.zeros(shape, dtype=np.int64)
        self.kiel_feh_sum = np.zeros(shape)

    def add(self, names, bins, n, feh_n=0, feh_sum=0.0):
        bins = [None if index == MISSING_BIN else index for index in bins]
        for name, index in zip(names, bins):
            self.per_bin[name][index] += n
        if names == KIEL_AXES and all(index is not None and 0 <= index < shape
                                      for index, shape in zip(bins, self.kiel_counts.shape)):
            self.kiel_counts[bins[0], bins[1]] += n
            self.kiel_feh_n[bins[0], bins[1]] += feh_n
            self.kiel_feh_sum[bins[0], bins[1]] += feh_sum or 0.0

    def result(self, model_version) -> SelectionHistograms:
        histograms = {}
        for name, bins in HISTOGRAM_BINS.items():
            counts = self.per_bin[name]
            histograms[name] = Histogram(
                bins, np.array([counts[k] for k in range(bins.count)], dtype=np.int64),
                below=counts[-1], above=counts[bins.count], missing=counts[None])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_feh = np.where(self.kiel_feh_n > 0, self.kiel_feh_sum / self.kiel_feh_n,
                                np.nan)
        rows = sum(self.per_bin[KIEL_AXES[0]].values())
        return SelectionHistograms(model_version, rows, histograms, self.kiel_counts,
                                   mean_feh)


def _bounded_ranges(args) -> set:
    """The range columns of ``args`` with a lower or an upper bound."""
    return {name for name in RANGE_COLUMNS
            if args[f"{name}_min"] is not None or args[f"{name}_max"] is not None}


def _counted_by_cells(args, cone) -> bool:
    """Whether ``estimate_cells`` can count the selection: flags and ranges of Teff, log g
    and [Fe/H] only (no cone, no SNRg or uncertainty range)."""
    return cone is None and _bounded_ranges(args) <= set(CELL_AXES)


def _cells_wholly_inside(args, cone):
    """{axis: (first, last) cell} of the label ranges of ``args`` (the cells of
    ``estimate_cells`` that lie wholly inside the selection; every cell of an unbounded
    axis), or None when the cells cannot serve the selection: a cone, an SNRg or an
    uncertainty range, or a range that holds no whole cell."""
    if not _counted_by_cells(args, cone):
        return None
    inside = {name: CELLS[name].inside(args[f"{name}_min"], args[f"{name}_max"])
              for name in CELL_AXES}
    return None if any(span is None for span in inside.values()) else inside


def _flag_conditions(cells, args):
    conditions = []
    if args["flags"] is not None:
        conditions.append(cells.flags == args["flags"])
    if args["exclude_flags"]:
        conditions.append(cells.flags.op("&")(args["exclude_flags"]) == 0)
    return conditions


def selection_rows_at_most(connection, args, model_version, cone=None) -> Optional[int]:
    """An upper bound of the rows the selection holds, counted in ``estimate_cells``
    (None when the cells cannot count it: :func:`_counted_by_cells`): the smaller of the
    rows of the Kiel diagram's Teff and log g bins and the [Fe/H] cells that overlap the
    ranges, and of the rows of the [Fe/H] bins and the Teff and log g cells that do. Unlike
    the planner, which takes ranges on two labels as independent, it knows how the labels
    go together (to a cell), and it counts flags exactly."""
    if not _counted_by_cells(args, cone):
        return None
    cells = schema.estimate_cells.c

    def overlap(column, name, width):
        span = Cell(HISTOGRAM_BINS[name], width).overlapping(args[f"{name}_min"],
                                                              args[f"{name}_max"])
        return false() if span is None else column.between(*span)

    kiel, feh = CELL_HISTOGRAMS.index(KIEL_AXES), CELL_HISTOGRAMS.index(("feh",))
    parts = [and_(cells.histogram == kiel, overlap(cells.bin1, "teff", 1),
                  overlap(cells.bin2, "logg", 1), overlap(cells.feh_cell, "feh", CELL_WIDTH)),
             and_(cells.histogram == feh, overlap(cells.bin1, "feh", 1),
                  overlap(cells.teff_cell, "teff", CELL_WIDTH),
                  overlap(cells.logg_cell, "logg", CELL_WIDTH))]
    # With label ranges, each part's ranges also in WHERE: the primary key's index then skips
    # the cells outside them (a bitmap of the two parts) where the FILTERs alone read all
    # ~100,000 cells of the version (logg>=4.5 feh>=0.3: 19 ms instead of 27-33 on the DR8-size
    # catalogue). Without, the ranges would only slow the index scans down (flags alone: 34 ms
    # instead of 21).
    by_kiel, by_feh = connection.execute(
        select(*(func.coalesce(func.sum(cells.n).filter(part), 0) for part in parts))
        .where(cells.model_version == model_version,
               or_(*parts) if _bounded_ranges(args) else cells.histogram.in_([kiel, feh]),
               *_flag_conditions(cells, args))).one()
    return int(min(by_kiel, by_feh))


def _slabs(inside, args):
    """SQL: the rows of the selection outside the cells wholly inside it (those in the
    cells its bounds cut), or None when there are none."""
    parts = []
    for name, (first, last) in inside.items():
        low, high = args[f"{name}_min"], args[f"{name}_max"]
        value = CATALOGUE[name].expression
        start, _, _ = CELLS[name].span(first)
        _, end, end_included = CELLS[name].span(last)
        if low is not None and start > low:
            parts.append(value < start)
        if high is not None and (end < high or (end == high and not end_included)):
            parts.append(value > end if end_included else value >= end)
    return or_(*parts) if parts else None


def _counted_cells(connection, args, model_version, inside):
    """Rows (histogram, bin1, bin2, n, feh_n, feh_sum) of the cells ``inside``."""
    cells = schema.estimate_cells.c
    conditions = [cells.model_version == model_version,
                  *(cells[f"{name}_cell"].between(first, last)
                    for name, (first, last) in inside.items()),
                  *_flag_conditions(cells, args)]
    return connection.execute(
        select(cells.histogram, cells.bin1, cells.bin2, func.sum(cells.n),
               func.sum(cells.feh_n), func.sum(cells.feh_sum))
        .where(*conditions).group_by(cells.histogram, cells.bin1, cells.bin2)).all()


def _scanned(connection, args, model_version, cone, only):
    """Rows (group, bins..., n, feh_n, feh_sum) of :data:`HISTOGRAM_GROUPS` counted over
    the selected estimates (those matching ``only`` too, if given)."""
    postgres = etl_db.is_postgres(connection)
    source = (estimates.join(spectra, spectra.c.obsid == estimates.c.obsid)
              if selection_needs_spectra(args, cone) else estimates)
    conditions = selection_conditions(connection, args, model_version, cone)
    if only is not None:
        conditions.append(only)
    width = max(len(names) for names in HISTOGRAM_GROUPS)
    no_bin, feh = cast(null(), Integer), CATALOGUE["feh"].expression
    parts = []
    for group, names in enumerate(HISTOGRAM_GROUPS):
        bins = [HISTOGRAM_BINS[name].index(CATALOGUE[name].expression, postgres)
                for name in names]
        kiel = names == KIEL_AXES
        parts.append(select(literal(group), *bins, *[no_bin] * (width - len(bins)),
                            func.count(), func.count(feh) if kiel else no_bin,
                            func.sum(feh) if kiel else cast(null(), Float))
                     .select_from(source).where(*conditions).group_by(*bins))
    with custom_plans(connection):
        return connection.execute(union_all(*parts)).all()


def selection_histograms(connection, args, model_version, cone) -> SelectionHistograms:
    """Histograms of every row the validated ``/api/v1/estimates`` parameters ``args``
    select (not one page of them), in :data:`HISTOGRAM_BINS` (:meth:`Bins.index`). A
    selection by flags and Teff, log g and [Fe/H] ranges adds up the cells of
    ``estimate_cells`` that lie wholly inside it and scans only the rows in the cells its
    bounds cut (none when the bounds are cell edges: 250 K, 0.5 dex, 0.25 dex); any other
    selection is scanned, with the GROUP BYs of :data:`HISTOGRAM_GROUPS` in one statement.
    A few thousand rows come back whatever the size of the selection."""
    tally = _Tally()
    inside = _cells_wholly_inside(args, cone)
    if inside is not None:
        for histogram, bin1, bin2, n, feh_n, feh_sum in _counted_cells(
                connection, args, model_version, inside):
            names = CELL_HISTOGRAMS[histogram]
            tally.add(names, (bin1, bin2)[:len(names)], int(n), int(feh_n), feh_sum)
        only = _slabs(inside, args)
        if only is None:
            return tally.result(model_version)
    else:
        only = None
    for group, *bins, n, feh_n, feh_sum in _scanned(connection, args, model_version, cone,
                                                     only):
        names = HISTOGRAM_GROUPS[group]
        tally.add(names, bins[:len(names)], n, feh_n or 0, feh_sum)
    return tally.result(model_version)
