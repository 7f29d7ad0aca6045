"""The histogram bins of the labels, and the counts of them the database keeps per cell.

:data:`HISTOGRAM_BINS` are the fixed bins of ``/api/v1/estimates/histograms`` and of the
search page's plots. Counting them by scanning a selection costs ~0.7 s per million
estimates (7.4 s for a model version of 10 M at DR8 size, bench/scale.py), so the
database also keeps them counted, per model version, in ``estimate_cells``: the rows of
a version are split into *cells* -- a flags value and a box of :data:`CELL_WIDTH` x
:data:`CELL_WIDTH` x :data:`CELL_WIDTH` bins of Teff, log g and [Fe/H] (250 K x 0.5 dex
x 0.25 dex) -- and each cell holds the five histograms of its rows: the Kiel diagram's
Teff x log g bins (with the sum of [Fe/H] for its mean), [Fe/H], and the three
uncertainties. A selection by flags and label ranges is then the sum of the cells that lie
wholly inside it plus a scan of the rows in the cells its bounds cut
(:func:`service.catalogue.selection_histograms`). Cells, not single bins, because the
boxes are what keep the table small: keyed by single (flags, Teff, log g, [Fe/H]) bins,
each uncertainty histogram would need a row for every fifth estimate of DR8-like labels
(counted with numpy on 10 M simulated rows), the three together four in five.

Triggers on ``estimates`` keep the counts exact whatever writes the estimates (the
workers' upserts, a COPY, a collaborator's DELETE): on PostgreSQL once per statement,
from its transition tables (the rows a statement inserted, and the old and new versions
of those it updated or deleted), on SQLite once per row. :func:`recount` counts them
from the estimates (the migration that made the table).
"""
from dataclasses import dataclass

import numpy as np
from sqlalchemy import ARRAY, Float, Integer, bindparam, case, cast, func, literal_column, text

MISSING_BIN = -2
"""The bin of a NULL value in ``estimate_cells`` (-1 is below the range, ``count``
above it)."""


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

    def index(self, x, postgres: bool):
        """SQL: the bin of ``x``: 0 .. count - 1, -1 below ``low``, ``count`` above
        ``high``, NULL for NULL. PostgreSQL: ``width_bucket`` over the edges (a binary
        search, in C). SQLite: as numpy does, a first guess from the scaled value,
        corrected by one where rounding put it next to the bin whose edges hold ``x``
        (e.g. 5900 K scales to 57.99999... but lies on the edge of bin 58)."""
        if postgres:
            # the last edge nudged up: x == high falls in the last bin, as in numpy
            thresholds = [*self.edges[:-1].tolist(), float(np.nextafter(self.high, np.inf))]
            return func.width_bucket(x, cast(bindparam(None, thresholds, ARRAY(Float)),
                                             ARRAY(Float))) - 1
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

CELL_AXES = ("teff", "logg", "feh")
CELL_WIDTH = 5
"""Bins per cell along each of :data:`CELL_AXES`. Wider cells make fewer rows but thicker
slabs to scan where a selection's bound cuts them. With 5 (250 K, 0.5 dex, 0.25 dex), a
model version of 10 M estimates with DR8's label distribution and uncertainties that vary
from star to star needs ~0.3 M rows; with 10, ~0.1 M rows but twice the slabs."""
CELL_HISTOGRAMS = (KIEL_AXES, ("feh",), ("teff_err",), ("logg_err",), ("feh_err",))
"""The histograms each cell keeps, numbered by position (``estimate_cells.histogram``)."""


@dataclass(frozen=True)
class Cell:
    """The cells of one axis: cell ``k`` (0 .. cells - 1) holds the axis's bins
    ``k * width`` .. ``(k + 1) * width - 1`` (``width`` 1: the bins themselves); -1 the
    values below its range, ``cells`` those above, :data:`MISSING_BIN` NULL."""
    bins: Bins
    width: int = CELL_WIDTH

    @property
    def cells(self) -> int:
        return self.bins.count // self.width

    def span(self, k):
        """(lowest value, highest value, whether the highest is included) of cell ``k``;
        None for an open end."""
        edges = self.bins.edges
        if k == -1:
            return None, float(edges[0]), False
        if k == self.cells:
            return float(edges[-1]), None, False
        last = k == self.cells - 1                 # the last bin also holds x == high
        return float(edges[k * self.width]), float(edges[(k + 1) * self.width]), last

    def inside(self, low, high):
        """(first, last): the cells whose every value lies in ``low <= x <= high`` (None:
        open), ``MISSING_BIN`` too when both are open; None when no cell does."""
        return self._cells(low, high, self._within)

    def overlapping(self, low, high):
        """(first, last): the cells holding values that may lie in ``low <= x <= high``,
        as :meth:`inside` (the cell above the range counts when ``high`` is its edge)."""
        return self._cells(low, high, self._overlaps)

    def _cells(self, low, high, test):
        if low is None and high is None:
            return MISSING_BIN, self.cells
        chosen = [k for k in range(-1, self.cells + 1) if test(self.span(k), low, high)]
        return (chosen[0], chosen[-1]) if chosen else None

    @staticmethod
    def _within(span, low, high):
        start, end, _ = span
        # [start, end) or [start, end] lies in [low, high] when low <= start and end <= high
        return ((low is None or (start is not None and start >= low))
                and (high is None or (end is not None and end <= high)))

    @staticmethod
    def _overlaps(span, low, high):
        start, end, closed = span
        return ((low is None or end is None or end > low or (closed and end == low))
                and (high is None or start is None or start <= high))


CELLS = {name: Cell(HISTOGRAM_BINS[name]) for name in CELL_AXES}
assert all(HISTOGRAM_BINS[name].count % CELL_WIDTH == 0 for name in CELL_AXES)


# ---------------------------------------------------------------------------------------
# The SQL that counts rows into cells (triggers and recount)
COUNTED_COLUMNS = ("model_version", "flags", *HISTOGRAM_BINS)
CELL_KEY = ("model_version", "histogram", "flags", *(f"{name}_cell" for name in CELL_AXES),
            "bin1", "bin2")
"""The key of ``estimate_cells``, in the order of its primary key: the histogram right after
the version, so that counting a selection in one histogram reads that histogram's rows."""


def _sql(expression, postgres):
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql.dialect() if postgres else sqlite.dialect()
    return str(expression.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def counted_rows_sql(source, postgres):
    """SQL: ``source``'s rows (a FROM item with a ``sign`` column, +1 to add a row and -1
    to take one away, and :data:`COUNTED_COLUMNS`) as net additions to the cells'
    histograms, one row per key of :data:`CELL_KEY` that changes. No WITH clause: SQLite
    does not take one inside a trigger."""
    bins = ", ".join(
        f"COALESCE({_sql(spec.index(literal_column(name), postgres), postgres)}, "
        f"{MISSING_BIN}) AS {name}_bin" for name, spec in HISTOGRAM_BINS.items())
    cells = ", ".join(f"CASE WHEN {name}_bin < 0 THEN {name}_bin "
                      f"ELSE {name}_bin / {CELL_WIDTH} END AS {name}_cell"
                      for name in CELL_AXES)
    histograms = " UNION ALL ".join(f"SELECT {number} AS histogram"
                                    for number in range(len(CELL_HISTOGRAMS)))
    bin1 = " ".join(f"WHEN {number} THEN {names[0]}_bin"
                    for number, names in enumerate(CELL_HISTOGRAMS))
    kiel = CELL_HISTOGRAMS.index(KIEL_AXES)
    return (
        f"SELECT model_version, histogram, flags, "
        f"{', '.join(f'{n}_cell' for n in CELL_AXES)}, CASE histogram {bin1} END AS bin1, "
        f"CASE histogram WHEN {kiel} THEN logg_bin ELSE 0 END AS bin2, "
        "sum(sign) AS n, "
        f"sum(CASE WHEN histogram = {kiel} AND feh IS NOT NULL THEN sign ELSE 0 END) AS feh_n, "
        f"COALESCE(sum(CASE WHEN histogram = {kiel} THEN sign * feh END), 0) AS feh_sum "
        f"FROM (SELECT sign, model_version, flags, feh, "
        f"{', '.join(f'{n}_bin' for n in HISTOGRAM_BINS)}, {cells} "
        f"FROM (SELECT sign, model_version, flags, feh, {bins} FROM {source}) AS binned"
        f") AS rows CROSS JOIN ({histograms}) AS histograms "
        f"GROUP BY {', '.join(CELL_KEY)}")


def add_counts_sql(source, postgres):
    """SQL: add ``source``'s rows (see :func:`counted_rows_sql`) to ``estimate_cells``.
    Keys in order, so that two transactions adding to the same cells lock them in the same
    order (no deadlock); keys whose counts do not change are not written."""
    key = ", ".join(CELL_KEY)
    return (f"INSERT INTO estimate_cells ({key}, n, feh_n, feh_sum) "
            f"SELECT {key}, n, feh_n, feh_sum FROM ({counted_rows_sql(source, postgres)}) "
            "AS counted WHERE n <> 0 OR feh_n <> 0 OR feh_sum <> 0 "
            f"ORDER BY {key} "
            f"ON CONFLICT ({key}) DO UPDATE SET n = estimate_cells.n + excluded.n, "
            "feh_n = estimate_cells.feh_n + excluded.feh_n, "
            "feh_sum = estimate_cells.feh_sum + excluded.feh_sum")


def _signed(sign, relation):
    return f"SELECT {sign} AS sign, {', '.join(COUNTED_COLUMNS)} FROM {relation}"


def _row(sign, record):
    values = ", ".join(f"{record}.{name} AS {name}" for name in COUNTED_COLUMNS)
    return f"SELECT {sign} AS sign, {values}"


TRIGGER_FUNCTION = "estimate_cells_count"
TRIGGERS = {"INSERT": "estimate_cells_insert", "UPDATE": "estimate_cells_update",
            "DELETE": "estimate_cells_delete"}


def install_triggers_sql(postgres):
    """The statements that make the triggers keeping ``estimate_cells`` counted."""
    if postgres:
        inserted = add_counts_sql(f"({_signed(1, 'new_rows')}) AS source", True)
        updated = add_counts_sql(f"({_signed(1, 'new_rows')} UNION ALL "
                                 f"{_signed(-1, 'old_rows')}) AS source", True)
        deleted = add_counts_sql(f"({_signed(-1, 'old_rows')}) AS source", True)
        transition = {"INSERT": "NEW TABLE AS new_rows",
                      "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
                      "DELETE": "OLD TABLE AS old_rows"}
        return [
            f"CREATE FUNCTION {TRIGGER_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN IF TG_OP = 'INSERT' THEN {inserted}; "
            f"ELSIF TG_OP = 'UPDATE' THEN {updated}; "
            f"ELSIF TG_OP = 'DELETE' THEN {deleted}; "
            "ELSE DELETE FROM estimate_cells; END IF; RETURN NULL; END $$",
            *(f"CREATE TRIGGER {name} AFTER {event} ON estimates REFERENCING "
              f"{transition[event]} FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER_FUNCTION}()"
              for event, name in TRIGGERS.items()),
            # TRUNCATE fires no DELETE trigger (and has no transition table)
            f"CREATE TRIGGER estimate_cells_truncate AFTER TRUNCATE ON estimates "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER_FUNCTION}()",
        ]
    rows = {"INSERT": _row(1, "NEW"),
            "UPDATE": f"{_row(1, 'NEW')} UNION ALL {_row(-1, 'OLD')}",
            "DELETE": _row(-1, "OLD")}
    return [f"CREATE TRIGGER {name} AFTER {event} ON estimates FOR EACH ROW BEGIN "
            f"{add_counts_sql(f'({rows[event]}) AS source', False)}; END"
            for event, name in TRIGGERS.items()]


def drop_triggers_sql(postgres):
    if postgres:
        return [f"DROP FUNCTION {TRIGGER_FUNCTION}() CASCADE"]
    return [f"DROP TRIGGER {name}" for name in TRIGGERS.values()]


def recount(connection):
    """Count ``estimate_cells`` again from ``estimates``, in the caller's transaction:
    after the table is made, or to repair what a write with the triggers disabled left
    behind. Writers wait meanwhile (their triggers would add to the cells being counted)."""
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        connection.execute(text("LOCK TABLE estimates IN SHARE MODE"))
    connection.execute(text("DELETE FROM estimate_cells"))
    connection.execute(text(add_counts_sql(f"({_signed(1, 'estimates')}) AS source",
                                           postgres)))
