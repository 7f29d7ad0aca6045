"""``GET /api/v1/spectra/<obsid>``: one spectrum's metadata and every model version's
estimate of it, with provenance (model status and artifact checksum, code version,
preprocessing hash, inference run), plus the model versions that failed on it.

:func:`spectrum_file` is where the service finds a spectrum's FITS file (the spectrum
page, its plot and download, the DataLink links): only under the spectra root, never a
path that leads outside it (:func:`etl.spectrum_files.resolve_under_root`)."""
import os

from flask import Blueprint, request
from sqlalchemy import select

from etl import schema
from etl.spectrum_files import UnsafePathError, resolve_under_root
from service import formats
from service.errors import error_response
from service.openapi import INT64_MAX, JSON_ERROR, Param, content, operation, parse
from service.state import state

blueprint = Blueprint("spectra", __name__)

SPECTRUM_COLUMNS = [c for c in schema.spectra.columns if c.name not in ("zone",)]
ESTIMATE_COLUMNS = [c for c in schema.estimates.columns
                    if c.name not in ("estimate_id", "obsid")]
MODEL_COLUMNS = [schema.models.c.status, schema.models.c.created_at,
                 schema.models.c.artifact_sha256, schema.models.c.code_version]
FAILURE_COLUMNS = [c for c in schema.estimate_failures.columns if c.name != "obsid"]


def parameters(limits):
    return (Param("obsid", "integer", "LAMOST obsid of the spectrum.", minimum=0,
                  maximum=INT64_MAX, location="path", example=101001),)


operation(
    path="/api/v1/spectra/{obsid}", operation_id="spectrum", tags=["catalogue"],
    summary="One spectrum with every model version's estimate and provenance",
    description="Spectrum metadata (position, S/N, LASP class, file), the estimates of "
                "every model version (current, pending and retired) with provenance, and failures.",
    params=parameters,
    responses={"200": {"description": "the spectrum", "content": content("application/json")},
               "400": {"description": "invalid obsid", **JSON_ERROR},
               "404": {"description": "no such spectrum", **JSON_ERROR},
               "503": {"description": "statement timeout or database unavailable",
                       **JSON_ERROR}})


def _metadata(columns):
    return {d.name: {"unit": d.unit, "ucd": d.ucd, "description": d.description}
            for d in (schema.describe_column(c) for c in columns)}


def spectrum_record(connection, obsid):
    """The record of one spectrum (what ``/api/v1/spectra/<obsid>`` answers and the
    spectrum page shows), or None when there is no such spectrum."""
    spectra, estimates, models = schema.spectra, schema.estimates, schema.models
    spectrum = connection.execute(
        select(*SPECTRUM_COLUMNS).where(spectra.c.obsid == obsid)).mappings().first()
    if spectrum is None:
        return None
    rows = connection.execute(
        select(*ESTIMATE_COLUMNS, *[c.label(f"model_{c.name}") for c in MODEL_COLUMNS])
        .select_from(estimates.join(models, models.c.version == estimates.c.model_version))
        .where(estimates.c.obsid == obsid)
        .order_by(models.c.created_at, estimates.c.model_version)).mappings().all()
    failures = connection.execute(
        select(*FAILURE_COLUMNS).where(schema.estimate_failures.c.obsid == obsid)
        .order_by(schema.estimate_failures.c.model_version)).mappings().all()
    current = [r["model_version"] for r in rows if r["model_status"] == "current"]
    return {
        "obsid": obsid,
        "spectrum": dict(spectrum),
        "current_model_version": current[0] if current else None,
        "estimates": [dict(r) for r in rows],
        "failures": [dict(f) for f in failures],
        "columns": {"spectrum": _metadata(SPECTRUM_COLUMNS),
                    "estimates": _metadata(ESTIMATE_COLUMNS)},
    }


def spectra_root(connection, run_id, roots=None):
    """settings.spectra_root, else the root of the ingest run that wrote the row, else the
    latest ingest run's root (as the inference workers find files). ``roots``: a dict
    that keeps the answers per run for the caller (many spectra, one request)."""
    root = state().settings.spectra_root
    if root:
        return root
    if roots is not None and run_id in roots:
        return roots[run_id]
    runs = schema.ingest_runs
    if run_id is not None:
        root = connection.execute(select(runs.c.spectra_root)
                                  .where(runs.c.run_id == run_id)).scalar()
    if not root:
        root = connection.execute(
            select(runs.c.spectra_root).where(runs.c.spectra_root.is_not(None))
            .order_by(runs.c.started_at.desc()).limit(1)).scalar()
    if roots is not None:
        roots[run_id] = root
    return root


def spectrum_file(connection, spectrum, roots=None):
    """(path, None) of the file of ``spectrum`` (a mapping with ``file_path`` and
    ``ingest_run_id``), or (None, why not)."""
    relative = spectrum.get("file_path")
    if not relative:
        return None, "the catalogue records no file for this spectrum"
    root = spectra_root(connection, spectrum.get("ingest_run_id"), roots)
    if not root:
        return None, "no spectra root is configured on this server (LAMOST_VAC_SPECTRA_ROOT)"
    try:
        path = resolve_under_root(root, relative)
    except UnsafePathError:
        return None, f"the file path {relative!r} does not lie under the spectra root"
    if not os.path.isfile(path):
        return None, f"the file {relative!r} is not available on this server"
    return path, None


def spectrum_file_mime(path) -> str:
    """The media type a spectrum file is served with: FITS, or gzip for the compressed
    ``.fits.gz`` files LAMOST distributes (sent as they are, not decompressed)."""
    return "application/gzip" if path.lower().endswith(".gz") else "application/fits"


@blueprint.get("/api/v1/spectra/<path:obsid>")
def get_spectrum(obsid):
    service = state()
    args = parse(parameters(service.limits), request.args, path_values={"obsid": obsid})
    with service.engine.connect() as connection:
        document = spectrum_record(connection, args["obsid"])
    if document is None:
        return error_response(404, f"no spectrum with obsid {args['obsid']}")
    return formats.json_response(document)
