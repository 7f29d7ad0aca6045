"""``/tap``: IVOA Table Access Protocol 1.1 with ADQL (sync and async).

* ``/tap/sync`` (GET and POST; parameter names case-insensitive): ``LANG=ADQL``
  (``ADQL-2.0``, ``ADQL-2.1``), ``QUERY``, ``MAXREC`` (default and cap:
  LAMOST_VAC_TAP_MAXREC_DEFAULT / _MAX; 0 = metadata only), ``RESPONSEFORMAT`` (or
  ``FORMAT``): VOTable TABLEDATA (default), VOTable BINARY2, CSV, FITS. More rows than
  MAXREC: the first MAXREC and ``INFO name="QUERY_STATUS" value="OVERFLOW"`` after the
  table (DALI). ``REQUEST=doQuery`` (TAP 1.0) is accepted; unknown parameters are
  ignored.
* ``/tap/async``: UWS 1.1 job list (create, phase RUN / ABORT, executionduration,
  destruction, quote, owner, parameters, results, error, DELETE); jobs are kept by
  :mod:`service.tap_jobs` and run by a Celery worker on the ``tap`` queue, or in the
  API process when no broker is configured, with LAMOST_VAC_TAP_ASYNC_TIMEOUT_MS.
* ``/tap/tables`` (VOSI tables), ``/tap/capabilities`` (VOSI + TAPRegExt: ADQL 2.0 / 2.1
  with the geometry features, output formats, row limits, execution duration,
  retention; and the DataLink endpoint), ``/tap/availability``, ``/tap/examples`` (DALI
  examples).
* A VOTable result with a column read from a published ``obsid`` column carries a
  DataLink service descriptor referring to it (the first such column): TOPCAT and pyvo
  reach each row's FITS file, preview and record through
  :mod:`service.blueprints.datalink`. An async job keeps the URL it was created at, so
  that a worker writes the same descriptor.

The query is checked and translated by :mod:`service.adql` (refusals never reach the
database) and run on the read-only engine with the TAP statement timeout
(LAMOST_VAC_TAP_SYNC_TIMEOUT_MS). Every error is a VOTable with ``QUERY_STATUS=ERROR``
and a message naming the problem: HTTP 400 for the request or the query (an ADQL syntax
error gives its line and column), 404 for an unknown job, 503 for a timeout or an
unavailable database.

The embedded default (SQLite) has neither Q3C nor roles: every ``/tap`` endpoint
answers a VOTable error saying TAP needs PostgreSQL (HTTP 404: there is no TAP
resource on such a deployment).
"""
import datetime as dt
import decimal
import re
from dataclasses import replace
from functools import lru_cache

from flask import Blueprint, Response, redirect, request
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from werkzeug.exceptions import NotFound

from etl.schema import ColumnDescription
from etl.votable import xml_text
from service import adql, formats, tap_jobs, tap_schema, tap_upload
from service.blueprints import datalink
from service.blueprints.vosi import XML_MIME, availability as vosi_availability
from service.errors import database_error_response, error_response
from service.openapi import Param, content, operation
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


# ---------------------------------------------------------------------------------------
# OpenAPI: the GET forms of the endpoints (POST takes the same parameters as a form).
def _sync_parameters(limits):
    return (
        Param("LANG", "enum", "Query language.", required=True, choices=tuple(LANGUAGES),
              ignore_case=True),
        Param("QUERY", "string", "ADQL query.", required=True,
              max_length=adql.MAX_QUERY_CHARS, example="SELECT TOP 10 * FROM v_spectra"),
        Param("MAXREC", "integer", f"Most rows to return (default "
              f"{limits.tap_default_maxrec}, at most {limits.tap_max_records}); 0 returns "
              "the metadata only.", minimum=0),
        Param("RESPONSEFORMAT", "enum", "Output format.", default="votable",
              choices=tuple(alias for _, _, alias in OUTPUT_FORMATS), ignore_case=True),
        Param("REQUEST", "enum", "TAP 1.0 request type.", choices=("doQuery",)),
    )


def _no_parameters(limits):
    return ()


def _job_id_parameter(limits):
    return (Param("job_id", "string", "Job identifier.", location="path",
                  pattern="[0-9a-f]{32}", max_length=32),)


_VOTABLE_ERROR = {"content": content(formats.VOTABLE_MIME)}
_TAP_ERRORS = {"400": {"description": "bad request or refused query (VOTable error)",
                       **_VOTABLE_ERROR},
               "429": {"description": "too many async jobs of this client at once "
                              "(VOTable error)", **_VOTABLE_ERROR},
               "404": {"description": "no such job, or no TAP on this deployment (it "
                              "needs PostgreSQL) (VOTable error)", **_VOTABLE_ERROR},
               "503": {"description": "timeout or database unavailable (VOTable error)",
                       **_VOTABLE_ERROR}}
for _path, _summary, _params, _mimes in [
        ("/tap/sync", "TAP 1.1 synchronous ADQL query", _sync_parameters,
         (formats.VOTABLE_MIME, formats.CSV_MIME, formats.FITS_MIME)),
        ("/tap/async", "TAP 1.1 (UWS 1.1) job list", _no_parameters, ("text/xml",)),
        ("/tap/async/{job_id}", "UWS job", _job_id_parameter, ("text/xml",)),
        ("/tap/async/{job_id}/phase", "UWS job phase", _job_id_parameter, ("text/plain",)),
        ("/tap/async/{job_id}/executionduration", "UWS job execution duration [s]",
         _job_id_parameter, ("text/plain",)),
        ("/tap/async/{job_id}/destruction", "UWS job destruction time",
         _job_id_parameter, ("text/plain",)),
        ("/tap/async/{job_id}/quote", "UWS job quote", _job_id_parameter, ("text/plain",)),
        ("/tap/async/{job_id}/owner", "UWS job owner", _job_id_parameter, ("text/plain",)),
        ("/tap/async/{job_id}/parameters", "UWS job parameters", _job_id_parameter,
         ("text/xml",)),
        ("/tap/async/{job_id}/results", "UWS job results", _job_id_parameter,
         ("text/xml",)),
        ("/tap/async/{job_id}/results/result", "UWS job result", _job_id_parameter,
         (formats.VOTABLE_MIME, formats.CSV_MIME, formats.FITS_MIME)),
        ("/tap/async/{job_id}/error", "UWS job error document", _job_id_parameter,
         (formats.VOTABLE_MIME,)),
        ("/tap/tables", "VOSI tables of the TAP service", _no_parameters, ("text/xml",)),
        ("/tap/capabilities", "VOSI capabilities of the TAP service (TAPRegExt)",
         _no_parameters, ("text/xml",)),
        ("/tap/availability", "VOSI availability of the TAP service", _no_parameters,
         ("text/xml",)),
        ("/tap/examples", "DALI examples: ADQL queries", _no_parameters,
         ("application/xhtml+xml",))]:
    operation(path=_path, summary=_summary, description=_summary, params=_params,
              tags=["TAP"], operation_id=_path.strip("/").replace("/", "_")
              .replace("{", "").replace("}", ""),
              responses={"200": {"description": _summary, "content": content(*_mimes)},
                         **_TAP_ERRORS})


class TapRequestError(ValueError):
    """A bad /tap request parameter (HTTP 400, VOTable error)."""


# A whole number parameter (MAXREC, EXECUTIONDURATION, LAST): ASCII digits, few enough
# for a 64-bit integer (str.isdigit() takes "²", int() refuses more than 4300 digits).
WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")


def whole_number(name, text, what="a whole number >= 0"):
    """The value of parameter ``name``, or :class:`TapRequestError` naming it."""
    if not WHOLE_NUMBER.fullmatch(text):
        raise TapRequestError(f"{name} must be {what} (at most 18 digits), got "
                              f"{text[:40]!r}")
    return int(text)


def tap_error(message, status=400):
    return error_response(status, message)


@blueprint.before_request
def needs_postgresql():
    if not state().serves_tap:
        return tap_error("TAP needs PostgreSQL (with Q3C): this service runs on the "
                         "embedded SQLite database; set LAMOST_VAC_DATABASE_URL (and "
                         "LAMOST_VAC_READER_DATABASE_URL) to a PostgreSQL catalogue",
                         status=404)
    return None


# ---------------------------------------------------------------------------------------
# sync
def _parameters() -> dict:
    """Request parameters (query string and form), names upper-cased, first value."""
    out = {}
    for source in (request.args, request.form):
        for name in source:
            out.setdefault(name.upper(), source.get(name))
    return out


def _sync_request(params, limits):
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
        maxrec = whole_number("MAXREC", params["MAXREC"].strip())
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
    try:
        params = _parameters()
    except TapRequestError as error:
        return tap_error(str(error))
    service = state()
    return run_query(params, service.tap_engine, service.limits.tap_sync_timeout_ms)


def run_query(params, engine, timeout_ms, files=None):
    """The TAP answer to the request parameters ``params`` (upper-case names), the query
    run on ``engine`` (sync, or an async job's engine with its longer timeout);
    ``files``: the uploaded parts (default: the request's)."""
    limits = state().limits
    try:
        query, maxrec, (fmt, serialization) = _sync_request(params, limits)
        uploads = (tap_upload.read_uploads(
            params["UPLOAD"], request.files if files is None else files,
            limits.tap_upload_max_rows, limits.tap_upload_max_bytes, _own_result)
            if params.get("UPLOAD") else {})
        translation = adql.translate(query, maxrows=maxrec + 1, uploads=uploads)
    except (TapRequestError, adql.AdqlError, tap_upload.UploadError) as error:
        return tap_error(str(error))
    try:
        with engine.connect() as connection:
            result = connection.exec_driver_sql(translation.sql, translation.parameters)
            description = result.cursor.description
            rows = result.fetchall()
    except SQLAlchemyError as error:
        return _database_error(error, timeout_ms)
    columns, obsid_columns = output_columns(translation.tree, description)
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
    # Every row with an obsid leads to its spectrum's DataLink links.
    descriptors = [datalink.links_descriptor(obsid_columns[0])] if obsid_columns else []
    body = formats.votable_document(columns, rows, status_infos=status_infos,
                                    post_infos=post_infos, serialization=serialization,
                                    resources=descriptors)
    mimetype = formats.VOTABLE_MIME + (";serialization=BINARY2"
                                       if serialization == "binary2" else "")
    return Response(body, mimetype=mimetype, headers=headers)


# SQLSTATE classes of errors in the query itself (answered 400 with the database's
# message): 21 cardinality, 22 data exception (division by zero, bad cast), 42 syntax
# or access rule (ambiguous column, no such column, type mismatch), 54 program limit
# (stack depth, too many columns).
QUERY_ERROR_CLASSES = ("21", "22", "42", "54")
# Q3C refuses bad geometry with an internal error (SQLSTATE XX000): these messages are
# about the query's values (e.g. a declination read from a column), answered 400.
Q3C_INPUT_ERRORS = (
    ("The absolute value of declination > 90", "a CIRCLE or POLYGON declination must be "
     "between -90 and 90 degrees"),
    ("The values of ra,dec,radius are infinites or NaNs", "a CIRCLE's centre and radius "
     "must be finite numbers"),
    ("Right Ascensions and raddii must be not null", "a CIRCLE's centre and radius must "
     "not be NULL"),
    ("The polygon is too large", "a POLYGON must be smaller than about 23 degrees across"),
    ("Invalid polygon", "a POLYGON needs at least three vertices"),
)


LONG_DIGITS = re.compile(r"[0-9]{41,}")


def _database_error(error, timeout_ms):
    original = getattr(error, "orig", None)
    sqlstate = getattr(original, "sqlstate", None) or ""
    if isinstance(error, DBAPIError) and sqlstate[:2] in QUERY_ERROR_CLASSES:
        message = str(getattr(getattr(original, "diag", None), "message_primary", None)
                      or original)
        # It can quote a literal of thousands of digits: keep their start.
        message = LONG_DIGITS.sub(lambda m: f"{m.group()[:20]}...({len(m.group())} digits)",
                                  message)
        if len(message) > 1000:
            message = message[:1000] + "..."
        return tap_error(f"the query failed in the database: {message}")
    if isinstance(error, DBAPIError) and sqlstate == "XX000":
        message = getattr(getattr(original, "diag", None), "message_primary", None) or ""
        for start, hint in Q3C_INPUT_ERRORS:
            if message.startswith(start):
                return tap_error(f"the query failed in the database: {message} ({hint})")
    if isinstance(error, DBAPIError) and sqlstate[:2] == "53":
        return tap_error("the database ran out of resources (memory, temporary disk) for "
                         "this query; narrow it", status=503)
    status, message = database_error_response(error)
    if status == 503 and "statement timeout" in message:
        message = (f"the query ran past the TAP timeout of {timeout_ms} ms; narrow it "
                   "(a cone, TOP, tighter conditions) or run it as an async job")
    return tap_error(message, status=status)


def output_columns(tree, description) -> tuple:
    """(column descriptions, names of the columns holding a spectrum's obsid) of a
    result: a column read from a published table keeps its metadata (unit, UCD,
    description, datatype); others get the type the database reports. Names are made
    unique (VOTable FIELD IDs). Every published ``obsid`` column is a spectrum's."""
    scope = _tables_in_scope(tree)
    projections = list(tree.expressions) if hasattr(tree, "expressions") else []
    by_position = len(projections) == len(description) and not any(
        p.is_star for p in projections)
    out, obsids, seen = [], [], set()
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
        if known is not None and known.name == "obsid" and column.kind == "int":
            obsids.append(unique)
    return out, obsids


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
        if isinstance(table, exp.Subquery) and "published_table" in table.meta:
            scope[table.alias_or_name.lower()] = published[table.meta["published_table"]]
        elif isinstance(table, exp.Table):
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
# async: UWS 1.1 job list
UWS_NS = ('xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" '
          'xmlns:xlink="http://www.w3.org/1999/xlink" '
          'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"')
JOB_PARAMETERS = ("REQUEST", "LANG", "QUERY", "MAXREC", "RESPONSEFORMAT", "FORMAT",
                  "RUNID", "UPLOAD")


def _store():
    return tap_jobs.JobStore(state().settings.tap_job_dir)


def _job_or_404(job_id):
    job = _store().load(job_id)
    if job is None:
        raise NotFound(f"no job {job_id[:40]!r}: it never existed, was deleted or has "
                       "passed its destruction time")
    return job


def _see_other(path):
    return redirect(request.host_url.rstrip("/") + path, code=303)


def _job_path(job):
    return f"/tap/async/{job.job_id}"


def _text(value):
    return Response("" if value is None else str(value), mimetype="text/plain")


def _element(name, value):
    if value is None:
        return f'  <uws:{name} xsi:nil="true"/>\n'
    return f"  <uws:{name}>{xml_text(str(value))}</uws:{name}>\n"


def _parameters_xml(job, indent="  "):
    # Text XML 1.0 cannot hold (control characters a client sent) is left out.
    items = "".join(f'{indent}  <uws:parameter id="{xml_text(name.lower())}">'
                    f"{xml_text(str(value))}</uws:parameter>\n"
                    for name, value in job.parameters.items())
    return f"{indent}<uws:parameters>\n{items}{indent}</uws:parameters>\n"


def _results_xml(job, indent="  "):
    href = formats.escape(request.host_url.rstrip("/") + _job_path(job) + "/results/result")
    items = (f'{indent}  <uws:result id="result" xlink:href="{href}"/>\n'
             if job.phase == tap_jobs.COMPLETED else "")
    return f"{indent}<uws:results>\n{items}{indent}</uws:results>\n"


def _job_xml(job):
    error = ""
    if job.phase == tap_jobs.ERROR:
        error = ('  <uws:errorSummary type="fatal" hasDetail="true">\n'
                 f"    <uws:message>{xml_text(job.error or '')}</uws:message>\n"
                 "  </uws:errorSummary>\n")
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:job {UWS_NS} version="1.1">\n'
            + _element("jobId", job.job_id)
            + (_element("runId", job.parameters["RUNID"]) if "RUNID" in job.parameters
               else "")
            + _element("ownerId", None) + _element("phase", job.phase)
            + _element("quote", None) + _element("creationTime", job.creation_time)
            + _element("startTime", job.start_time) + _element("endTime", job.end_time)
            + _element("executionDuration", job.execution_duration)
            + _element("destruction", job.destruction)
            + _parameters_xml(job) + _results_xml(job) + error + "</uws:job>\n")
    return Response(body, mimetype=XML_MIME)


def _job_parameters():
    """The job's TAP parameters; others are ignored, as DALI asks."""
    return {k: v for k, v in _parameters().items() if k in JOB_PARAMETERS}


class TooManyJobs(Exception):
    pass


def _start(job):
    """PENDING -> QUEUED, then to a worker (or run here without a broker); refused
    when the client already has its maximum of jobs queued or executing."""
    limit = state().limits.tap_async_jobs_per_client
    active = [j for j in _store().jobs()
              if j.client == job.client and j.phase in tap_jobs.ACTIVE_PHASES]
    if len(active) >= limit:
        raise TooManyJobs(f"this client already has {len(active)} jobs queued or "
                          f"executing, the most it may have at once ({limit}); run this "
                          "one when one of them has finished")
    job.phase = tap_jobs.QUEUED
    _store().save(job)
    tap_jobs.dispatch(state().settings, job.job_id, run_async_job)


def run_async_job(job_id):
    """Run a QUEUED job in this process (no broker; or in the worker, within a request
    context of its app): the /tap/sync answer with the async engine and timeout."""
    service, store = state(), _store()
    tap_jobs.run_job(store, job_id, lambda job: run_query(
        job.parameters, service.tap_async_engine, service.limits.tap_async_timeout_ms,
        files=store.upload_files(job)))


_OWN_RESULT = re.compile(r"/tap/async/([0-9a-f]{32})/results/result")


def _own_result(url: str):
    """The bytes of a result of this service's jobs named by ``url`` (an UPLOAD by
    URL), or None: the service never fetches other URLs (no requests on a client's
    behalf)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    match = _OWN_RESULT.fullmatch(parts.path)
    if match is None or parts.query or parts.fragment:
        return None
    job = _store().load(match.group(1))
    if job is None or job.phase != tap_jobs.COMPLETED:
        return None
    return _store().read_document(job.job_id, "result")


@blueprint.get("/async")
def job_list():
    phases = {p.upper() for p in request.args.getlist("PHASE")}
    last = None
    if request.args.get("LAST", "").strip():
        try:
            last = whole_number("LAST", request.args["LAST"].strip())
        except TapRequestError as error:
            return tap_error(str(error))
    jobs = [j for j in _store().jobs() if not phases or j.phase in phases]
    if last is not None:
        jobs = jobs[-last:] if last else []
    base = request.host_url.rstrip("/")
    refs = "".join(
        f'  <uws:jobref id="{j.job_id}" xlink:href="{formats.escape(base + _job_path(j))}">'
        f"<uws:phase>{j.phase}</uws:phase>"
        f"<uws:creationTime>{j.creation_time}</uws:creationTime></uws:jobref>\n"
        for j in jobs)
    return Response(f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:jobs {UWS_NS} '
                    f'version="1.1">\n{refs}</uws:jobs>\n', mimetype=XML_MIME)


@blueprint.post("/async")
def create_job():
    parameters = _job_parameters()
    limits = state().limits
    kept = sum(j.client == request.remote_addr for j in _store().jobs())
    if kept >= limits.tap_async_kept_jobs_per_client:
        return tap_error(f"this client keeps {kept} jobs, the most it may keep "
                         f"({limits.tap_async_kept_jobs_per_client}); DELETE the ones "
                         "it no longer needs", status=429)
    # Only the parts UPLOAD names are kept, all of them together at most the upload
    # limit: a job must not keep whatever else a request carries on disk.
    parts, stored, most = {}, 0, limits.tap_upload_max_bytes
    for name in tap_jobs.upload_part_names(parameters.get("UPLOAD")):
        part = request.files.get(name)
        if part is None:
            continue                    # the run says so, as /tap/sync would
        data = part.read(most - stored + 1)
        stored += len(data)
        if stored > most:
            return tap_error(f"UPLOAD: the parts UPLOAD names may hold {most} bytes "
                             f"together (LAMOST_VAC_TAP_UPLOAD_MAX_BYTES); with part "
                             f"{name[:40]!r} this job's have more")
        parts[name] = data
    job = _store().create(parameters, max(1, limits.tap_async_timeout_ms // 1000),
                          limits.tap_retention_s, client=request.remote_addr,
                          base_url=request.host_url)
    if parts:
        _store().store_uploads(job, parts)
    if _parameters().get("PHASE", "").upper() == "RUN":
        try:
            _start(job)
        except TooManyJobs as error:    # the job stays PENDING: run it later
            return tap_error(str(error), status=429)
    return _see_other(_job_path(job))


@blueprint.route("/async/<job_id>", methods=["GET", "POST", "DELETE"])
def job(job_id):
    job = _job_or_404(job_id)
    if request.method == "GET":
        return _job_xml(job)
    action = _parameters().get("ACTION", "").upper()
    if request.method == "DELETE" or action == "DELETE":
        _store().delete(job.job_id)
        return _see_other("/tap/async")
    return tap_error("POST to a job takes ACTION=DELETE; the phase is set at its /phase")


@blueprint.route("/async/<job_id>/phase", methods=["GET", "POST"])
def job_phase(job_id):
    job = _job_or_404(job_id)
    if request.method == "GET":
        return _text(job.phase)
    phase = _parameters().get("PHASE", "").upper()
    if phase == "RUN":
        if job.phase != tap_jobs.PENDING:
            return tap_error(f"the job is {job.phase}; only a PENDING job can be run")
        try:
            _start(job)
        except TooManyJobs as error:
            return tap_error(str(error), status=429)
    elif phase == "ABORT":
        if job.phase in (tap_jobs.PENDING,) + tap_jobs.ACTIVE_PHASES:
            job.phase, job.end_time = tap_jobs.ABORTED, tap_jobs.iso(tap_jobs.utc_now())
            _store().save(job)
    else:
        return tap_error("PHASE must be RUN or ABORT")
    return _see_other(_job_path(job))


@blueprint.route("/async/<job_id>/executionduration", methods=["GET", "POST"])
def job_execution_duration(job_id):
    job = _job_or_404(job_id)
    if request.method == "GET":
        return _text(job.execution_duration)
    try:
        value = whole_number("EXECUTIONDURATION",
                             _parameters().get("EXECUTIONDURATION", "").strip(),
                             "a whole number of seconds")
    except TapRequestError as error:
        return tap_error(str(error))
    hard = max(1, state().limits.tap_async_timeout_ms // 1000)
    if job.phase == tap_jobs.PENDING:
        job.execution_duration = min(value, hard) if value > 0 else hard
        _store().save(job)
    return _see_other(_job_path(job))


@blueprint.route("/async/<job_id>/destruction", methods=["GET", "POST"])
def job_destruction(job_id):
    job = _job_or_404(job_id)
    if request.method == "GET":
        return _text(job.destruction)
    try:
        wanted = tap_jobs.parse_iso(_parameters().get("DESTRUCTION", ""))
    except ValueError:
        return tap_error("DESTRUCTION must be an ISO 8601 time, e.g. 2030-01-01T00:00:00Z")
    if wanted <= tap_jobs.utc_now():
        return tap_error(f"DESTRUCTION must be in the future, got {tap_jobs.iso(wanted)}; "
                         "DELETE the job to destroy it now")
    latest = tap_jobs.parse_iso(job.creation_time) + dt.timedelta(
        seconds=state().limits.tap_retention_s)
    job.destruction = tap_jobs.iso(min(wanted, latest))
    _store().save(job)
    return _see_other(_job_path(job))


@blueprint.get("/async/<job_id>/quote")
def job_quote(job_id):
    return _text(_job_or_404(job_id) and "")


@blueprint.get("/async/<job_id>/owner")
def job_owner(job_id):
    return _text(_job_or_404(job_id) and "")


@blueprint.route("/async/<job_id>/parameters", methods=["GET", "POST"])
def job_parameters(job_id):
    job = _job_or_404(job_id)
    if request.method == "POST":
        if job.phase != tap_jobs.PENDING:
            return tap_error(f"the job is {job.phase}; parameters change only while "
                             "it is PENDING")
        job.parameters.update(_job_parameters())
        _store().save(job)
        return _see_other(_job_path(job))
    return Response('<?xml version="1.0" encoding="UTF-8"?>\n'
                    + _parameters_xml(job, indent="").replace(
                        "<uws:parameters>", f"<uws:parameters {UWS_NS}>", 1),
                    mimetype=XML_MIME)


@blueprint.get("/async/<job_id>/results")
def job_results(job_id):
    job = _job_or_404(job_id)
    return Response('<?xml version="1.0" encoding="UTF-8"?>\n'
                    + _results_xml(job, indent="").replace(
                        "<uws:results>", f"<uws:results {UWS_NS}>", 1),
                    mimetype=XML_MIME)


@blueprint.get("/async/<job_id>/results/result")
def job_result(job_id):
    job = _job_or_404(job_id)
    data = _store().read_document(job.job_id, "result")
    if job.phase != tap_jobs.COMPLETED or data is None:
        raise NotFound(f"the job is {job.phase}: it has no result")
    return Response(data, content_type=job.result_mime)


@blueprint.get("/async/<job_id>/error")
def job_error(job_id):
    job = _job_or_404(job_id)
    data = _store().read_document(job.job_id, "error")
    if job.phase != tap_jobs.ERROR or data is None:
        raise NotFound(f"the job is {job.phase}: it has no error")
    return Response(data, mimetype=formats.VOTABLE_MIME)


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
    seconds = max(1, limits.tap_async_timeout_ms // 1000)
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
        '    <uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-inline"/>\n'
        '    <uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-http"/>\n'
        "    <retentionPeriod>\n"
        f"      <default>{limits.tap_retention_s}</default>\n"
        f"      <hard>{limits.tap_retention_s}</hard>\n"
        "    </retentionPeriod>\n"
        "    <executionDuration>\n"
        f"      <default>{seconds}</default>\n      <hard>{seconds}</hard>\n"
        "    </executionDuration>\n"
        "    <outputLimit>\n"
        f'      <default unit="row">{limits.tap_default_maxrec}</default>\n'
        f'      <hard unit="row">{limits.tap_max_records}</hard>\n'
        "    </outputLimit>\n"
        "    <uploadLimit>\n"
        f'      <hard unit="byte">{limits.tap_upload_max_bytes}</hard>\n'
        "    </uploadLimit>\n"
        "  </capability>\n"
        + datalink.capability(base, limits)
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
