"""Service description endpoints: VOSI ``/availability`` and ``/capabilities``,
``/health``, the OpenAPI document ``/openapi.json`` and the index ``/``.

``/capabilities`` declares the cone search (maxSR, maxRecords, verbosity, a test query),
TAP (on PostgreSQL; its TAPRegExt details are at ``/tap/capabilities``), DataLink and
the REST API, each with the service limits (row caps, statement timeout) in its
description.
"""
import datetime as dt
import time

from flask import Blueprint, Response, request
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from etl import schema
from service import formats
from service.blueprints import datalink, pages
from service.catalogue import current_model_version
from service.errors import wants_html
from service.openapi import build_document, content, operation, parse
from service.state import LIMITS_DESCRIPTION, state


blueprint = Blueprint("vosi", __name__)

XML_MIME = "text/xml"
STARTED = dt.datetime.now(dt.timezone.utc)


def no_parameters(limits):
    return ()


for _path, _summary, _mime in [
        ("/availability", "VOSI availability", XML_MIME),
        ("/capabilities", "VOSI capabilities, with the service limits", XML_MIME),
        ("/health", "Health check: database reachable, schema revision, current model",
         "application/json"),
        ("/openapi.json", "This OpenAPI document", "application/json"),
        ("/", "Index of the endpoints", "application/json")]:
    # "/" is also the search page for browsers (Accept: text/html).
    mimes = (_mime, "text/html") if _path == "/" else (_mime,)
    responses = {"200": {"description": _summary, "content": content(*mimes)},
                 "400": {"description": "unknown parameter",
                         "content": content("application/json")}}
    if _path == "/health":
        responses["503"] = {"description": "database unavailable",
                            "content": content("application/json")}
    operation(path=_path, summary=_summary, description=_summary, params=no_parameters,
              responses=responses, tags=["service"],
              operation_id=_path.strip("/").replace(".", "_") or "index")


def _check_database():
    """(ok, details) from one cheap query each for connectivity, schema and model, on the
    health engine: its own pool and a short statement timeout, so the answer comes quickly
    whatever the queries of other clients are doing."""
    service = state()
    started = time.perf_counter()
    details = {"dialect": service.health_engine.dialect.name}
    try:
        with service.health_engine.connect() as connection:
            connection.execute(text("SELECT 1")).scalar()
            details["current_model"] = connection.execute(
                current_model_version().element).scalar()
            details["pending_model"] = connection.execute(
                select(schema.models.c.version).where(schema.models.c.status == "pending")).scalar()
            try:
                details["schema_revision"] = connection.execute(
                    text("SELECT version_num FROM alembic_version")).scalar()
            except SQLAlchemyError:
                details["schema_revision"] = None
    except SQLAlchemyError as error:
        details["error"] = type(getattr(error, "orig", error)).__name__
        return False, details
    details["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return True, details


def _xml(body):
    return Response('<?xml version="1.0" encoding="UTF-8"?>\n' + body, mimetype=XML_MIME)


@blueprint.get("/availability")
def availability():
    parse(no_parameters(None), request.args)
    ok, details = _check_database()
    note = ("service is accepting queries" if ok
            else f"the catalogue database is not reachable ({details.get('error')})")
    return _xml(
        '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">\n'
        f"  <vosi:available>{'true' if ok else 'false'}</vosi:available>\n"
        f"  <vosi:upSince>{STARTED.strftime('%Y-%m-%dT%H:%M:%SZ')}</vosi:upSince>\n"
        f"  <vosi:note>{formats.escape(note)}</vosi:note>\n"
        "</vosi:availability>\n")


def _test_position():
    try:
        with state().health_engine.connect() as connection:
            row = connection.execute(select(schema.spectra.c.ra, schema.spectra.c.dec)
                                     .limit(1)).first()
    except SQLAlchemyError:
        return None
    return row


@blueprint.get("/capabilities")
def capabilities():
    parse(no_parameters(None), request.args)
    service = state()
    limits = service.limits
    base = request.host_url.rstrip("/")
    limits_text = formats.escape(LIMITS_DESCRIPTION.format(**limits.as_dict()))
    position = _test_position()
    test_query = ""
    if position is not None:
        test_query = (f"    <testQuery><ra>{position[0]!r}</ra><dec>{position[1]!r}</dec>"
                      f"<sr>0.01</sr></testQuery>\n")
    scs_params = "".join(
        f"        <param std=\"true\"><name>{name}</name><description>{formats.escape(d)}"
        f"</description><unit>{unit}</unit><dataType>double</dataType></param>\n"
        for name, d, unit in [("RA", "right ascension (ICRS)", "deg"),
                              ("DEC", "declination (ICRS)", "deg"),
                              ("SR", "cone radius", "deg")])

    def simple(standard_id, path, description, use="full", version=None):
        role = f' role="std" version="{version}"' if version else ""
        return (f'  <capability standardID="{standard_id}">\n'
                f"    <description>{formats.escape(description)}</description>\n"
                f'    <interface xsi:type="vs:ParamHTTP"{role}>\n'
                f'      <accessURL use="{use}">{formats.escape(base + path)}</accessURL>\n'
                "    </interface>\n  </capability>\n")

    body = (
        '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xmlns:vr="http://www.ivoa.net/xml/VOResource/v1.0" '
        'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
        'xmlns:cs="http://www.ivoa.net/xml/ConeSearch/v1.0">\n'
        '  <capability standardID="ivo://ivoa.net/std/ConeSearch" xsi:type="cs:ConeSearch">\n'
        f"    <description>Simple Cone Search of the current model's estimates. "
        f"{limits_text}</description>\n"
        '    <interface xsi:type="vs:ParamHTTP" role="std" version="1.03">\n'
        f'      <accessURL use="base">{formats.escape(base)}/scs?</accessURL>\n'
        "      <queryType>GET</queryType>\n"
        f"      <resultType>{formats.VOTABLE_MIME}</resultType>\n"
        f"{scs_params}"
        "    </interface>\n"
        f"    <maxSR>{limits.scs_max_sr_deg:g}</maxSR>\n"
        f"    <maxRecords>{limits.scs_max_records}</maxRecords>\n"
        "    <verbosity>true</verbosity>\n"
        f"{test_query}"
        "  </capability>\n"
        + (simple("ivo://ivoa.net/std/TAP", "/tap",
                  "TAP 1.1 with ADQL 2.0/2.1; its own capabilities (TAPRegExt: languages, "
                  f"formats, limits) at {base}/tap/capabilities", use="base", version="1.1")
           if service.serves_tap else "")
        + datalink.capability(base, limits)
        + simple("ivo://ivoa.net/std/VOSI#capabilities", "/capabilities",
                 "VOSI capabilities (this document)")
        + simple("ivo://ivoa.net/std/VOSI#availability", "/availability", "VOSI availability")
        + '  <capability>\n'
        "    <description>REST API (JSON, CSV, VOTable, FITS); OpenAPI document at "
        f"{formats.escape(base)}/openapi.json. {limits_text} Statement timeout: "
        f"{limits.statement_timeout_ms} ms.</description>\n"
        '    <interface xsi:type="vs:ParamHTTP">\n'
        f'      <accessURL use="base">{formats.escape(base)}/api/v1/</accessURL>\n'
        "      <queryType>GET</queryType>\n"
        "      <resultType>application/json</resultType>\n"
        "    </interface>\n  </capability>\n"
        "</vosi:capabilities>\n")
    return _xml(body)


@blueprint.get("/health")
def health():
    parse(no_parameters(None), request.args)
    ok, details = _check_database()
    service = state()
    document = {"status": "ok" if ok else "unavailable", "version": service.version,
                "database": details, "limits": service.limits.as_dict()}
    return formats.json_response(document, status=200 if ok else 503)


@blueprint.get("/openapi.json")
def openapi_document():
    parse(no_parameters(None), request.args)
    service = state()
    return formats.json_response(build_document(service.limits, request.host_url,
                                                service.version))


@blueprint.get("/")
def index():
    """The service description for JSON clients (and those without a preference); a
    browser gets the catalogue's search page."""
    if wants_html():
        return pages.search_page()
    parse(no_parameters(None), request.args)
    base = request.host_url.rstrip("/")
    endpoints = {
        "cone_search": f"{base}/scs?", "estimates": f"{base}/api/v1/estimates",
        "spectrum": f"{base}/api/v1/spectra/{{obsid}}", "models": f"{base}/api/v1/models",
        "datalink": f"{base}{datalink.LINKS_PATH}", "browser": f"{base}/",
        "availability": f"{base}/availability", "capabilities": f"{base}/capabilities",
        "health": f"{base}/health", "openapi": f"{base}/openapi.json"}
    if state().serves_tap:
        endpoints["tap"] = f"{base}/tap"
    return formats.json_response({
        "service": "LAMOST LRS value-added catalogue (Teff, log g, [Fe/H])",
        "version": state().version, "endpoints": endpoints})
