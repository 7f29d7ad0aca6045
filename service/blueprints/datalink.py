"""``/datalink/links``: the IVOA DataLink 1.1 ``{links}`` of LAMOST spectra, by obsid.

``ID`` (repeatable; GET or POST; parameter names case-insensitive, as DALI asks) is an
obsid. A spectrum of the catalogue gets three links:

* ``#this``: its FITS file, ``/spectra/<obsid>/file``. The file is found from the obsid
  alone, at the catalogue's ``file_path`` under the spectra root
  (:func:`service.blueprints.spectra.spectrum_file`, which never opens a path leading
  outside the root); no part of the request is ever used as a path.
* ``#preview``: a PNG of the observed and the continuum-normalised spectrum,
  ``/spectra/<obsid>/spectrum.png`` (the plot of the spectrum page).
* ``#auxiliary``: its JSON record, ``/api/v1/spectra/<obsid>`` (metadata, every model
  version's estimates with provenance).

An ID that is not an obsid gets one row whose ``error_message`` starts ``UsageFault:``,
an obsid not in the catalogue ``NotFoundFault:``; a spectrum whose file is not available
on this server gets its JSON link and ``NotFoundFault`` rows saying why for the other
two. At most LAMOST_VAC_DATALINK_MAX_IDS obsids are answered per request, the rest left
out with the DALI overflow INFO; no ID (an empty one is none) gives an empty table.
``RESPONSEFORMAT``: VOTable (TABLEDATA) only, served as
``application/x-votable+xml;content=datalink``.

The VOTable results of ``/tap`` and ``/scs`` reference this endpoint from every row that
carries an obsid with a *service descriptor* (:func:`links_descriptor`): a ``RESOURCE
type="meta" utype="adhoc:service"`` whose ``ID`` input parameter refers to the obsid
FIELD. TOPCAT (its DataLink window) and pyvo (``iter_datalinks``, ``getdatalink``) find
the links of a row through it. Works on SQLite and on PostgreSQL.
"""
import os
from dataclasses import replace

from flask import Blueprint, Response, request
from sqlalchemy import select

from etl import schema
from etl.schema import ColumnDescription
from service import formats
from service.tap_schema import TypedColumn
from service.blueprints import spectra as spectra_api
from service.errors import error_response
from service.openapi import ASCII_SPACE, INT64_MAX, Param, ParamError, content, operation
from service.state import state

blueprint = Blueprint("datalink", __name__)

LINKS_PATH = "/datalink/links"
STANDARD_ID = "ivo://ivoa.net/std/DataLink#links-1.1"
LINKS_MIME = f"{formats.VOTABLE_MIME};content=datalink"
# RESPONSEFORMAT values (MIME parameters stripped) that mean the standard VOTable.
VOTABLE_FORMATS = ("votable", formats.VOTABLE_MIME, "text/xml")


def _text_column(name, ucd, description, nullable=True, datatype=None):
    return TypedColumn(name, "text", None, ucd, description, nullable, datatype)


LINK_COLUMNS = [
    # The ID as given, and the message that quotes it, may hold any character: not
    # VOTable's ASCII "char".
    _text_column("ID", "meta.id;meta.main", "the obsid asked for", nullable=False,
                 datatype="unicodeChar"),
    _text_column("access_url", "meta.ref.url", "URL of the linked resource"),
    _text_column("service_def", "meta.ref", "service descriptor of the link (none here)"),
    _text_column("error_message", "meta.code.error", "why there is no link",
                 datatype="unicodeChar"),
    _text_column("description", "meta.note", "what the link leads to"),
    _text_column("semantics", "meta.code", "term of the DataLink core vocabulary",
                 nullable=False),
    _text_column("content_type", "meta.code.mime", "media type of the linked resource"),
    ColumnDescription("content_length", "int", "byte", "phys.size;meta.file",
                      "size of the linked resource, when known", True),
]
# One ID value: an obsid, by the same rule as /api/v1/spectra/<obsid>.
OBSID = Param("ID", "integer", "LAMOST obsid of a spectrum; may be given more than once.",
              minimum=0, maximum=INT64_MAX, example=101001)


def parameters(limits):
    return (
        replace(OBSID, description=f"{OBSID.description} At most "
                f"{limits.datalink_max_ids} are answered, the rest left out with the "
                "DALI overflow INFO."),
        Param("RESPONSEFORMAT", "enum", "Output format: the DataLink VOTable.",
              default="votable", choices=("votable", formats.VOTABLE_MIME, LINKS_MIME),
              ignore_case=True),
    )


operation(
    path=LINKS_PATH, operation_id="datalink_links", tags=["DataLink"],
    summary="IVOA DataLink 1.1 links of spectra: FITS file, PNG preview, JSON record",
    description="For each ID (an obsid): the spectrum's FITS file (#this), a PNG of the "
                "observed and continuum-normalised spectrum (#preview) and its JSON record "
                "(#auxiliary); an unknown or invalid ID gets a row with an error_message "
                "(NotFoundFault, UsageFault). Also POST, with the same parameters as a "
                "form.",
    params=parameters,
    responses={"200": {"description": "the links (DataLink VOTable)",
                       "content": content(LINKS_MIME)},
               "400": {"description": "unsupported RESPONSEFORMAT (VOTable error)",
                       "content": content(formats.VOTABLE_MIME)},
               "503": {"description": "statement timeout or database unavailable "
                                      "(VOTable error)",
                       "content": content(formats.VOTABLE_MIME)}})


def links_descriptor(field_name: str) -> str:
    """The service descriptor RESOURCE of this endpoint for a VOTable whose column
    ``field_name`` holds obsids (its FIELD's ID is ``formats.xml_id(field_name)``)."""
    def attr(value):
        return formats.escape(value, {'"': "&quot;"})

    url = request.host_url.rstrip("/") + LINKS_PATH
    return (
        '  <RESOURCE type="meta" utype="adhoc:service" name="spectrum_links">\n'
        "    <DESCRIPTION>DataLink links of the spectrum of each row: its FITS file, a PNG "
        "preview and its JSON record</DESCRIPTION>\n"
        f'    <PARAM name="standardID" datatype="char" arraysize="*" value="{STANDARD_ID}"/>\n'
        f'    <PARAM name="accessURL" datatype="char" arraysize="*" value="{attr(url)}"/>\n'
        f'    <PARAM name="contentType" datatype="char" arraysize="*" value="{LINKS_MIME}"/>\n'
        '    <GROUP name="inputParams">\n'
        '      <PARAM name="ID" datatype="char" arraysize="*" value="" '
        f'ucd="meta.id;meta.main" ref="{attr(formats.xml_id(field_name))}"/>\n'
        "    </GROUP>\n"
        "  </RESOURCE>\n")


def capability(base_url: str, limits) -> str:
    """The VOSI ``capability`` element of this endpoint (in ``/capabilities`` and
    ``/tap/capabilities``)."""
    url = formats.escape(base_url.rstrip("/") + LINKS_PATH)
    return (
        f'  <capability standardID="{STANDARD_ID}">\n'
        "    <description>DataLink links of LAMOST spectra by obsid: the FITS file, a PNG "
        f"preview and the JSON record; at most {limits.datalink_max_ids} IDs per "
        "request.</description>\n"
        '    <interface xsi:type="vs:ParamHTTP" role="std" version="1.1">\n'
        f'      <accessURL use="base">{url}</accessURL>\n'
        "      <queryType>GET</queryType>\n      <queryType>POST</queryType>\n"
        f"      <resultType>{LINKS_MIME}</resultType>\n"
        '      <param std="true" use="required">\n        <name>ID</name>\n'
        "        <description>obsid of a LAMOST spectrum</description>\n"
        "        <ucd>meta.id;meta.main</ucd>\n        <dataType>string</dataType>\n"
        "      </param>\n"
        '      <param std="true">\n        <name>RESPONSEFORMAT</name>\n'
        "        <description>the links are a VOTable (the default)</description>\n"
        "        <dataType>string</dataType>\n      </param>\n"
        "    </interface>\n  </capability>\n")


def _id_values() -> list:
    """Every ID value of the query string and the form (names case-insensitive)."""
    values = []
    for source in (request.args, request.form):
        for name in source:
            if name.upper() == "ID":
                values.extend(source.getlist(name))
    return values


def _parameter(name):
    for source in (request.args, request.form):
        for key in source:
            if key.upper() == name:
                return source.get(key)
    return None


def _spectrum_links(connection, raw_id, spectrum, roots):
    """The link rows of one found spectrum (ID, access_url, service_def, error_message,
    description, semantics, content_type, content_length)."""
    obsid = spectrum["obsid"]
    base = request.host_url.rstrip("/")
    rows = []
    path, problem = spectra_api.spectrum_file(connection, spectrum, roots)
    if path is not None:
        rows.append((raw_id, f"{base}/spectra/{obsid}/file", None, None,
                     f"LAMOST spectrum {obsid}: the FITS file", "#this",
                     spectra_api.spectrum_file_mime(path), os.path.getsize(path)))
        rows.append((raw_id, f"{base}/spectra/{obsid}/spectrum.png", None, None,
                     f"LAMOST spectrum {obsid}: observed and continuum-normalised "
                     "spectrum (PNG)", "#preview", "image/png", None))
    else:
        rows.append((raw_id, None, None, f"NotFoundFault: no FITS file of spectrum "
                     f"{obsid}: {problem}", None, "#this", None, None))
        rows.append((raw_id, None, None, f"NotFoundFault: no preview of spectrum {obsid} "
                     f"(it is drawn from the file): {problem}", None, "#preview", None,
                     None))
    rows.append((raw_id, f"{base}/api/v1/spectra/{obsid}", None, None,
                 f"LAMOST spectrum {obsid}: metadata and every model version's Teff, "
                 "log g, [Fe/H] with provenance (JSON)", "#auxiliary",
                 formats.JSON_MIME, None))
    return rows


@blueprint.route(LINKS_PATH, methods=["GET", "POST"])
def links():
    fmt = (_parameter("RESPONSEFORMAT") or "votable").split(";")[0].strip().lower()
    if fmt not in VOTABLE_FORMATS:
        return error_response(400, f"UsageFault: RESPONSEFORMAT={fmt[:60]!r} is not "
                                   "supported; the links are a VOTable (votable, "
                                   f"{formats.VOTABLE_MIME})")
    service = state()
    # once each, in the given order; an empty value is no value (DALI)
    raw_ids = list(dict.fromkeys(v for v in _id_values() if v.strip(ASCII_SPACE)))
    overflow = len(raw_ids) > service.limits.datalink_max_ids
    raw_ids = raw_ids[:service.limits.datalink_max_ids]
    obsids, problems = {}, {}
    for raw in raw_ids:
        try:
            obsids[raw] = OBSID.parse(raw)
        except ParamError as error:
            problems[raw] = f"UsageFault: ID must be an obsid: {error.message}"
    rows = []
    with service.engine.connect() as connection:
        spectra = schema.spectra
        found = {row["obsid"]: row for row in connection.execute(
            select(spectra.c.obsid, spectra.c.file_path, spectra.c.ingest_run_id)
            .where(spectra.c.obsid.in_(set(obsids.values())))).mappings()} if obsids else {}
        roots = {}
        for raw in raw_ids:
            if raw in problems:
                rows.append((raw, None, None, problems[raw], None, "#this", None, None))
            elif obsids[raw] not in found:
                rows.append((raw, None, None, f"NotFoundFault: no spectrum with obsid "
                             f"{obsids[raw]}", None, "#this", None, None))
            else:
                rows.extend(_spectrum_links(connection, raw, found[obsids[raw]], roots))
    status_infos = [formats.Info("QUERY_STATUS", "OK"), formats.Info("standardID", STANDARD_ID)]
    post_infos = ([formats.Info("QUERY_STATUS", "OVERFLOW",
                                f"only the first {len(raw_ids)} IDs are answered; ask for "
                                "the others in another request")] if overflow else [])
    body = formats.votable_document(LINK_COLUMNS, rows, table_name="links",
                                    status_infos=status_infos, post_infos=post_infos)
    return Response(body, content_type=LINKS_MIME)
