"""Flask application factory of the read-only query service.

``create_app(settings=None)`` builds the app from :mod:`etl.settings` (the database URL the
service reads with is ``settings.reader_url``) and the service limits; run it with
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
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from service import errors
from service.blueprints import datalink, estimates, models, pages, scs, spectra, tap, vosi
from service.db import make_service_engine
from service.limiter import LargeQueryLimiter, lock_directory
from service.state import EXTENSION, RETRY_AFTER_S, Limits, ServiceState


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
    # Links are built from the request's Host: only the configured names may appear there
    # (a forged Host would otherwise be written into pages a cache may hand to others).
    app.config["TRUSTED_HOSTS"] = settings.trusted_host_names
    if engine is None:
        engine = make_service_engine(settings)
        cone_engine = (make_service_engine(settings, generic_plans=True)
                       if engine.dialect.name == "postgresql" else engine)
        # Its own small pool: the checks never wait behind connections held by queries.
        health_engine = make_service_engine(settings, pool_size=1,
                                            timeout_ms=limits.health_timeout_ms)
        tap_engine = tap_async_engine = None
        if engine.dialect.name == "postgresql":
            tap_engine = make_service_engine(settings, timeout_ms=limits.tap_sync_timeout_ms)
            tap_async_engine = make_service_engine(settings, pool_size=2,
                                                   timeout_ms=limits.tap_async_timeout_ms)
    else:
        cone_engine = health_engine = tap_engine = tap_async_engine = engine
    limiter = LargeQueryLimiter(lock_directory(settings.reader_url),
                                per_client=limits.large_queries_per_client,
                                total=limits.large_queries_max, retry_after_s=RETRY_AFTER_S)
    app.extensions[EXTENSION] = ServiceState(
        settings=settings, limits=limits, engine=engine, cone_engine=cone_engine,
        health_engine=health_engine, limiter=limiter, version=_version(),
        tap_engine=tap_engine, tap_async_engine=tap_async_engine)
    if limits.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=limits.trusted_proxies)

    for module in (scs, estimates, spectra, models, vosi, pages, tap, datalink):
        app.register_blueprint(module.blueprint)
    app.before_request(errors.refuse_oversize_request)
    errors.register_error_handlers(app)
    return app


