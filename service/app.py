"""Flask application factory of the read-only query service.

``create_app(settings=None)`` builds the app from :mod:`etl.settings` (the database URL the
service reads with is ``settings.reader_url``) and the service limits below; run it with
``lamost-vac serve`` (development server) or, in production, with gunicorn and the
configuration shipped in :mod:`service.gunicorn_conf`::

    gunicorn -c python:service.gunicorn_conf -b 127.0.0.1:8000 'service.app:create_app()'

Service limits are settings like any other (:mod:`etl.settings`, the README's
configuration table): cone radius, row caps, page sizes, statement timeouts and the
large-query slots. They are published in ``/capabilities``, ``/health`` and the OpenAPI
document.

With these limits the most expensive accepted query runs for a few seconds at most on a
catalogue of a million rows (``python bench/attack.py`` measures it), well inside the
statement timeout; small queries are never limited, so they keep being answered while
large ones run.
"""
import logging
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

from flask import Flask, Response, request
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from service import formats
from service.db import is_statement_timeout, make_service_engine
from service.limiter import LargeQueryLimiter, LargeQueryRefused, lock_directory
from service.openapi import ParamError

log = logging.getLogger(__name__)

EXTENSION = "lamost_vac"

LIMITS_DESCRIPTION = (
    "Limits: cone radius (SR, radius) at most {scs_max_sr_deg:g} deg; /scs returns "
    "{scs_default_maxrec} rows unless MAXREC is given and never more than "
    "{scs_max_records} (DALI overflow INFO when truncated); /api/v1/estimates pages hold "
    "{api_default_limit} rows by default and at most {api_max_limit} (keyset pagination "
    "with a next link); every database statement is cancelled after "
    "{statement_timeout_ms} ms (HTTP 503). Large queries (a cone wider than "
    "{small_cone_deg:g} deg, or a range query without such a cone) run at most "
    "{large_queries_per_client} at a time per client and {large_queries_max} at a time on "
    "the service; beyond that they are answered HTTP 429 with Retry-After.")

# Retry-After of a 429: within the limits a large query takes a second or two.
RETRY_AFTER_S = 2
# What the app accepts of a request; gunicorn's own limits (service/gunicorn_conf.py) are
# set above these, so that an over-long request gets this service's error format.
MAX_REQUEST_TARGET_BYTES = 4096
MAX_HEADER_FIELDS = 100
MAX_HEADER_FIELD_BYTES = 8190


@dataclass(frozen=True)
class Limits:
    """The limits the service publishes: the settings of the same names."""
    scs_max_sr_deg: float
    scs_default_maxrec: int
    scs_max_records: int
    api_default_limit: int
    api_max_limit: int
    statement_timeout_ms: int
    small_cone_deg: float
    large_queries_per_client: int
    large_queries_max: int
    health_timeout_ms: int
    trusted_proxies: int

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServiceState:
    settings: object
    limits: Limits
    engine: object          # every query but the cone search
    cone_engine: object     # the fixed /scs statement (generic plans on PostgreSQL)
    health_engine: object   # /health, /availability, /capabilities: short timeout, own pool
    limiter: LargeQueryLimiter
    version: str

    def dispose(self):
        for engine in {id(e): e for e in (self.engine, self.cone_engine,
                                           self.health_engine)}.values():
            engine.dispose()


def state(app=None) -> ServiceState:
    from flask import current_app

    return (app or current_app).extensions[EXTENSION]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lamost-vac")
    except Exception:  # noqa: BLE001 -- not installed: run from a checkout
        return "0+unknown"


def create_app(settings=None, engine=None) -> Flask:
    """The service app. ``settings``: :class:`etl.settings.Settings` (default: from the
    environment; the reader URL, the limits); ``engine``: an engine to use instead of
    the read-only one built from ``settings.reader_url`` (tests)."""
    if settings is None:
        from etl.settings import load_settings

        settings = load_settings()
    limits = Limits.from_settings(settings)
    app = Flask("service", static_folder=None)
    app.json.sort_keys = False
    app.url_map.strict_slashes = False
    if engine is None:
        engine = make_service_engine(settings)
        cone_engine = (make_service_engine(settings, generic_plans=True)
                       if engine.dialect.name == "postgresql" else engine)
        # Its own small pool: the checks never wait behind connections held by queries.
        health_engine = make_service_engine(settings, pool_size=1,
                                            timeout_ms=limits.health_timeout_ms)
    else:
        cone_engine = health_engine = engine
    limiter = LargeQueryLimiter(lock_directory(settings.reader_url),
                                per_client=limits.large_queries_per_client,
                                total=limits.large_queries_max, retry_after_s=RETRY_AFTER_S)
    app.extensions[EXTENSION] = ServiceState(
        settings=settings, limits=limits, engine=engine, cone_engine=cone_engine,
        health_engine=health_engine, limiter=limiter, version=_version())
    if limits.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=limits.trusted_proxies)

    from service.blueprints import estimates, models, scs, spectra, vosi

    for module in (scs, estimates, spectra, models, vosi):
        app.register_blueprint(module.blueprint)
    app.before_request(_refuse_oversize_request)
    _register_error_handlers(app)
    return app


def error_response(status: int, message: str, parameter: str = None, headers=None):
    """The service's error answer: a VOTable error document on /scs (what cone-search
    clients read), JSON ``{"error", "status"[, "parameter"]}`` everywhere else."""
    if request.blueprint == "scs":
        return Response(formats.votable_error(message), status=status,
                        mimetype=formats.VOTABLE_MIME, headers=headers)
    document = {"error": message, "status": status}
    if parameter:
        document["parameter"] = parameter
    return formats.json_response(document, status=status, headers=headers)


def _refuse_oversize_request():
    """414 / 431 in the service's error format for requests gunicorn let through."""
    target = request.environ.get("RAW_URI") or request.full_path
    if len(target) > MAX_REQUEST_TARGET_BYTES:
        return error_response(414, f"the request URI is {len(target)} bytes long; at most "
                                   f"{MAX_REQUEST_TARGET_BYTES} are accepted")
    if len(request.headers) > MAX_HEADER_FIELDS:
        return error_response(431, f"the request has {len(request.headers)} header fields; "
                                   f"at most {MAX_HEADER_FIELDS} are accepted")
    for name, value in request.headers.items():
        if len(name) + len(value) + 2 > MAX_HEADER_FIELD_BYTES:
            return error_response(431, f"the header field {name[:40]!r} is "
                                       f"{len(name) + len(value) + 2} bytes long; at most "
                                       f"{MAX_HEADER_FIELD_BYTES} are accepted")
    return None


def is_small_cone(radius: Optional[float]) -> bool:
    return radius is not None and radius <= state().limits.small_cone_deg


def large_query(make_response: Callable[[], Response]) -> Response:
    """``make_response()`` run as a large query of this client (see
    :mod:`service.limiter`); :class:`LargeQueryRefused` (429) when the client or the
    service already runs its maximum. The slots are held until the response has been
    sent: the WSGI server closes it then (a test client must close it: ``with
    client.get(...)``)."""
    grant = state().limiter.acquire(request.remote_addr or "unknown")
    try:
        response = make_response()
    except BaseException:
        grant.release()
        raise
    response.call_on_close(grant.release)
    return response


def database_error_response(error: BaseException):
    """(status, message) for a database error: timeouts and outages are 503."""
    if is_statement_timeout(error):
        return 503, (f"the query ran past the statement timeout of "
                     f"{state().limits.statement_timeout_ms} ms; narrow it (smaller radius, "
                     f"tighter ranges, smaller limit)")
    if isinstance(error, PoolTimeoutError):
        return 503, "every database connection of this worker is busy; retry"
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

    @app.errorhandler(LargeQueryRefused)
    def _too_many_large_queries(error):
        return error_response(429, str(error),
                              headers={"Retry-After": str(error.retry_after_s)})

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
