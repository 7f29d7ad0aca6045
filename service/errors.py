"""The service's error answers: a VOTable error document on ``/scs``, ``/tap`` and
``/datalink`` (what IVOA clients read), JSON ``{"error", "status"[, "parameter"]}``
everywhere else; what a database error becomes (timeouts and outages are 503); oversize
requests (414, 431)."""
import logging

from flask import Response, g, render_template, request
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException, SecurityError

from service import formats
from service.db import is_statement_timeout
from service.limiter import LargeQueryRefused
from service.openapi import ParamError
from service.state import state

log = logging.getLogger(__name__)

# What the app accepts of a request; gunicorn's own limits (service/gunicorn_conf.py) are
# set above these, so that an over-long request gets this service's error format.
MAX_REQUEST_TARGET_BYTES = 4096
MAX_HEADER_FIELDS = 100
MAX_HEADER_FIELD_BYTES = 8190


# IVOA protocols whose clients read errors as a VOTable with QUERY_STATUS=ERROR.
VOTABLE_ERROR_BLUEPRINTS = ("scs", "tap", "datalink")


NOT_PAGE_PATHS = ("/api/", "/scs", "/tap", "/datalink", "/capabilities", "/availability",
                  "/tables", "/openapi", "/health")


def wants_html() -> bool:
    """A browser (text/html preferred over JSON); clients without a preference get JSON."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def error_response(status: int, message: str, parameter: str = None, headers=None):
    """The service's error answer: a VOTable error document on /scs, /tap and /datalink
    (what IVOA clients read), an HTML page on the pages for people (also for a browser's
    request that no page answers: an unknown path or method, an over-long URL), JSON
    ``{"error", "status"[, "parameter"]}`` everywhere else."""
    # "/" is the search page for a browser (vosi's description of the service otherwise);
    # an unrouted request is a page's unless its path is the JSON API's or a protocol's
    # (TOPCAT and STILTS send text/html first in their Accept header)
    page = request.blueprint == "pages" or request.path == "/" or (
        request.blueprint is None and not request.path.startswith(NOT_PAGE_PATHS))
    if g.get("html_errors") or (page and wants_html()):
        return Response(render_template("error.html", status=status, message=message),
                        status=status, mimetype="text/html", headers=headers)
    if request.blueprint in VOTABLE_ERROR_BLUEPRINTS:
        return Response(formats.votable_error(message), status=status,
                        mimetype=formats.VOTABLE_MIME, headers=headers)
    document = {"error": message, "status": status}
    if parameter:
        document["parameter"] = parameter
    return formats.json_response(document, status=status, headers=headers)


def refuse_oversize_request():
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


def register_error_handlers(app):
    @app.errorhandler(ParamError)
    def _bad_parameter(error):
        return error_response(400, str(error), error.name)

    @app.errorhandler(LargeQueryRefused)
    def _too_many_large_queries(error):
        return error_response(429, str(error),
                              headers={"Retry-After": str(error.retry_after_s)})

    @app.errorhandler(SecurityError)
    def _untrusted_host(error):
        # no URL can be built for an untrusted Host (LAMOST_VAC_TRUSTED_HOSTS): a page
        # cannot be rendered, so the answer is plain JSON whoever asks
        return formats.json_response({"error": error.description, "status": 400}, status=400)

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
