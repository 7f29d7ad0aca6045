"""Per-app state of the service (``app.extensions["lamost_vac"]``, Flask's own pattern):
settings, published limits, engines and the large-query limiter; and the two helpers the
blueprints use to run a query as a *large* one.

Blueprints import this module, never :mod:`service.app` (which registers them).
"""
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

from flask import Response, current_app, request

from service.limiter import LargeQueryLimiter

EXTENSION = "lamost_vac"

LIMITS_DESCRIPTION = (
    "Limits: cone radius (SR, radius) at most {scs_max_sr_deg:g} deg; /scs returns "
    "{scs_default_maxrec} rows unless MAXREC is given and never more than "
    "{scs_max_records} (DALI overflow INFO when truncated); /api/v1/estimates pages hold "
    "{api_default_limit} rows by default and at most {api_max_limit} (keyset pagination "
    "with a next link), and a page without a cone reads at most {api_max_rows_read} rows "
    "(a page that would need more is refused, HTTP 400, saying what to narrow); every "
    "database statement is cancelled after "
    "{statement_timeout_ms} ms (HTTP 503). Large queries (a cone wider than "
    "{small_cone_deg:g} deg, or a range query without such a cone) run at most "
    "{large_queries_per_client} at a time per client and {large_queries_max} at a time on "
    "the service; beyond that they are answered HTTP 429 with Retry-After.")


# Retry-After of a 429: within the limits a large query takes a second or two.
RETRY_AFTER_S = 2
@dataclass(frozen=True)
class Limits:
    """The limits the service publishes: the settings of the same names."""
    scs_max_sr_deg: float
    scs_default_maxrec: int
    scs_max_records: int
    api_default_limit: int
    api_max_limit: int
    api_max_rows_read: int
    statement_timeout_ms: int
    small_cone_deg: float
    large_queries_per_client: int
    large_queries_max: int
    health_timeout_ms: int
    trusted_proxies: int
    tap_default_maxrec: int
    tap_max_records: int
    tap_sync_timeout_ms: int
    tap_upload_max_rows: int
    tap_upload_max_bytes: int
    tap_async_timeout_ms: int
    tap_async_jobs_per_client: int
    tap_async_kept_jobs_per_client: int
    tap_retention_s: int
    datalink_max_ids: int

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
    tap_engine: object = None   # /tap ADQL queries: the TAP timeout (PostgreSQL only)
    tap_async_engine: object = None     # /tap/async jobs: the async timeout

    @property
    def serves_tap(self) -> bool:
        """TAP needs PostgreSQL (Q3C for the geometry, the read-only reader role)."""
        return self.tap_engine is not None and self.tap_engine.dialect.name == "postgresql"

    def dispose(self):
        for engine in {id(e): e for e in (self.engine, self.cone_engine,
                                           self.health_engine, self.tap_engine,
                                           self.tap_async_engine)
                       if e is not None}.values():
            engine.dispose()


def state(app=None) -> ServiceState:
    return (app or current_app).extensions[EXTENSION]



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
