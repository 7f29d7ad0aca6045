"""``GET /scs``: IVOA Simple Cone Search (SCS 1.03 / 1.1, DALI conventions).

Parameters (names case-insensitive): RA, DEC, SR (ICRS decimal degrees), VERB (1, 2, 3),
MAXREC, RESPONSEFORMAT (votable (default), csv, json, fits). Unknown parameters are
ignored, as DALI asks.

The answer is one RESOURCE type="results" with one TABLE, rows ordered by the true angular
distance (column ``distance``, degrees) then obsid; the identifier and position carry the
SCS UCDs ID_MAIN, POS_EQ_RA_MAIN, POS_EQ_DEC_MAIN, the other columns the UCDs of the
schema. Only estimates of the current model are returned. SR=0 or MAXREC=0: metadata
only (no rows). More rows than MAXREC (or than the service's hard cap): the first MAXREC
and an ``INFO name="QUERY_STATUS" value="OVERFLOW"`` after the table. A DataLink service
descriptor after the results leads from each row's obsid to its spectrum's links
(:mod:`service.blueprints.datalink`).

Errors are a VOTable with ``INFO name="QUERY_STATUS" value="ERROR"``: a bad parameter is
named and served with HTTP 200 as SCS clients (pyvo, TOPCAT, STILTS) expect, so they can
show the message; a cone wider than the small-cone radius beyond the client's or the
service's concurrency limit is HTTP 429 with Retry-After; a timeout or an unreachable
database is HTTP 503.
"""
from functools import lru_cache

from flask import Blueprint, Response, request
from sqlalchemy import Float, Integer, bindparam, func, select, true
from sqlalchemy.exc import SQLAlchemyError

from etl import db as etl_db
from etl import schema
from etl.votable import tabledata_row_sql
from models.labels import estimate_columns
from service import formats
from service.blueprints import datalink
from service.catalogue import (CATALOGUE, MIN_INDEX_RADIUS_DEG, cone_centre, cone_filter,
                               current_model_version)
from service.errors import database_error_response, error_response
from service.openapi import Param, ParamError, content, operation, parse
from service.state import is_small_cone, large_query, state

blueprint = Blueprint("scs", __name__)

VERB_COLUMNS = {
    1: ["obsid", "ra", "dec", "distance"],
    2: ["obsid", "ra", "dec", "distance", "designation", "snrg",
        *estimate_columns(suffixes=("", "_err")), "flags", "model_version"],
}
VERB_COLUMNS[3] = VERB_COLUMNS[2] + [
    name for name in CATALOGUE if name not in VERB_COLUMNS[2]]

RESPONSE_FORMATS = ("votable", "csv", "json", "fits")
FORMAT_ALIASES = {
    formats.VOTABLE_MIME: "votable", "text/xml": "votable",
    "application/x-votable+xml;serialization=tabledata": "votable",
    formats.CSV_MIME: "csv", "text/csv;header=present": "csv",
    formats.JSON_MIME: "json", formats.FITS_MIME: "fits",
}
TABLE_DESCRIPTION = ("LAMOST LRS value-added catalogue (Teff, log g, [Fe/H] from "
                     "LASSO-MLPNet, current model) within the cone, nearest first.")
STANDARD_ID = "ivo://ivoa.net/std/ConeSearch"


@lru_cache(maxsize=8)
def parameters(limits):
    return (
        Param("RA", "number", "Right ascension of the cone centre (ICRS) [deg].",
              required=True, minimum=0, maximum=360, example=150.0),
        Param("DEC", "number", "Declination of the cone centre (ICRS) [deg].",
              required=True, minimum=-90, maximum=90, example=30.0),
        Param("SR", "number", f"Cone radius [deg], at most {limits.scs_max_sr_deg:g}; "
              "0 returns the table metadata only.", required=True, minimum=0,
              maximum=limits.scs_max_sr_deg, example=0.05),
        Param("VERB", "integer", "Verbosity: 1 = identifier, position and distance; 2 = "
              "plus the estimates and their uncertainties; 3 = every column.",
              default=2, minimum=1, maximum=3),
        Param("MAXREC", "integer", f"Most rows to return (default "
              f"{limits.scs_default_maxrec}; at most {limits.scs_max_records}: larger "
              "values are reduced to it); 0 returns the metadata only.",
              default=limits.scs_default_maxrec, minimum=0),
        Param("RESPONSEFORMAT", "enum", "Output format (VOTable by default).",
              default="votable", choices=RESPONSE_FORMATS, aliases=FORMAT_ALIASES,
              ignore_case=True),
    )


operation(
    path="/scs", operation_id="scs", tags=["IVOA"],
    summary="IVOA Simple Cone Search",
    description="Catalogue rows within SR degrees of (RA, DEC), nearest first. Parameter "
                "names are case-insensitive; errors are VOTable documents with "
                "QUERY_STATUS=ERROR (HTTP 200), as SCS clients expect.",
    params=parameters,
    responses={"200": {"description": "VOTable (or CSV, JSON, FITS) of the rows in the "
                                      "cone, or a VOTable error document",
                       "content": content(formats.VOTABLE_MIME, formats.CSV_MIME,
                                          formats.JSON_MIME, formats.FITS_MIME)},
               "429": {"description": "too many large cones (wider than the small-cone "
                                      "radius) at once; retry after the Retry-After "
                                      "header's seconds (VOTable error document)",
                       "content": content(formats.VOTABLE_MIME)},
               "503": {"description": "statement timeout or database unavailable "
                                      "(VOTable error document)",
                       "content": content(formats.VOTABLE_MIME)}})


@lru_cache(maxsize=4)
def scs_columns(verb):
    return formats.with_scs_ucds(
        [formats.DISTANCE_COLUMN if n == "distance" else CATALOGUE[n].description
         for n in VERB_COLUMNS[verb]])


@lru_cache(maxsize=4)
def scs_fields(verb):
    return formats.fields_xml(scs_columns(verb))


def _cone_select(verb, distance, cone):
    spectra, estimates = schema.spectra, schema.estimates
    columns = [distance if name == "distance" else CATALOGUE[name].expression
               for name in VERB_COLUMNS[verb]]
    return (select(*columns)
            .select_from(spectra.join(estimates, estimates.c.obsid == spectra.c.obsid))
            .where(cone)
            .where(estimates.c.model_version == current_model_version()))


@lru_cache(maxsize=16)
def _postgres_template(verb, tiny=False, tabledata=False):
    """The PostgreSQL cone statement with bound parameters ra, dec, sr, maxrows; built
    once per VERB so a request only binds values and the server reuses a generic plan.
    ``tabledata``: each row comes as its VOTable ``<TR>`` line, written by the server
    (:func:`etl.votable.tabledata_row_sql`; None when a column needs Python's writer).

    Its shape holds under a generic plan (which cannot know the cone is small): the cone
    is a Q3C scan of spectra, and each of its rows looks up the current model's estimate
    through a LATERAL subquery (LIMIT 1: always an index probe, never a hash join over
    all estimates). ``tiny``: for radii below :data:`MIN_INDEX_RADIUS_DEG` the index
    search uses that radius (Q3C underflows below it) and the exact distance test ``sr``.
    """
    spectra, estimates = schema.spectra, schema.estimates
    ra, dec = bindparam("ra", type_=Float), bindparam("dec", type_=Float)
    names = VERB_COLUMNS[verb]
    from_spectra = [n for n in names if n != "distance"
                    and CATALOGUE[n].expression.table is spectra]
    from_estimates = [n for n in names if n != "distance" and n not in from_spectra]
    distance = func.q3c_dist(spectra.c.ra, spectra.c.dec, ra, dec)
    sr = bindparam("sr", type_=Float)
    cone = (select(*[CATALOGUE[n].expression.label(n) for n in from_spectra],
                   distance.label("distance"))
            .where(func.q3c_radial_query(spectra.c.ra, spectra.c.dec, ra, dec,
                                         MIN_INDEX_RADIUS_DEG if tiny else sr)))
    if tiny:
        cone = cone.where(distance <= sr)
    # Sorted before the join, so that the estimates are looked up nearest first and only
    # until MAXREC rows are found: a wide cone holds more spectra than it returns.
    cone = cone.order_by(distance, spectra.c.obsid).subquery("cone")
    estimate = (select(*[CATALOGUE[n].expression.label(n) for n in from_estimates])
                .where(estimates.c.obsid == cone.c.obsid,
                       estimates.c.model_version == current_model_version())
                .limit(1)
                .lateral("estimate"))
    columns = [cone.c[n] if n in from_spectra or n == "distance" else estimate.c[n]
               for n in names]
    if tabledata:
        line = tabledata_row_sql(list(zip(columns, scs_columns(verb))))
        if line is None:
            return None
        columns = [line]
    return (select(*columns)
            .select_from(cone.join(estimate, true()))
            .order_by(cone.c.distance, cone.c.obsid)
            .limit(bindparam("maxrows", type_=Integer)))


def scs_query(bind, ra, dec, sr, verb, limit, tabledata=False):
    """(statement, parameters) of the cone query: rows of the current model within ``sr``
    deg of (ra, dec), nearest first, at most ``limit``.

    Positions are filtered by :func:`etl.db.cone_condition` (Q3C index on PostgreSQL,
    declination zones + RA ranges on SQLite, both exact); every value is a bound
    parameter. ``tabledata``: on PostgreSQL, rows as VOTable ``<TR>`` lines when the
    server can write them (the statement is None otherwise).
    """
    if etl_db.is_postgres(bind):
        return (_postgres_template(verb, sr < MIN_INDEX_RADIUS_DEG, tabledata),
                {"ra": ra, "dec": dec, "sr": sr, "maxrows": limit})
    if tabledata:
        return None, {}
    spectra = schema.spectra
    distance = etl_db.distance_deg(spectra, ra, dec, bind).label("distance")
    statement = (_cone_select(verb, distance, cone_filter(spectra, ra, dec, sr, bind))
                 .order_by(distance, spectra.c.obsid).limit(limit))
    return statement, {}


def scs_statement(bind, ra, dec, sr, verb, limit):
    """The cone query with its values bound (for EXPLAIN)."""
    statement, params = scs_query(bind, ra, dec, sr, verb, limit)
    return statement.params(**params) if params else statement


def error_document(message, status=200):
    return error_response(status, message)


@blueprint.get("/scs")
def cone_search():
    service = state()
    try:
        args = parse(parameters(service.limits), request.args, ignore_case=True,
                     allow_unknown=True)
    except ParamError as error:
        return error_document(str(error))
    if args["SR"] > 0 and args["MAXREC"] > 0 and not is_small_cone(args["SR"]):
        return large_query(lambda: _answer(service, args))
    return _answer(service, args)


def _answer(service, args):
    (ra, dec), sr = cone_centre(args["RA"], args["DEC"]), args["SR"]
    verb, fmt = args["VERB"], args["RESPONSEFORMAT"]
    maxrec = min(args["MAXREC"], service.limits.scs_max_records)
    rows, overflow, server_lines = [], False, False
    if sr > 0 and maxrec > 0:
        try:
            with service.cone_engine.connect() as connection:
                # A VOTable's rows are written by PostgreSQL where it can: a wide cone's
                # thousands of rows are then never formatted value by value in Python.
                if fmt == "votable":
                    statement, params = scs_query(connection, ra, dec, sr, verb,
                                                  maxrec + 1, tabledata=True)
                    server_lines = statement is not None
                if server_lines:
                    rows = connection.execute(statement, params).scalars().all()
                else:
                    statement, params = scs_query(connection, ra, dec, sr, verb, maxrec + 1)
                    rows = connection.execute(statement, params).all()
        except SQLAlchemyError as error:
            status, message = database_error_response(error)
            return error_document(message, status=status)
        if len(rows) > maxrec:
            rows, overflow = rows[:maxrec], True
    columns = scs_columns(verb)
    status = "OVERFLOW" if overflow else "OK"
    headers = {"X-Query-Status": status}
    if fmt != "votable":
        return formats.render(fmt, columns, rows, filename="scs", headers=headers,
                              json_extra={"query_status": status, "overflow": overflow})
    query_infos = [formats.Info("QUERY_STATUS", "OK"),
                   formats.Info("standardID", STANDARD_ID),
                   formats.Info("RA", repr(ra)), formats.Info("DEC", repr(dec)),
                   formats.Info("SR", repr(sr)), formats.Info("VERB", str(verb)),
                   formats.Info("MAXREC", str(maxrec))]
    post = [formats.Info("QUERY_STATUS", "OVERFLOW",
                         f"truncated to MAXREC={maxrec} rows")] if overflow else []
    # Every row's obsid leads to its spectrum's DataLink links (FITS, preview, record).
    body = formats.votable_document(columns, rows, description=TABLE_DESCRIPTION,
                                    status_infos=query_infos, post_infos=post,
                                    fields=scs_fields(verb),
                                    tabledata=rows if server_lines else None,
                                    resources=[datalink.links_descriptor("obsid")])
    return Response(body, mimetype=formats.VOTABLE_MIME, headers=headers)
