"""``GET /api/v1/models``: the model versions with their metrics and training sets."""
from flask import Blueprint, request
from sqlalchemy import select

from etl import schema
from service import formats
from service.openapi import JSON_ERROR, content, operation, parse
from service.state import state

blueprint = Blueprint("models", __name__)

# The artifact's server-side path is not published; its checksum identifies it.
MODEL_COLUMNS = schema.published_columns(schema.models)


def parameters(limits):
    return ()


operation(
    path="/api/v1/models", operation_id="models", tags=["catalogue"],
    summary="Model versions with metrics and training sets",
    description="Every registered model version (current, pending or retired), "
                "newest first, with its validation metrics and training-set description.",
    params=parameters,
    responses={"200": {"description": "the model versions",
                       "content": content("application/json")},
               "400": {"description": "unknown parameter", **JSON_ERROR},
               "503": {"description": "database unavailable", **JSON_ERROR}})


def model_rows(connection) -> list:
    """Every model version, newest first (the API's listing and the models page)."""
    rows = connection.execute(
        select(*MODEL_COLUMNS).order_by(schema.models.c.created_at.desc(),
                                        schema.models.c.version)).mappings().all()
    return [dict(r) for r in rows]


@blueprint.get("/api/v1/models")
def list_models():
    service = state()
    parse(parameters(service.limits), request.args)
    with service.engine.connect() as connection:
        models = model_rows(connection)
    def version_with(status):
        return next((m["version"] for m in models if m["status"] == status), None)

    return formats.json_response({
        "current": version_with("current"),
        # being estimated; current once it has estimated every spectrum the current serves
        "pending": version_with("pending"),
        "models": models,
        "columns": {d.name: {"unit": d.unit, "ucd": d.ucd, "description": d.description}
                    for d in (schema.describe_column(c) for c in MODEL_COLUMNS)},
    })
