"""Flask application factory of the read-only query service.

``create_app(settings=None)`` builds the app from :mod:`etl.settings` (the database URL the
service reads with is ``settings.reader_url``) and the service limits below; run it with
``lamost-vac serve`` (development server) or, in production, with gunicorn::

    gunicorn -w 2 -b 127.0.0.1:8000 'service.app:create_app()'

Service limits (environment variables; they are published in ``/capabilities`` and in the
OpenAPI document):

=================================  =====================================================  =========
variable                           meaning                                                default
=================================  =====================================================  =========
LAMOST_VAC_SCS_MAX_SR_DEG          largest cone-search radius (SR), also /api/v1 radius   ``10``
LAMOST_VAC_SCS_MAXREC_DEFAULT      rows returned by /scs when MAXREC is not given         ``10000``
LAMOST_VAC_SCS_MAXREC_MAX          hard row cap of /scs (larger MAXREC is reduced to it)  ``50000``
LAMOST_VAC_API_LIMIT_DEFAULT       rows per page of /api/v1/estimates by default          ``100``
LAMOST_VAC_API_LIMIT_MAX           largest ``limit`` of /api/v1/estimates                 ``10000``
LAMOST_VAC_STATEMENT_TIMEOUT_MS    (etl.settings) statement timeout of every query        ``10000``
=================================  =====================================================  =========
"""
import logging
import os
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from flask import Flask, request
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from werkzeug.exceptions import HTTPException

from service import formats
from service.db import is_statement_timeout, make_service_engine
from service.openapi import ParamError

log = logging.getLogger(__name__)

EXTENSION = "lamost_vac"

LIMITS_DESCRIPTION = (
    "Limits: cone radius (SR, radius) at most {scs_max_sr_deg:g} deg; /scs returns "
    "{scs_default_maxrec} rows unless MAXREC is given and never more than "
    "{scs_max_records} (DALI overflow INFO when truncated); /api/v1/estimates pages hold "
    "{api_default_limit} rows by default and at most {api_max_limit} (keyset pagination "
    "with a next link); every database statement is cancelled after "
    "{statement_timeout_ms} ms (HTTP 503).")


@dataclass(frozen=True)
class Limits:
    scs_max_sr_deg: float = 10.0
    scs_default_maxrec: int = 10000
    scs_max_records: int = 50000
    api_default_limit: int = 100
    api_max_limit: int = 10000
    statement_timeout_ms: int = 10000

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None, settings=None):
        env = os.environ if environ is None else environ
        defaults = cls()

        def number(name, default, kind):
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {raw!r}")
            return value

        limits = cls(
            scs_max_sr_deg=number("LAMOST_VAC_SCS_MAX_SR_DEG", defaults.scs_max_sr_deg, float),
            scs_default_maxrec=number("LAMOST_VAC_SCS_MAXREC_DEFAULT",
                                      defaults.scs_default_maxrec, int),
            scs_max_records=number("LAMOST_VAC_SCS_MAXREC_MAX", defaults.scs_max_records, int),
            api_default_limit=number("LAMOST_VAC_API_LIMIT_DEFAULT",
                                     defaults.api_default_limit, int),
            api_max_limit=number("LAMOST_VAC_API_LIMIT_MAX", defaults.api_max_limit, int),
            statement_timeout_ms=(settings.statement_timeout_ms if settings is not None
                                  else defaults.statement_timeout_ms),
        )
        return limits.checked()

    def checked(self):
        if self.scs_default_maxrec > self.scs_max_records:
            raise ValueError("LAMOST_VAC_SCS_MAXREC_DEFAULT exceeds LAMOST_VAC_SCS_MAXREC_MAX")
        if self.api_default_limit > self.api_max_limit:
            raise ValueError("LAMOST_VAC_API_LIMIT_DEFAULT exceeds LAMOST_VAC_API_LIMIT_MAX")
        if not 0 < self.scs_max_sr_deg <= 180:
            raise ValueError("LAMOST_VAC_SCS_MAX_SR_DEG must be in (0, 180]")
        return self


@dataclass
class ServiceState:
    settings: object
    limits: Limits
    engine: object          # every query but the cone search
    cone_engine: object     # the fixed /scs statement (generic plans on PostgreSQL)
    version: str

    def dispose(self):
        self.engine.dispose()
        if self.cone_engine is not self.engine:
            self.cone_engine.dispose()


def state(app=None) -> ServiceState:
    from flask import current_app

    return (app or current_app).extensions[EXTENSION]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lamost-vac")
    except Exception:  # noqa: BLE001 -- not installed: run from a checkout
        return "0+unknown"


def create_app(settings=None, limits: Optional[Limits] = None, engine=None) -> Flask:
    """The service app. ``settings``: :class:`etl.settings.Settings` (default: from the
    environment); ``limits``: :class:`Limits` (default: from the environment, with the
    statement timeout of ``settings``); ``engine``: an engine to use instead of the
    read-only one built from ``settings.reader_url`` (tests)."""
    if settings is None:
        from etl.settings import load_settings

        settings = load_settings()
    if limits is None:
        limits = Limits.from_environ(settings=settings)
    app = Flask("service", static_folder=None)
    app.json.sort_keys = False
    app.url_map.strict_slashes = False
    if engine is None:
        engine = make_service_engine(settings)
        cone_engine = (make_service_engine(settings, generic_plans=True)
                       if engine.dialect.name == "postgresql" else engine)
    else:
        cone_engine = engine
    app.extensions[EXTENSION] = ServiceState(
        settings=settings, limits=limits, engine=engine, cone_engine=cone_engine,
        version=_version())

    from service.blueprints import estimates, models, scs, spectra, vosi

    for module in (scs, estimates, spectra, models, vosi):
        app.register_blueprint(module.blueprint)
    _register_error_handlers(app)
    return app


def error_response(status: int, message: str, parameter: str = None):
    document = {"error": message, "status": status}
    if parameter:
        document["parameter"] = parameter
    return formats.json_response(document, status=status)


def database_error_response(error: BaseException):
    """(status, message) for a database error: timeouts and outages are 503."""
    if is_statement_timeout(error):
        return 503, (f"the query ran past the statement timeout of "
                     f"{state().limits.statement_timeout_ms} ms; narrow it (smaller radius, "
                     f"tighter ranges, smaller limit)")
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return 503, "the database connection was lost; retry"
    if isinstance(error, DBAPIError) and _is_connection_error(error):
        return 503, "the database is not available"
    log.exception("database error on %s", request.path)
    return 500, "internal database error"


def _is_connection_error(error) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(error, InterfaceError):
        return True
    if isinstance(error, OperationalError):
        text = str(error.orig).lower()
        return any(word in text for word in ("connect", "terminat", "closed", "unable to open"))
    return False


def _register_error_handlers(app):
    @app.errorhandler(ParamError)
    def _bad_parameter(error):
        return error_response(400, str(error), error.name)

    @app.errorhandler(HTTPException)
    def _http_error(error):
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(SQLAlchemyError)
    def _database_error(error):
        status, message = database_error_response(error)
        return error_response(status, message)

    @app.errorhandler(Exception)
    def _unexpected(error):
        log.exception("unhandled error on %s", request.path)
        return error_response(500, "internal error")
