"""``GET /api/v1/spectra/<obsid>``: one spectrum's metadata and every model version's
estimate of it, with provenance (model status and artifact checksum, code version,
preprocessing hash, inference run), plus the model versions that failed on it."""
from flask import Blueprint, request
from sqlalchemy import select

from etl import schema
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
                "every model version (current and retired) with provenance, and failures.",
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


@blueprint.get("/api/v1/spectra/<path:obsid>")
def get_spectrum(obsid):
    service = state()
    args = parse(parameters(service.limits), request.args, path_values={"obsid": obsid})
    with service.engine.connect() as connection:
        document = spectrum_record(connection, args["obsid"])
    if document is None:
        return error_response(404, f"no spectrum with obsid {args['obsid']}")
    return formats.json_response(document)
