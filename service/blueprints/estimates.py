"""``GET /api/v1/estimates``: parameter-range queries over the catalogue.

Ranges on teff, logg, feh, snrg and the uncertainties; quality flags; a model version
(default: the current one); an optional cone (ra, dec, radius); column selection;
ordering; keyset pagination (an opaque ``cursor``, with a ``next`` link in the JSON body
and an HTTP ``Link: <...>; rel="next"`` header for every format); ``limit`` up to a hard
maximum; formats json (default), csv, votable, fits.

``GET /api/v1/estimates/histograms`` takes the same selection parameters and answers the
histograms of every row selected (:func:`service.catalogue.selection_histograms`): what
the search page plots.

Pages are read from the sort indexes of :data:`etl.schema.SORT_INDEX_COLUMNS` where the
order allows it; a page that would read more rows than the service allows (by the
planner's estimate) is refused before it runs, with a message saying what to narrow.

Also defines :data:`CATALOGUE`, the catalogue's output columns (SQL expression and
metadata from :mod:`etl.schema`), shared with the cone search.
"""
import base64
import binascii
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional
from urllib.parse import urlencode

from flask import Blueprint, request
from sqlalchemy import and_, false, func, literal, or_, select, true, tuple_
from sqlalchemy.sql.util import find_tables

from etl import db as etl_db
from etl import schema
from models.labels import estimate_columns
from service import formats
from service.catalogue import (CATALOGUE, HISTOGRAM_BINS, KIEL_AXES, RANGE_COLUMNS,
                               catalogue_expressions, cone_centre, current_model_version,
                               selection_conditions, selection_filters, selection_histograms,
                               selection_needs_spectra, selection_rows_at_most)
from service.openapi import JSON_ERROR, Param, ParamError, content, operation, parse
from service.state import is_small_cone, large_query, state

blueprint = Blueprint("estimates", __name__)

spectra = schema.spectra
estimates = schema.estimates
models = schema.models

DEFAULT_COLUMNS = ["obsid", "ra", "dec", "snrg", "model_version", *estimate_columns(), "flags"]
ORDER_COLUMNS = ["obsid", "ra", "dec", "snrg", *estimate_columns(suffixes=("", "_err")), "distance"]
FLAG_MAX = 2 ** 31 - 1
MODEL_VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:+\-]{0,63}"


def _unit(description):
    return f" [{description.unit}]" if description.unit else ""


@lru_cache(maxsize=8)
def parameters(limits):
    params = []
    for name in RANGE_COLUMNS:
        d = CATALOGUE[name].description
        params.append(Param(f"{name}_min", "number",
                            f"Lower bound (inclusive) on {name}{_unit(d)}: {d.description}."))
        params.append(Param(f"{name}_max", "number",
                            f"Upper bound (inclusive) on {name}{_unit(d)}: {d.description}."))
    flags = CATALOGUE["flags"].description.description
    params += [
        Param("flags", "integer", f"Only rows whose flags equal this value ({flags}).",
              minimum=0, maximum=FLAG_MAX, example=0),
        Param("exclude_flags", "integer",
              "Bitmask: leave out rows with any of these flag bits set.",
              minimum=0, maximum=FLAG_MAX),
        Param("model_version", "string",
              "Model version whose estimates are returned (default: the current model; "
              "see /api/v1/models).", pattern=MODEL_VERSION_PATTERN, max_length=64),
        Param("ra", "number", "Cone centre right ascension (ICRS) [deg]; needs dec and "
              "radius.", minimum=0, maximum=360),
        Param("dec", "number", "Cone centre declination (ICRS) [deg]; needs ra and radius.",
              minimum=-90, maximum=90),
        Param("radius", "number", "Cone radius [deg]; needs ra and dec. Adds the column "
              "'distance' [deg].", minimum=0, exclusive_minimum=True,
              maximum=limits.scs_max_sr_deg),
        Param("columns", "list", "Comma-separated output columns (default: "
              + ",".join(DEFAULT_COLUMNS) + "; 'distance' needs a cone). Available: "
              + "; ".join(f"{c.name}{_unit(c.description)}: {c.description.description}"
                          for c in CATALOGUE.values()) + ".",
              choices=tuple(CATALOGUE) + ("distance",), max_length=1000),
        Param("order", "enum", "Sort column; a leading '-' sorts descending. Nulls come "
              "last; ties are broken by obsid. " + ORDER_INDEXES.format(
                  indexed=", ".join(SORT_INDEX_ORDERS), budget=limits.api_max_rows_read),
              default="obsid",
              choices=tuple(o for name in ORDER_COLUMNS for o in (name, "-" + name))),
        Param("cursor", "string", "Opaque position from the 'next' link of the previous "
              "page (keyset pagination).", pattern=r"[A-Za-z0-9_\-]{1,400}", max_length=400),
        Param("limit", "integer", f"Rows per page (at most {limits.api_max_limit}).",
              default=limits.api_default_limit, minimum=1, maximum=limits.api_max_limit),
        Param("format", "enum", "Output format.", default="json", choices=formats.FORMATS,
              ignore_case=True),
    ]
    return tuple(params)


ORDER_INDEXES = (
    "Without a cone, the orders {indexed} are read from an index, at any depth with the "
    "cursor; a filter on another column is checked on at most {budget} rows of that index "
    "for one page (refused after the first eighth of them if too few of those pass to "
    "fill the page at that rate). Other orders, and filters that keep too few rows in the order, are "
    "answered for selections whose narrowest range (teff, logg, feh, snrg) holds at most "
    "{budget} rows, which are sorted; anything else is refused (400) with what to narrow.")

operation(
    path="/api/v1/estimates", operation_id="estimates", tags=["catalogue"],
    summary="Estimates by parameter ranges, flags, model version and cone",
    description="Teff, log g, [Fe/H] estimates with uncertainties, filtered by ranges, "
                "flags and an optional cone, one page at a time (keyset pagination: follow "
                "'next' in the JSON body or the Link header). Accepted query shapes, on "
                "PostgreSQL: any query with a cone; without one, a page is read either "
                "from the index of its order (obsid, snrg, teff, logg, feh), walking at "
                "most LAMOST_VAC_API_MAX_ROWS_READ rows when other columns are filtered, "
                "or by sorting a selection whose narrowest range on teff, logg, feh or "
                "snrg holds at most that many rows (the database's estimate). Anything "
                "else -- an order without index (ra, dec, the uncertainties) on a larger "
                "selection, or filters that keep too few rows in the order -- is refused "
                "with HTTP 400 naming the parameter to narrow, before the catalogue is "
                "read (or, when the filters turn out sparser in that order than the "
                "estimate, after at most that many rows).",
    params=parameters,
    responses={
        "200": {"description": "one page of rows",
                "content": content("application/json", formats.CSV_MIME,
                                   formats.VOTABLE_MIME, formats.FITS_MIME)},
        "400": {"description": "invalid parameter, or a query shape that cannot be read "
                               "within the rows budget (the error names the parameter "
                               "to narrow and says how)", **JSON_ERROR},
        "414": {"description": "request URI too long", **JSON_ERROR},
        "429": {"description": "too many large queries at once (without a small cone); "
                               "retry after the Retry-After header's seconds", **JSON_ERROR},
        "503": {"description": "statement timeout or database unavailable", **JSON_ERROR},
    })


# ---------------------------------------------------------------------------------------
# Cursor: base64url(JSON [order, sort value, obsid])
def encode_cursor(order, value, obsid) -> str:
    raw = json.dumps([order, value, obsid], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, order: str):
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        cursor_order, value, obsid = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ParamError("cursor", "not a cursor from a 'next' link") from None
    if cursor_order != order:
        raise ParamError("cursor", f"made for order={cursor_order!r}, not {order!r}")
    number = (int, float)
    if not isinstance(obsid, int) or isinstance(obsid, bool) or abs(obsid) > 2 ** 63 - 1:
        raise ParamError("cursor", "not a cursor from a 'next' link")
    if value is not None and (isinstance(value, bool) or not isinstance(value, number)
                              or not math.isfinite(value)
                              or (isinstance(value, int) and abs(value) > 2 ** 63 - 1)):
        raise ParamError("cursor", "not a cursor from a 'next' link")
    return value, obsid


def sorts_nulls(order_name) -> bool:
    """True when the sort column may be NULL: its NULLs come after every value, in either
    direction, and are read as a part of their own (see :func:`query_page`)."""
    return order_name != "distance" and CATALOGUE[order_name].description.nullable


def page_parts(args):
    """The parts of the order a page may read, in order: the rows with a sort value
    (False), then those whose sort value is NULL (True). A cursor with a NULL value is
    already in the second part."""
    if not sorts_nulls(args["order"].lstrip("-")):
        return (False,)
    if args["cursor"] and decode_cursor(args["cursor"], args["order"])[0] is None:
        return (True,)
    return (False, True)


def part_conditions(args, sort, obsid, nulls):
    """Where the rows of one part of the order are and where the cursor left off in it.

    Written so that the sort index serves them: ``sort IS [NOT] NULL`` and a row
    comparison ``(sort, obsid) > (value, last obsid)`` are index conditions of the
    (..., sort, obsid) btree, so a deep page starts where the previous one stopped
    instead of reading every row before it.
    """
    order = args["order"]
    descending, order_name = order.startswith("-"), order.lstrip("-")
    cursor = decode_cursor(args["cursor"], order) if args["cursor"] else None

    def after(left, right):
        return left < right if descending else left > right

    if order_name == "obsid":
        return [after(obsid, cursor[1])] if cursor else []
    if not sorts_nulls(order_name):
        return [after(tuple_(sort, obsid), tuple_(*cursor))] if cursor else []
    if nulls:
        return [sort.is_(None)] + ([after(obsid, cursor[1])]
                                   if cursor and cursor[0] is None else [])
    if cursor and cursor[0] is None:
        return [false()]                    # the cursor is past every value
    return [sort.is_not(None)] + ([after(tuple_(sort, obsid), tuple_(*cursor))]
                                  if cursor else [])


# ---------------------------------------------------------------------------------------
def _check_ranges(args):
    for name in RANGE_COLUMNS:
        low, high = args[f"{name}_min"], args[f"{name}_max"]
        if low is not None and high is not None and low > high:
            raise ParamError(f"{name}_min", f"larger than {name}_max ({low:g} > {high:g})")


def _cone(args):
    given = {k: args[k] for k in ("ra", "dec", "radius") if args[k] is not None}
    if not given:
        return None
    for name in ("ra", "dec", "radius"):
        if name not in given:
            raise ParamError(name, "a cone needs ra, dec and radius")
    return (*cone_centre(args["ra"], args["dec"]), args["radius"])


def resolve_model_version(connection, requested):
    if requested is None:
        version = connection.execute(current_model_version().element).scalar()
        if version is None:
            raise ParamError("model_version", "the catalogue has no current model version; "
                                              "name one (see /api/v1/models)")
        return version
    found = connection.execute(select(models.c.version)
                               .where(models.c.version == requested)).scalar()
    if found is None:
        raise ParamError("model_version", f"no model version {requested!r} "
                                          "(see /api/v1/models)")
    return found


# How a page is read (see :func:`read_path`)
PLAIN = "plain"     # one statement; the planner chooses
WALK = "walk"       # the sort index, walked for at most the read budget's rows
SORT = "sort"       # the whole selection (at most the read budget's rows), then sorted


def _sort_table(name):
    """The table whose sort index returns rows in (``name``, obsid) order, or None."""
    if name not in CATALOGUE:
        return None
    table = CATALOGUE[name].expression.table
    return table if schema.sort_index_column(table.name, name) else None


SORT_INDEX_ORDERS = tuple(name for name in ORDER_COLUMNS if _sort_table(name) is not None)
"""The orders a sort index serves: a page of them is read from the index."""
INDEXED_RANGES = tuple(name for name in RANGE_COLUMNS if _sort_table(name) is not None)
"""The columns whose ranges (``<name>_min``, ``<name>_max``) an index narrows."""


def build_query(bind, args, model_version, names, nulls=False, rows=None, path=None):
    """The statement of one part of one page for the validated ``args`` (its rows end
    with the sort key and the obsid, for the cursor); parameterised throughout.

    ``nulls``: the part of the order whose sort value is NULL (see :func:`page_parts`);
    ``rows``: how many rows to read (default: the page's limit plus one, to know whether
    there is a next page); ``path``: how (:class:`ReadPath`; default: one statement, the
    planner chooses).
    """
    cone = _cone(args)
    order = args["order"]
    descending = order.startswith("-")
    order_name = order.lstrip("-")
    if order_name == "distance" and cone is None:
        raise ParamError("order", "ordering by distance needs a cone (ra, dec, radius)")
    if "distance" in names and cone is None:
        raise ParamError("columns", "the column 'distance' needs a cone (ra, dec, radius)")
    rows = args["limit"] + 1 if rows is None else rows
    if path is not None and path.kind != PLAIN:
        return _driven_query(bind, args, model_version, names, nulls, rows, path)

    expressions = catalogue_expressions(bind, cone)
    conditions = selection_conditions(bind, args, model_version, cone)
    sort = expressions[order_name]
    # Filtered and sorted on estimates alone (no cone, no snrg range, an estimates column
    # or obsid as the key): the page is cut from estimates and only its rows are joined
    # to spectra, instead of joining the whole catalogue before sorting it (4x faster
    # for an unindexed sort key on a million rows).
    page_first = (not selection_needs_spectra(args, cone)
                  and (order_name == "obsid" or sort.table is estimates))
    obsid = estimates.c.obsid if page_first else spectra.c.obsid
    if order_name == "obsid":
        sort = obsid
    conditions += part_conditions(args, sort, obsid, nulls)
    if order_name == "distance" and etl_db.is_postgres(bind):
        return _nearest_first(expressions, conditions, names, descending, rows)
    if not page_first:
        return (select(*[expressions[n].label(n) for n in names], sort.label("_sort_key"),
                       obsid.label("_obsid_key"))
                .select_from(estimates.join(spectra, spectra.c.obsid == estimates.c.obsid))
                .where(and_(true(), *conditions))
                .order_by(*_ordering(sort, obsid, order_name, descending, nulls))
                .limit(rows))
    page = (select(estimates).where(and_(true(), *conditions))
            .order_by(*_ordering(sort, obsid, order_name, descending, nulls))
            .limit(rows).subquery("page"))

    def on_page(expression):
        return page.c[expression.name] if expression.table is estimates else expression

    return (select(*[on_page(expressions[n]).label(n) for n in names],
                   on_page(sort).label("_sort_key"), page.c.obsid.label("_obsid_key"))
            .select_from(page.join(spectra, spectra.c.obsid == page.c.obsid))
            .order_by(*_ordering(on_page(sort), page.c.obsid, order_name, descending,
                                 nulls)))


def _nearest_first(expressions, conditions, names, descending, rows):
    """The page of a cone ordered by distance (PostgreSQL): the cone's spectra are sorted
    first and each looks up its estimate (a LATERAL index probe) only until the page is
    full. Joined before sorting, a 1-deg cone at DR8 density probed the estimates of all
    its ~75,000 spectra for a page of 100 (351 ms warm; 50 ms so)."""
    on_spectra, on_estimates = [], []
    for condition in conditions:        # each constrains one column (selection_filters)
        tables = set(find_tables(condition, check_columns=True))
        if not tables <= {spectra} and not tables <= {estimates}:
            raise ValueError(f"a condition on both tables cannot be split: {condition}")
        (on_spectra if tables <= {spectra} else on_estimates).append(condition)

    distance = expressions["distance"]
    shown = {spectra.c.obsid, *(expressions[n] for n in names if n != "distance"
                                 and expressions[n].table is spectra)}
    cone = (select(*[c for c in spectra.c if c in shown], distance.label("_sort_key"))
            .where(*on_spectra)
            .order_by(*_ordering(distance, spectra.c.obsid, "distance", descending, False))
            .subquery("cone"))
    # LIMIT 1 (one estimate per spectrum and model version): always an index probe
    estimate = (select(estimates).where(estimates.c.obsid == cone.c.obsid, *on_estimates)
                .limit(1).lateral("estimate"))

    def column(name):
        if name == "distance":
            return cone.c._sort_key
        expression = expressions[name]
        return (cone if expression.table is spectra else estimate).corresponding_column(
            expression)

    return (select(*[column(n).label(n) for n in names], cone.c._sort_key.label("_sort_key"),
                   cone.c.obsid.label("_obsid_key"))
            .select_from(cone.join(estimate, true()))
            .order_by(*_ordering(cone.c._sort_key, cone.c.obsid, "distance", descending,
                                 False))
            .limit(rows))


def _ordering(sort, obsid, order_name, descending, nulls):
    """ORDER BY of one part: the sort key, ties broken by obsid (NULL sort values are a
    part of their own, in obsid order). No NULLS FIRST/LAST: a part holds no NULL sort
    value, so the order is the sort index's, read forwards or backwards."""
    by_obsid = obsid.desc() if descending else obsid.asc()
    if order_name == "obsid" or nulls:
        return [by_obsid]
    return [sort.desc() if descending else sort.asc(), by_obsid]


def _named_columns(table):
    return [column.label(column.name) for column in table.columns]


def _driven_query(bind, args, model_version, names, nulls, rows, path):
    """The WALK and SORT statements: rows of one table (``path.table``, the *driving*
    table) are found first -- walked in index order or selected by their narrowest
    range -- and the other table's row of each is then looked up by obsid (a LATERAL
    subquery behind OFFSET 0, so the planner cannot turn it into a join that reads the
    whole other table).

    WALK: the driving table is read in index order for at most ``path.walk_rows`` rows
    (within the order column's own range, after the cursor), each numbered; the other
    filters then keep the page's rows. The last walked row is returned even when it does
    not pass them, marked, so that :func:`query_page` knows the walk was cut.
    SORT: the driving table's rows within its filters are materialised (so the planner
    reads them through the range's index), the other filters applied, and sorted.
    """
    order_name = args["order"].lstrip("-")
    descending = args["order"].startswith("-")
    driving = path.table
    other = spectra if driving is estimates else estimates
    version = estimates.c.model_version == model_version
    own = selection_filters(bind, args, None, catalogue_expressions(bind, None))

    def on_driving(name):
        return name == "obsid" or CATALOGUE[name].expression.table is driving

    def own_column(name):
        return driving.c.obsid if name == "obsid" else CATALOGUE[name].expression

    sort_inside = on_driving(order_name)
    if path.kind == WALK:
        inner_conditions, ordering = _walk_range(bind, args, model_version, nulls, driving)
    else:
        inner_conditions = [version] if driving is estimates else []
        inner_conditions += [f.condition for f in own if f.column and on_driving(f.column)]
        if sort_inside:
            inner_conditions += part_conditions(args, own_column(order_name),
                                                driving.c.obsid, nulls)
    inner = select(*_named_columns(driving)).where(and_(true(), *inner_conditions))
    if path.kind == WALK:
        driven = (inner.add_columns(func.row_number().over(order_by=ordering).label("_walked"))
                  .order_by(*ordering).limit(path.walk_rows).subquery("walked"))
    else:
        driven = inner.cte("selection").prefix_with("MATERIALIZED")
        if sort_inside and other is spectra and not any(
                f.column and not on_driving(f.column) for f in own):
            # Nothing of the other table is needed before sorting: cut the page first,
            # look up only its rows.
            ordering = _ordering(driven.c.obsid if order_name == "obsid"
                                 else driven.c[order_name], driven.c.obsid, order_name,
                                 descending, nulls)
            driven = select(driven).order_by(*ordering).limit(rows).subquery("page")
    probe_conditions = [other.c.obsid == driven.c.obsid] + ([version] if other is estimates
                                                            else [])
    probe = (select(*_named_columns(other)).where(*probe_conditions).offset(0)
             .lateral("probe"))

    def column(name):
        return driven.c[name] if on_driving(name) else probe.c[name]

    filters = selection_filters(bind, args, None, {name: column(name) for name in CATALOGUE})
    sort = column(order_name)
    outer_conditions = [] if sort_inside else \
        part_conditions(args, sort, driven.c.obsid, nulls)
    # A spectrum may have no estimate of the model version; an estimate always has its
    # spectrum (foreign key), so then nothing has to be looked up before sorting.
    found = [probe.c.obsid.is_not(None)] if other is estimates else []
    if path.kind == WALK:
        passes = and_(true(), *found,
                      *(f.condition for f in filters if f.column != order_name))
        outer_conditions.append(or_(passes, driven.c._walked == path.walk_rows))
        marks = [passes.label("_passes"), driven.c._walked.label("_walked")]
    else:
        outer_conditions += [*found, *(f.condition for f in filters
                                       if not (f.column and on_driving(f.column)))]
        marks = []
    return (select(*[column(n).label(n) for n in names], *marks, sort.label("_sort_key"),
                   driven.c.obsid.label("_obsid_key"))
            .select_from(driven.join(probe, true(), isouter=True))
            .where(and_(true(), *outer_conditions))
            .order_by(*_ordering(sort, driven.c.obsid, order_name, descending, nulls))
            .limit(rows))


def _walk_range(bind, args, model_version, nulls, driving):
    """(conditions, ORDER BY) of the rows a WALK reads from ``driving``, its sort index in
    order: the model version (of estimates), the order column's own range, the part of
    the order (:func:`page_parts`) and where the cursor left off in it."""
    order_name = args["order"].lstrip("-")
    column = driving.c.obsid if order_name == "obsid" else CATALOGUE[order_name].expression
    own = selection_filters(bind, args, None, catalogue_expressions(bind, None))
    conditions = [estimates.c.model_version == model_version] if driving is estimates else []
    conditions += [f.condition for f in own if f.column == order_name]
    conditions += part_conditions(args, column, driving.c.obsid, nulls)
    return conditions, _ordering(column, driving.c.obsid, order_name,
                                 args["order"].startswith("-"), nulls)


def _walk_rows_ahead(connection, args, model_version, nulls, driving, at_most) -> int:
    """How many rows, up to ``at_most``, a WALK of ``args`` would read (the index alone:
    no filter on another column, no row of the other table)."""
    conditions, ordering = _walk_range(connection, args, model_version, nulls, driving)
    ahead = (select(driving.c.obsid).where(and_(true(), *conditions)).order_by(*ordering)
             .limit(at_most).subquery("ahead"))
    return connection.execute(select(func.count()).select_from(ahead)).scalar()


# ---------------------------------------------------------------------------------------
# Choosing how a page is read, and refusing what cannot be read fast (PostgreSQL)
def estimated_rows(connection, from_clause, conditions) -> float:
    """PostgreSQL's planner estimate of the rows of ``from_clause`` meeting
    ``conditions``: EXPLAIN plans the query and reads no row."""
    statement = select(literal(1)).select_from(from_clause).where(and_(true(), *conditions))
    compiled = statement.compile(connection)
    plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled.string}",
                                      compiled.construct_params()).scalar()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def narrowest_range(connection, args, model_version):
    """(rows, table) the SORT path would read: the planner's estimate of the narrowest
    range on an indexed column (:data:`INDEXED_RANGES`; one column's histogram, which it
    knows well) and that column's table, or all the estimates of the model version when
    there is no such range."""
    filters = selection_filters(connection, args, None, catalogue_expressions(connection, None))
    version = estimates.c.model_version == model_version
    candidates = []
    for name in dict.fromkeys(f.column for f in filters if f.column in INDEXED_RANGES):
        table = _sort_table(name)
        conditions = [f.condition for f in filters if f.column == name]
        candidates.append((estimated_rows(connection, table, conditions + (
            [version] if table is estimates else [])), table))
    if not candidates:
        return estimated_rows(connection, estimates, [version]), estimates
    return min(candidates, key=lambda candidate: candidate[0])


def walk_rows(connection, args, model_version, filters) -> float:
    """The rows the WALK path is estimated to read for one page: the rows in the order
    column's own range times the share of them that pass every filter, taking the
    filters as independent of the order (often they are not: the walk is cut anyway)."""
    order_name = args["order"].lstrip("-")
    version = estimates.c.model_version == model_version
    on_spectra = any(f.column and CATALOGUE[f.column].expression.table is spectra
                     for f in filters)
    selection = (estimates.join(spectra, spectra.c.obsid == estimates.c.obsid)
                 if on_spectra else estimates)
    # Counted in estimate_cells where it can (label ranges and flags), which know how the
    # labels go together; the planner takes two label ranges as independent (a walk it
    # expected to fill its page read 10,000 rows and was refused after 112 ms at DR8 size)
    # and cannot know how many rows a bitmask keeps (it assumes 0.5%: that filter is then
    # left to the walk's cut).
    matching = selection_rows_at_most(connection, args, model_version)
    if matching is None:
        matching = estimated_rows(connection, selection, [
            version, *(f.condition for f in filters if f.parameters != ("exclude_flags",))])
    table = estimates if order_name == "obsid" else _sort_table(order_name)
    walked = estimated_rows(connection, table, [
        *(f.condition for f in filters if f.column == order_name),
        *([version] if table is estimates else [])])
    return walked * min(1.0, (args["limit"] + 1) / max(matching, 1.0))


@dataclass(frozen=True)
class ReadPath:
    """How a page is read (:func:`read_path`): ``kind`` PLAIN, WALK or SORT; ``table``
    the driving table of WALK and SORT; ``walk_rows`` how far WALK walks."""
    kind: str
    table: object = None
    walk_rows: int = 0


def read_path(connection, args, model_version, budget) -> ReadPath:
    """How to read a page of the validated ``args`` so that it reads at most about
    ``budget`` rows, decided before anything runs; :class:`ParamError` (HTTP 400) when
    no way can.

    * PLAIN where what the planner may choose is bounded anyway: a cone (its radius is
      limited), SQLite (the embedded catalogue), or an order with a sort index and no
      filter on another column (the index is read for one page);
    * SORT when the narrowest range is estimated at ``budget`` rows or fewer
      (:func:`narrowest_range`): they are read and sorted;
    * WALK, for a larger selection in an order with a sort index: the index is read in
      order for at most ``budget`` rows (:func:`query_page` refuses the page if they do
      not fill it: the filters keep too few rows in that order);
    * refused: an order without a sort index on a larger selection.
    """
    order_name = args["order"].lstrip("-")
    filters = selection_filters(connection, args, None, catalogue_expressions(connection, None))
    sort_table = _sort_table(order_name)
    if _cone(args) is not None or order_name == "distance" or \
            not etl_db.is_postgres(connection) or \
            (sort_table is not None and all(f.column == order_name for f in filters)):
        return ReadPath(PLAIN)      # (ordering by distance without a cone is refused later)
    rows, table = narrowest_range(connection, args, model_version)
    if rows <= budget:
        return ReadPath(SORT, table)
    if sort_table is not None:
        if walk_rows(connection, args, model_version, filters) > budget:
            refuse_sparse_walk(connection, args, budget, estimated=True)
        # by obsid: estimates' (obsid, model_version) key holds the model version too
        return ReadPath(WALK, estimates if order_name == "obsid" else sort_table, budget)
    raise ParamError("order", f"order={args['order']} has no index, so the selection is "
                              f"sorted, and it holds about {rows:,.0f} rows (the database's "
                              f"estimate); at most {budget:,} are sorted for a page without "
                              f"a cone. {_NARROW}, or order by one of "
                              f"{', '.join(SORT_INDEX_ORDERS)}")


_NARROW = (f"Narrow a range on {', '.join(INDEXED_RANGES)} (the narrowest one counts) or "
           f"add a cone (ra, dec, radius)")


SCOUT_SHARE = 8
"""A walk first reads 1/SCOUT_SHARE of the read budget (:func:`_walk`)."""


def _walk(connection, args, model_version, names, nulls, wanted, path):
    """The rows of one WALK part, the walk in two stages. The *scout* reads the first
    1/:data:`SCOUT_SHARE` of the budget; a page it fills (or an order it reaches the end
    of) is answered. When fewer of its rows passed the filters than, at that rate, the
    whole budget would need to fill the page, the page is refused there, after an eighth
    of the reading: the up-front estimate takes the order as independent of the filters,
    and where it is not (the metal-rich dwarfs are rarer among the best spectra) the walk
    learns the real rate from the scout. Otherwise the rest of the budget is walked from
    the scout's last row, and the page is refused if that does not fill it either."""
    budget = path.walk_rows
    scout = ReadPath(WALK, path.table, max(1, -(-budget // SCOUT_SHARE)))

    def walked(part_args, part_path, rows):
        statement = build_query(connection, part_args, model_version, names, nulls=nulls,
                                rows=rows, path=part_path)
        return _walked_rows(connection.execute(statement).all(), part_path)

    found, last = walked(args, scout, wanted)
    rest = budget - scout.walk_rows
    if last is None or len(found) >= wanted:
        return found
    rest_args = dict(args, cursor=encode_cursor(args["order"], last._sort_key, last._obsid_key))
    # the page is full without the row that only tells whether there is a next page
    full_page = max(wanted - 1, 1)
    if (rest <= 0 or len(found) * budget < full_page * scout.walk_rows) and \
            _walk_rows_ahead(connection, rest_args, model_version, nulls, path.table,
                             rest) >= rest:
        # (an order, or its part of NULLs, that ends within the budget is read to its end:
        # the walk would not be cut, and a short last page is an answer)
        refuse_sparse_walk(connection, args, budget, scouted=(len(found), scout.walk_rows))
    more, last = walked(rest_args, ReadPath(WALK, path.table, rest), wanted - len(found))
    if last is not None and len(found) + len(more) < wanted:
        refuse_sparse_walk(connection, args, budget)
    return found + more


def _walked_rows(rows, path):
    """(the rows of a WALK statement that passed its filters, without their marks; its
    last walked row when the walk was cut at ``path.walk_rows``, else None)
    (:func:`_driven_query`)."""
    last = next((row for row in rows if row._walked == path.walk_rows), None)
    return [row[:-4] + row[-2:] for row in rows if row._passes], last


def refuse_sparse_walk(connection, args, budget, estimated=False, scouted=None):
    """The filters keep too few rows in the order to fill a page within ``budget`` rows of
    the index -- as the WALK path found, as its scout's (passed, walked) rows
    ``scouted`` project, or, with ``estimated``, as the planner's estimate says before
    it runs: say which filters to narrow (:class:`ParamError`)."""
    order = args["order"]
    order_name = order.lstrip("-")
    filters = selection_filters(connection, args, None, catalogue_expressions(connection, None))
    others = [f for f in filters if f.column != order_name]
    filtered = [name for name in dict.fromkeys(f.column for f in filters)
                if name in SORT_INDEX_ORDERS]
    by_filtered = f", order by a column you filter on ({', '.join(filtered)})" \
        if filtered else ""
    names = ", ".join(p for f in others for p in f.parameters)
    found = "are estimated to pass" if estimated else "pass"
    if scouted is None:
        measured = (f"fewer than a page ({args['limit']} rows) of the first {budget:,} "
                    f"rows {found} {names}")
    else:
        measured = (f"{scouted[0]:,} of the first {scouted[1]:,} rows pass {names}, so "
                    f"fewer than a page ({args['limit']} rows) of the first {budget:,} "
                    f"would")
    raise ParamError(others[0].parameters[0],
                     f"in order={order}, {measured}: the selection is too sparse "
                     f"in that order to read a page from the index, and too large to sort "
                     f"(more than {budget:,} rows). {_NARROW}{by_filtered}, or use "
                     f"/tap/async for the whole selection")


def output_columns(names):
    return [formats.DISTANCE_COLUMN if n == "distance" else CATALOGUE[n].description
            for n in names]


@blueprint.get("/api/v1/estimates")
def get_estimates():
    service = state()
    args = parse(parameters(service.limits), request.args)
    cone = check_query(args)
    if cone is not None and is_small_cone(cone[2]):
        return _page(service, args)
    # Without a small cone the database may scan the whole catalogue.
    return large_query(lambda: _page(service, args))


@dataclass(frozen=True)
class Page:
    """One page of a range query: the output columns' metadata, the rows, the model
    version they come from and the cursor of the next page (None on the last one)."""
    names: list
    columns: list
    rows: list
    model_version: str
    next_cursor: Optional[str]


def check_query(args):
    """The checks of validated ``args`` across parameters (ranges, cone), as the API
    makes them; :class:`ParamError` names the parameter."""
    _check_ranges(args)
    return _cone(args)


def query_page(service, args, names=None) -> Page:
    """One page of the range query of the validated ``args`` (:func:`parameters`): what
    ``/api/v1/estimates`` answers and the catalogue pages show. ``names``: output
    columns (default: ``args["columns"]`` or :data:`DEFAULT_COLUMNS`, plus the distance
    with a cone).

    The way the page is read is chosen first (:func:`read_path`), which may refuse it.
    Ordered by a column that may
    be NULL, a page reads the rows with a value and then, if it is not full, the NULLs:
    two statements that each follow the sort index.
    """
    if names is None:
        names = list(args["columns"] or DEFAULT_COLUMNS)
        if args["columns"] is None and _cone(args) is not None:
            names.append("distance")
    limit = args["limit"]
    with service.engine.connect() as connection:
        model_version = resolve_model_version(connection, args["model_version"])
        path = read_path(connection, args, model_version, service.limits.api_max_rows_read)
        rows = []
        for nulls in page_parts(args):
            wanted = limit + 1 - len(rows)
            if path.kind == WALK:
                part = _walk(connection, args, model_version, names, nulls, wanted, path)
            else:
                part = connection.execute(build_query(connection, args, model_version, names,
                                                      nulls=nulls, rows=wanted,
                                                      path=path)).all()
            rows += part
            if len(rows) > limit:
                break
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(args["order"], last[-2], last[-1])
    return Page(names, output_columns(names), [tuple(row[:-2]) for row in rows],
                model_version, next_cursor)


def _page(service, args):
    page = query_page(service, args)
    next_url = None
    if page.next_cursor:
        query = {k: v for k, v in request.args.items() if k != "cursor"}
        # the version of this page, named: a client paging through the default catalogue
        # while a new version becomes current would otherwise get the rest from that one
        query.update(model_version=page.model_version, cursor=page.next_cursor)
        next_url = f"{request.base_url}?{urlencode(query)}"
    model_version, limit = page.model_version, args["limit"]
    headers = {"Link": f'<{next_url}>; rel="next"'} if next_url else {}
    infos = [formats.Info("model_version", model_version)]
    if next_url:
        infos.append(formats.Info("next", next_url))
    return formats.render(
        args["format"], page.columns, page.rows, filename="estimates", headers=headers,
        json_extra={"model_version": model_version, "limit": limit, "next": next_url},
        votable_kwargs={"status_infos": [formats.Info("QUERY_STATUS", "OK")] + infos,
                        "description": "LAMOST LRS value-added catalogue estimates"})


# ---------------------------------------------------------------------------------------
# The same selection in ADQL
def _adql_number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def equivalent_adql(args, names) -> str:
    """The ADQL query (for ``/tap/sync``) of the rows the validated ``args`` select, all
    pages of them, ordered by obsid: ``names`` (columns of the catalogue views, plus
    ``distance`` with a cone) from ``v_current_estimates``, or from ``v_estimates`` of
    the ``model_version`` asked for; the cone as ``CONTAINS(POINT, CIRCLE)``, inclusive
    ranges as ``BETWEEN``, ``>=`` or ``<=``, and each bit of ``exclude_flags`` as
    ``MOD(FLOOR(flags / bit.0), 2) = 0`` (core ADQL has no bitwise operator; the
    decimal divisor keeps the division exact where integer division would truncate)."""
    cone = _cone(args)
    columns = [n for n in names if n != "distance"]
    conditions = []
    if args["model_version"] is None:
        table = "v_current_estimates"
    else:
        table = "v_estimates"
        conditions.append("model_version = '" + args["model_version"].replace("'", "''") + "'")
    if cone is not None:
        ra, dec, radius = (_adql_number(v) for v in cone)
        if "distance" in names:
            columns.append(f"DISTANCE(POINT('ICRS', ra, dec), POINT('ICRS', {ra}, {dec})) "
                           "AS distance")
        conditions.append(f"CONTAINS(POINT('ICRS', ra, dec), "
                          f"CIRCLE('ICRS', {ra}, {dec}, {radius})) = 1")
    for name in RANGE_COLUMNS:
        low, high = args[f"{name}_min"], args[f"{name}_max"]
        if low is not None and high is not None:
            conditions.append(f"{name} BETWEEN {_adql_number(low)} AND {_adql_number(high)}")
        elif low is not None:
            conditions.append(f"{name} >= {_adql_number(low)}")
        elif high is not None:
            conditions.append(f"{name} <= {_adql_number(high)}")
    if args["flags"] is not None:
        conditions.append(f"flags = {args['flags']}")
    mask = args["exclude_flags"] or 0
    conditions += [f"MOD(FLOOR(flags / {1 << bit}.0), 2) = 0"
                   for bit in range(mask.bit_length()) if mask >> bit & 1]
    where = "\nWHERE " + "\n  AND ".join(conditions) if conditions else ""
    return f"SELECT {', '.join(columns)}\nFROM {table}{where}\nORDER BY obsid"


# ---------------------------------------------------------------------------------------
# Histograms of the whole selection
PAGE_PARAMETERS = ("columns", "order", "cursor", "limit", "format")


@lru_cache(maxsize=8)
def histogram_parameters(limits):
    """The selection parameters of :func:`parameters`, without those of a page."""
    return tuple(p for p in parameters(limits) if p.name not in PAGE_PARAMETERS)


def _bins_text():
    return "; ".join(f"{name} {bins.count} bins from {bins.low:g} to {bins.high:g}"
                     f"{_unit(CATALOGUE[name].description)}"
                     for name, bins in HISTOGRAM_BINS.items())


operation(
    path="/api/v1/estimates/histograms", operation_id="estimates_histograms",
    tags=["catalogue"],
    summary="Histograms of every row a range query selects",
    description="The same selection parameters as /api/v1/estimates (ranges, flags, model "
                "version, cone), counted by the database over the whole selection (not "
                "one page): a histogram of each label and its uncertainty in fixed bins ("
                + _bins_text() + "; 'edges' has count + 1 values, bin k holds edges[k] <= "
                "x < edges[k+1] and the last bin also x = edges[-1], as numpy.histogram) "
                "with the rows below, above and without a value; and the Kiel diagram: "
                "rows and mean [Fe/H] per (Teff bin, log g bin) cell, on the same bins "
                "(kiel.counts[i][j]: Teff bin i, log g bin j; mean_feh null where no row "
                "has [Fe/H]).",
    params=histogram_parameters,
    responses={
        "200": {"description": "the histograms", "content": content("application/json")},
        "400": {"description": "invalid parameter", **JSON_ERROR},
        "414": {"description": "request URI too long", **JSON_ERROR},
        "429": {"description": "too many large queries at once (without a small cone); "
                               "retry after the Retry-After header's seconds", **JSON_ERROR},
        "503": {"description": "statement timeout or database unavailable", **JSON_ERROR},
    })


def query_histograms(service, args):
    """:class:`service.catalogue.SelectionHistograms` of every row the validated
    selection parameters ``args`` select (:func:`histogram_parameters`, or a page's)."""
    with service.engine.connect() as connection:
        model_version = resolve_model_version(connection, args["model_version"])
        return selection_histograms(connection, args, model_version, _cone(args))


def histograms_document(counted) -> dict:
    """The JSON answer of ``/api/v1/estimates/histograms``."""
    return {
        "model_version": counted.model_version,
        "rows": counted.rows,
        "histograms": {
            name: {"unit": CATALOGUE[name].description.unit,
                   "edges": histogram.bins.edges.tolist(),
                   "counts": histogram.counts.tolist(), "below": histogram.below,
                   "above": histogram.above, "missing": histogram.missing}
            for name, histogram in counted.histograms.items()},
        "kiel": {"axes": list(KIEL_AXES), "counts": counted.kiel_counts.tolist(),
                 "mean_feh": counted.kiel_mean_feh.tolist()},
    }


@blueprint.get("/api/v1/estimates/histograms")
def get_histograms():
    service = state()
    args = parse(histogram_parameters(service.limits), request.args)
    cone = check_query(args)

    def respond():
        return formats.json_response(histograms_document(query_histograms(service, args)))
    if cone is not None and is_small_cone(cone[2]):
        return respond()
    return large_query(respond)
