"""``/tap``: IVOA Table Access Protocol 1.1 (synchronous queries) with ADQL.

* ``/tap/sync`` (GET and POST; parameter names case-insensitive): ``LANG=ADQL``
  (``ADQL-2.0``, ``ADQL-2.1``), ``QUERY``, ``MAXREC`` (default and cap:
  LAMOST_VAC_TAP_MAXREC_DEFAULT / _MAX; 0 = metadata only), ``RESPONSEFORMAT`` (or
  ``FORMAT``): VOTable TABLEDATA (default), VOTable BINARY2, CSV, FITS. More rows than
  MAXREC: the first MAXREC and ``INFO name="QUERY_STATUS" value="OVERFLOW"`` after the
  table (DALI). ``REQUEST=doQuery`` (TAP 1.0) is accepted.
* ``/tap/tables`` (VOSI tables), ``/tap/capabilities`` (VOSI + TAPRegExt: ADQL 2.0 / 2.1
  with the geometry features, output formats, row limits, execution duration),
  ``/tap/availability``, ``/tap/examples`` (DALI examples).

The query is checked and translated by :mod:`service.adql` (refusals never reach the
database) and run on the read-only engine with the TAP statement timeout
(LAMOST_VAC_TAP_SYNC_TIMEOUT_MS). Every error is a VOTable with ``QUERY_STATUS=ERROR``
and a message naming the problem: HTTP 400 for the request or the query (an ADQL syntax
error gives its line and column), 503 for a timeout or an unavailable database.

The embedded default (SQLite) has neither Q3C nor roles: every ``/tap`` endpoint
answers a VOTable error saying TAP needs PostgreSQL.
"""
import decimal
from dataclasses import replace
from functools import lru_cache

from flask import Blueprint, Response, request
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from etl.schema import ColumnDescription
from service import adql, formats, tap_schema
from service.blueprints.vosi import XML_MIME, availability as vosi_availability
from service.errors import database_error_response, error_response
from service.state import state

blueprint = Blueprint("tap", __name__, url_prefix="/tap")

STANDARD_ID = "ivo://ivoa.net/std/TAP"
LANGUAGES = {"ADQL": "2.0", "ADQL-2.0": "2.0", "ADQL-2.1": "2.1"}
# RESPONSEFORMAT value (lower case) -> (format, VOTable serialization)
RESPONSE_FORMATS = {
    "votable": ("votable", "tabledata"), formats.VOTABLE_MIME: ("votable", "tabledata"),
    "text/xml": ("votable", "tabledata"),
    f"{formats.VOTABLE_MIME};serialization=tabledata": ("votable", "tabledata"),
    "votable/td": ("votable", "tabledata"),
    "binary2": ("votable", "binary2"), "votable/b2": ("votable", "binary2"),
    f"{formats.VOTABLE_MIME};serialization=binary2": ("votable", "binary2"),
    "csv": ("csv", None), formats.CSV_MIME: ("csv", None),
    "text/csv;header=present": ("csv", None),
    "fits": ("fits", None), formats.FITS_MIME: ("fits", None),
}
OUTPUT_FORMATS = [  # (TAPRegExt ivo-id, MIME type, alias)
    ("ivo://ivoa.net/std/TAPRegExt#output-votable-td", formats.VOTABLE_MIME, "votable"),
    ("ivo://ivoa.net/std/TAPRegExt#output-votable-binary2",
     f"{formats.VOTABLE_MIME};serialization=BINARY2", "binary2"),
    (None, "text/csv;header=present", "csv"),
    (None, formats.FITS_MIME, "fits"),
]
ADQL_FEATURES = {
    "ivo://ivoa.net/std/TAPRegExt#features-adqlgeo":
        ["POINT", "CIRCLE", "POLYGON", "CONTAINS", "INTERSECTS", "DISTANCE", "COORD1",
         "COORD2"],
    "ivo://ivoa.net/std/TAPRegExt#features-adql-string": ["LOWER", "UPPER", "ILIKE"],
    "ivo://ivoa.net/std/TAPRegExt#features-adql-sets": ["UNION", "EXCEPT", "INTERSECT"],
    "ivo://ivoa.net/std/TAPRegExt#features-adql-common-table": ["WITH"],
    "ivo://ivoa.net/std/TAPRegExt#features-adql-offset": ["OFFSET"],
    "ivo://ivoa.net/std/TAPRegExt#features-adql-type": ["CAST"],
}
# PostgreSQL type OIDs -> (kind, VOTable datatype), for result columns that are not a
# published column.
PG_TYPES = {16: ("bool", "boolean"), 20: ("int", "long"), 21: ("int", "short"),
            23: ("int", "int"), 26: ("int", "long"), 700: ("float", "float"),
            701: ("float", "double"), 1700: ("float", "double"),
            1082: ("datetime", None), 1114: ("datetime", None), 1184: ("datetime", None)}
TEXT_KINDS = {"text", "json"}
DISTANCE = ColumnDescription("distance", "float", "deg", "pos.angDistance",
                             "angular distance (great circle, ICRS)", True)
# (identifier, name, what it shows, ADQL): served at /tap/examples, run by the tests.
EXAMPLES = [
    ("cone", "A 1-arcmin cone",
     "Catalogue rows within 1 arcmin of a position (the Q3C index serves it).",
     "SELECT obsid, ra, dec, teff, teff_err, logg, logg_err, feh, feh_err, flags\n"
     "FROM v_current_estimates\n"
     "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 150.0, 30.0, 0.0166667))"),
    ("nearest", "The ten nearest spectra",
     "The ten spectra nearest to a position, with their distance in degrees.",
     "SELECT TOP 10 obsid, DISTANCE(POINT('ICRS', ra, dec), POINT('ICRS', 150.0, 30.0))"
     " AS dist\nFROM v_spectra\n"
     "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 150.0, 30.0, 0.5))\n"
     "ORDER BY dist"),
    ("kiel", "A Kiel-diagram selection",
     "Teff, log g and [Fe/H] of good-quality giants with a high signal-to-noise ratio.",
     "SELECT TOP 5000 obsid, teff, logg, feh\nFROM v_current_estimates\n"
     "WHERE snrg > 30 AND flags = 0 AND logg < 3.5 AND teff BETWEEN 4000 AND 5500"),
    ("reference", "Estimates against the reference labels",
     "Each spectrum's estimate next to its best-matching reference star's labels.",
     "SELECT TOP 1000 e.obsid, e.teff, b.teff AS teff_ref, e.teff - b.teff AS dteff,\n"
     "       e.logg, b.logg AS logg_ref, e.feh, b.feh AS feh_ref, b.separation_arcsec\n"
     "FROM v_current_estimates AS e JOIN v_best_match AS b ON b.obsid = e.obsid\n"
     "WHERE b.label_set = 'apogee-payne'"),
]


class TapRequestError(ValueError):
    """A bad /tap request parameter (HTTP 400, VOTable error)."""


def tap_error(message, status=400):
    return error_response(status, message)


@blueprint.before_request
def needs_postgresql():
    if state().tap_engine is None or state().tap_engine.dialect.name != "postgresql":
        return tap_error("TAP needs PostgreSQL (with Q3C): this service runs on the "
                         "embedded SQLite database; set LAMOST_VAC_DATABASE_URL (and "
                         "LAMOST_VAC_READER_DATABASE_URL) to a PostgreSQL catalogue",
                         status=501)
    return None


# ---------------------------------------------------------------------------------------
# sync
def _parameters() -> dict:
    """Request parameters (query string and form), names upper-cased, first value."""
    out = {}
    for source in (request.args, request.form):
        for name in source:
            out.setdefault(name.upper(), source.get(name))
    if request.files:
        raise TapRequestError("UPLOAD is not supported by this service yet")
    return out


def _sync_request(params, limits):
    if "UPLOAD" in params:
        raise TapRequestError("UPLOAD is not supported by this service yet")
    if params.get("REQUEST", "doQuery").strip().lower() != "doquery":
        raise TapRequestError(f"REQUEST={params['REQUEST']!r} is not supported; "
                              "use REQUEST=doQuery or leave it out")
    if "LANG" not in params:
        raise TapRequestError("LANG is required: LANG=ADQL")
    language = params["LANG"].strip().upper()
    if language not in LANGUAGES:
        raise TapRequestError(f"LANG={params['LANG']!r} is not supported; this service "
                              "takes ADQL (ADQL-2.0, ADQL-2.1)")
    query = params.get("QUERY")
    if query is None or not query.strip():
        raise TapRequestError("QUERY is required: an ADQL query")
    maxrec = limits.tap_default_maxrec
    if params.get("MAXREC", "").strip():
        text = params["MAXREC"].strip()
        if not text.isascii() or not text.isdigit():
            raise TapRequestError(f"MAXREC must be a whole number >= 0, got {text[:40]!r}")
        maxrec = int(text)
    maxrec = min(maxrec, limits.tap_max_records)
    fmt = (params.get("RESPONSEFORMAT") or params.get("FORMAT") or "votable").strip()
    key = fmt.lower().replace(" ", "")
    if key not in RESPONSE_FORMATS:
        raise TapRequestError(f"RESPONSEFORMAT={fmt[:60]!r} is not supported; use one of "
                              + ", ".join(alias for _, _, alias in OUTPUT_FORMATS)
                              + " or their MIME types")
    return query, maxrec, RESPONSE_FORMATS[key]


@blueprint.route("/sync", methods=["GET", "POST"])
def sync():
    service = state()
    try:
        query, maxrec, (fmt, serialization) = _sync_request(_parameters(), service.limits)
        translation = adql.translate(query, maxrows=maxrec + 1)
    except (TapRequestError, adql.AdqlError) as error:
        return tap_error(str(error))
    try:
        with service.tap_engine.connect() as connection:
            result = connection.exec_driver_sql(translation.sql)
            description = result.cursor.description
            rows = result.fetchall()
    except SQLAlchemyError as error:
        return _database_error(error)
    columns = output_columns(translation.tree, description)
    rows = [tuple(float(v) if isinstance(v, decimal.Decimal) else v for v in row)
            for row in rows]
    overflow = len(rows) > maxrec
    rows = rows[:maxrec]
    status = "OVERFLOW" if overflow else "OK"
    headers = {"X-Query-Status": status}
    if fmt != "votable":
        return formats.render(fmt, columns, rows, filename="tap", headers=headers)
    status_infos = [formats.Info("QUERY_STATUS", "OK"),
                    formats.Info("QUERY", query),
                    formats.Info("MAXREC", str(maxrec))]
    post_infos = [formats.Info("QUERY_STATUS", "OVERFLOW",
                               f"truncated to MAXREC={maxrec} rows")] if overflow else []
    body = formats.votable_document(columns, rows, status_infos=status_infos,
                                    post_infos=post_infos, serialization=serialization)
    mimetype = formats.VOTABLE_MIME + (";serialization=BINARY2"
                                       if serialization == "binary2" else "")
    return Response(body, mimetype=mimetype, headers=headers)


# SQLSTATE classes of errors in the query itself (answered 400 with the database's
# message): 21 cardinality, 22 data exception (division by zero, bad cast), 42 syntax
# or access rule (ambiguous column, no such column, type mismatch).
QUERY_ERROR_CLASSES = ("21", "22", "42")


def _database_error(error):
    original = getattr(error, "orig", None)
    sqlstate = getattr(original, "sqlstate", None) or ""
    if isinstance(error, DBAPIError) and sqlstate[:2] in QUERY_ERROR_CLASSES:
        message = getattr(getattr(original, "diag", None), "message_primary", None)
        return tap_error(f"the query failed in the database: {message or original}")
    status, message = database_error_response(error)
    if status == 503 and "statement timeout" in message:
        message = (f"the query ran past the TAP timeout of "
                   f"{state().limits.tap_sync_timeout_ms} ms; narrow it (a cone, TOP, "
                   "tighter conditions)")
    return tap_error(message, status=status)


def output_columns(tree, description) -> list:
    """Column descriptions of a result: a column read from a published table keeps its
    metadata (unit, UCD, description, datatype); others get the type the database
    reports. Names are made unique (VOTable FIELD IDs)."""
    scope = _tables_in_scope(tree)
    projections = list(tree.expressions) if hasattr(tree, "expressions") else []
    by_position = len(projections) == len(description) and not any(
        p.is_star for p in projections)
    out, seen = [], set()
    for index, item in enumerate(description):
        name = item.name if item.name and item.name != "?column?" else f"col{index + 1}"
        kind, datatype = PG_TYPES.get(item.type_code, ("text", None))
        if by_position:
            known = _projection_column(projections[index], scope)
        else:
            known = _lookup(None, item.name, scope)
        if known is not None and (known.kind == kind or {known.kind, kind} <= {"int", "float"}
                                  or (known.kind in TEXT_KINDS and kind == "text")):
            column = replace(known, name=name, nullable=True)
        else:
            column = tap_schema.TypedColumn(name, kind, None, None, "", True, datatype)
        unique, number = name, 1
        while unique.lower() in seen:
            number += 1
            unique = f"{name}_{number}"
        seen.add(unique.lower())
        out.append(replace(column, name=unique))
    return out


def _tables_in_scope(tree) -> dict:
    """{alias or name: PublishedTable} of the outermost SELECT's FROM and JOINs."""
    from sqlglot import exp

    select = tree if isinstance(tree, exp.Select) else next(tree.find_all(exp.Select), None)
    published = tap_schema.published_tables()
    scope = {}
    if select is None:
        return scope
    sources = [select.args.get("from_")] + list(select.args.get("joins") or [])
    for source in sources:
        table = getattr(source, "this", None)
        if isinstance(table, exp.Table):
            name = table.name.lower()
            if name.startswith(tap_schema.cte_name("")):
                name = f"{tap_schema.TAP_SCHEMA}.{name[len(tap_schema.cte_name('')):]}"
            if name in published:
                scope[table.alias_or_name.lower()] = published[name]
    return scope


def _lookup(qualifier, name, scope):
    tables = [scope[qualifier.lower()]] if qualifier and qualifier.lower() in scope \
        else scope.values()
    for table in tables:
        column = table.column(name.lower())
        if column is not None:
            return column.description
    return None


def _projection_column(projection, scope):
    from sqlglot import exp

    node = projection.this if isinstance(projection, exp.Alias) else projection
    if isinstance(node, exp.Column):
        return _lookup(node.table, node.name, scope)
    if isinstance(node, exp.Anonymous) and node.name.lower() == "q3c_dist":
        return DISTANCE
    return None


# ---------------------------------------------------------------------------------------
# VOSI and DALI documents
@blueprint.get("/tables")
def tables():
    return Response(tap_schema.vosi_tableset(), mimetype=XML_MIME)


@blueprint.get("/availability")
def availability():
    return vosi_availability()


@lru_cache(maxsize=4)
def _capabilities_body(base, limits):
    esc = formats.escape

    def simple(standard_id, path):
        return (f'  <capability standardID="{standard_id}">\n'
                '    <interface xsi:type="vs:ParamHTTP">\n'
                f'      <accessURL use="full">{esc(base + path)}</accessURL>\n'
                "    </interface>\n  </capability>\n")

    versions = "".join(f'      <version ivo-id="ivo://ivoa.net/std/ADQL#v{v}">{v}</version>\n'
                       for v in ("2.0", "2.1"))
    features = "".join(
        f'      <languageFeatures type="{kind}">\n'
        + "".join(f"        <feature><form>{form}</form></feature>\n" for form in forms)
        + "      </languageFeatures>\n" for kind, forms in ADQL_FEATURES.items())
    outputs = "".join(
        "    <outputFormat" + (f' ivo-id="{ivo_id}"' if ivo_id else "") + ">\n"
        f"      <mime>{esc(mime)}</mime>\n      <alias>{alias}</alias>\n"
        "    </outputFormat>\n" for ivo_id, mime, alias in OUTPUT_FORMATS)
    seconds = max(1, limits.tap_sync_timeout_ms // 1000)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
        'xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0">\n'
        f'  <capability standardID="{STANDARD_ID}" xsi:type="tr:TableAccess">\n'
        '    <interface xsi:type="vs:ParamHTTP" role="std" version="1.1">\n'
        f'      <accessURL use="base">{esc(base)}/tap</accessURL>\n'
        "    </interface>\n"
        "    <language>\n      <name>ADQL</name>\n"
        f"{versions}"
        "      <description>ADQL 2.0/2.1 translated to PostgreSQL; geometry through "
        "Q3C (points in circles and polygons, distances), ICRS only.</description>\n"
        f"{features}"
        "    </language>\n"
        f"{outputs}"
        f"    <executionDuration>\n      <hard>{seconds}</hard>\n    </executionDuration>\n"
        "    <outputLimit>\n"
        f'      <default unit="row">{limits.tap_default_maxrec}</default>\n'
        f'      <hard unit="row">{limits.tap_max_records}</hard>\n'
        "    </outputLimit>\n"
        "  </capability>\n"
        + simple("ivo://ivoa.net/std/VOSI#capabilities", "/tap/capabilities")
        + simple("ivo://ivoa.net/std/VOSI#availability", "/tap/availability")
        + simple("ivo://ivoa.net/std/VOSI#tables", "/tap/tables")
        + simple("ivo://ivoa.net/std/DALI#examples", "/tap/examples")
        + "</vosi:capabilities>\n")


@blueprint.get("/capabilities")
def capabilities():
    return Response(_capabilities_body(request.host_url.rstrip("/"), state().limits),
                    mimetype=XML_MIME)


@blueprint.get("/examples")
def examples():
    esc = formats.escape
    items = "".join(
        f'  <div typeof="example" id="{identifier}" resource="#{identifier}">\n'
        f'    <h2 property="name">{esc(name)}</h2>\n'
        f"    <p>{esc(text)}</p>\n"
        f'    <pre property="query">{esc(query)}</pre>\n  </div>\n'
        for identifier, name, text, query in EXAMPLES)
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml">\n'
            "<head><title>Example ADQL queries of the LAMOST VAC TAP service</title></head>\n"
            '<body vocab="http://www.ivoa.net/rdf/examples#">\n'
            "  <h1>Example ADQL queries</h1>\n" + items + "</body>\n</html>\n")
    return Response(body, mimetype="application/xhtml+xml")
