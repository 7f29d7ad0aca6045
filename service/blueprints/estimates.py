"""``GET /api/v1/estimates``: parameter-range queries over the catalogue.

Ranges on teff, logg, feh, snrg and the uncertainties; quality flags; a model version
(default: the current one); an optional cone (ra, dec, radius); column selection;
ordering; keyset pagination (an opaque ``cursor``, with a ``next`` link in the JSON body
and an HTTP ``Link: <...>; rel="next"`` header for every format); ``limit`` up to a hard
maximum; formats json (default), csv, votable, fits.

``GET /api/v1/estimates/histograms`` takes the same selection parameters and answers the
histograms of every row selected (:func:`service.catalogue.selection_histograms`): what
the search page plots.
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
from sqlalchemy import and_, or_, select, true

from etl import db as etl_db
from etl import schema
from models.labels import estimate_columns
from service import formats
from service.catalogue import (CATALOGUE, HISTOGRAM_BINS, KIEL_AXES, RANGE_COLUMNS,
                               cone_centre, current_model_version, selection_conditions,
                               selection_histograms, selection_needs_spectra)
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
              "last; ties are broken by obsid.", default="obsid",
              choices=tuple(o for name in ORDER_COLUMNS for o in (name, "-" + name))),
        Param("cursor", "string", "Opaque position from the 'next' link of the previous "
              "page (keyset pagination).", pattern=r"[A-Za-z0-9_\-]{1,400}", max_length=400),
        Param("limit", "integer", f"Rows per page (at most {limits.api_max_limit}).",
              default=limits.api_default_limit, minimum=1, maximum=limits.api_max_limit),
        Param("format", "enum", "Output format.", default="json", choices=formats.FORMATS,
              ignore_case=True),
    ]
    return tuple(params)


operation(
    path="/api/v1/estimates", operation_id="estimates", tags=["catalogue"],
    summary="Estimates by parameter ranges, flags, model version and cone",
    description="Teff, log g, [Fe/H] estimates with uncertainties, filtered by ranges, "
                "flags and an optional cone, one page at a time (keyset pagination: follow "
                "'next' in the JSON body or the Link header).",
    params=parameters,
    responses={
        "200": {"description": "one page of rows",
                "content": content("application/json", formats.CSV_MIME,
                                   formats.VOTABLE_MIME, formats.FITS_MIME)},
        "400": {"description": "invalid parameter", **JSON_ERROR},
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
                              or not math.isfinite(value)):
        raise ParamError("cursor", "not a cursor from a 'next' link")
    return value, obsid


def keyset_condition(sort_expression, obsid_expression, descending, value, obsid):
    after = obsid_expression < obsid if descending else obsid_expression > obsid
    if value is None:
        return and_(sort_expression.is_(None), after)
    beyond = sort_expression < value if descending else sort_expression > value
    return or_(beyond, and_(sort_expression == value, after), sort_expression.is_(None))


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


def build_query(bind, args, model_version, names):
    """The statement of one page for the validated ``args`` (its rows end with the sort
    key and the obsid, for the cursor); parameterised throughout."""
    cone = _cone(args)
    order = args["order"]
    descending = order.startswith("-")
    order_name = order.lstrip("-")
    if order_name == "distance" and cone is None:
        raise ParamError("order", "ordering by distance needs a cone (ra, dec, radius)")
    if "distance" in names and cone is None:
        raise ParamError("columns", "the column 'distance' needs a cone (ra, dec, radius)")

    expressions = {name: CATALOGUE[name].expression for name in CATALOGUE}
    if cone is not None:
        expressions["distance"] = etl_db.distance_deg(spectra, cone[0], cone[1], bind)
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
    if args["cursor"]:
        value, last_obsid = decode_cursor(args["cursor"], order)
        conditions.append(keyset_condition(sort, obsid, descending, value, last_obsid)
                          if order_name != "obsid"
                          else (obsid < last_obsid if descending else obsid > last_obsid))
    rows = args["limit"] + 1
    if not page_first:
        return (select(*[expressions[n].label(n) for n in names], sort.label("_sort_key"),
                       obsid.label("_obsid_key"))
                .select_from(estimates.join(spectra, spectra.c.obsid == estimates.c.obsid))
                .where(and_(true(), *conditions))
                .order_by(*_ordering(sort, obsid, order_name, descending))
                .limit(rows))
    page = (select(estimates).where(and_(true(), *conditions))
            .order_by(*_ordering(sort, obsid, order_name, descending))
            .limit(rows).subquery("page"))

    def on_page(expression):
        return page.c[expression.name] if expression.table is estimates else expression

    return (select(*[on_page(expressions[n]).label(n) for n in names],
                   on_page(sort).label("_sort_key"), page.c.obsid.label("_obsid_key"))
            .select_from(page.join(spectra, spectra.c.obsid == page.c.obsid))
            .order_by(*_ordering(on_page(sort), page.c.obsid, order_name, descending)))


def _ordering(sort, obsid, order_name, descending):
    """ORDER BY: the sort key (nulls last), ties broken by obsid."""
    by_obsid = obsid.desc() if descending else obsid.asc()
    if order_name == "obsid":
        return [by_obsid]
    return [(sort.desc() if descending else sort.asc()).nulls_last(), by_obsid]


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
    with a cone)."""
    if names is None:
        names = list(args["columns"] or DEFAULT_COLUMNS)
        if args["columns"] is None and _cone(args) is not None:
            names.append("distance")
    with service.engine.connect() as connection:
        model_version = resolve_model_version(connection, args["model_version"])
        statement = build_query(connection, args, model_version, names)
        rows = connection.execute(statement).all()
    limit = args["limit"]
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
        query["cursor"] = page.next_cursor
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
