"""The service's database engine: read-only, with a statement timeout.

* URL: ``settings.reader_url`` (LAMOST_VAC_READER_DATABASE_URL; in production the
  ``lamost_vac_reader`` role, which has SELECT only).
* PostgreSQL: every session also starts with ``default_transaction_read_only = on`` and
  ``statement_timeout`` = LAMOST_VAC_STATEMENT_TIMEOUT_MS, so even a URL with a writing
  role cannot write through the service and no query runs longer than the timeout.
* SQLite: the file is opened with ``mode=ro`` (and ``PRAGMA query_only``); a progress
  handler interrupts any statement that runs past the timeout.
"""
import sqlite3
import time
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url

from etl import db as etl_db

APPLICATION_NAME = "lamost-vac-service"
PROGRESS_STEPS = 2000      # SQLite VM instructions between two timeout checks


def sqlite_read_only_url(url: str) -> str:
    """The SQLite ``url`` opened read-only (``mode=ro``)."""
    parsed = make_url(url)
    database = parsed.database or ""
    if "mode=ro" in database or parsed.query.get("mode") == "ro":
        return url
    return etl_db.reader_url_for(url)


def make_service_engine(settings, pool_size: int = 5, generic_plans: bool = False,
                        timeout_ms: int = None) -> Engine:
    """The read-only engine; statements are cancelled after ``timeout_ms`` (default:
    ``settings.statement_timeout_ms``), which also bounds the wait for a pooled connection
    when it is shorter than the default 30 s.

    ``generic_plans`` (PostgreSQL): sessions use ``plan_cache_mode = force_generic_plan``
    -- for the fixed cone-search statement only: a Q3C cone expands into ~100 index ranges
    whose planning costs milliseconds per query, while a prepared statement with a generic
    plan computes them at execution from the bound values. psycopg prepares a statement
    from its second execution on a connection. JIT compilation is off: it costs far more
    than these short queries run. Parallel query is off: one request's query uses one core,
    so that a few large queries cannot take every core from the others.
    """
    url = etl_db.normalise_url(settings.reader_url)
    timeout_ms = int(settings.statement_timeout_ms if timeout_ms is None else timeout_ms)
    if url.startswith("sqlite"):
        engine = etl_db.make_engine(sqlite_read_only_url(url))
        _install_sqlite_guards(engine, timeout_ms)
        return engine
    options = "-c default_transaction_read_only=on -c jit=off"
    options += " -c max_parallel_workers_per_gather=0"
    if generic_plans:
        options += " -c plan_cache_mode=force_generic_plan"
    if timeout_ms > 0:
        options += f" -c statement_timeout={timeout_ms}"
    pool_timeout_s = min(30.0, timeout_ms / 1000) if timeout_ms > 0 else 30.0
    # AUTOCOMMIT: a read-only query needs no BEGIN / ROLLBACK round trips (each statement
    # is its own read-only transaction). No pool_pre_ping: it would cost a round trip per
    # request; a connection broken by a database restart fails one request (503) and the
    # pool is then invalidated. connect_timeout: an unreachable server is a 503 in seconds
    # (libpq's minimum is 2 s), not after the operating system's TCP timeout.
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                         pool_timeout=pool_timeout_s, pool_recycle=3600,
                         isolation_level="AUTOCOMMIT",
                         connect_args={"options": options, "prepare_threshold": 1,
                                       "application_name": APPLICATION_NAME,
                                       "connect_timeout": (max(2, -(-timeout_ms // 1000))
                                                           if timeout_ms > 0 else 10)})


def _install_sqlite_guards(engine, timeout_ms):
    @event.listens_for(engine, "connect")
    def _read_only_and_deadline(dbapi_connection, record):
        dbapi_connection.execute("PRAGMA query_only = ON")
        state = {"deadline": None}
        record.info["lamost_vac_deadline"] = state
        if timeout_ms > 0:
            def check():
                deadline = state["deadline"]
                return 1 if deadline is not None and time.monotonic() > deadline else 0
            dbapi_connection.set_progress_handler(check, PROGRESS_STEPS)

    @event.listens_for(engine, "before_cursor_execute")
    def _start_clock(connection, cursor, statement, parameters, context, executemany):
        state = connection.info.get("lamost_vac_deadline")
        if state is not None and timeout_ms > 0:
            state["deadline"] = time.monotonic() + timeout_ms / 1000.0


@contextmanager
def custom_plans(connection):
    """PostgreSQL plans the statements run inside for their bound values (a custom plan)
    even once psycopg has prepared them: a generic plan, which the server picks after five
    runs, assumes a narrow range for ``teff >= $1 AND teff <= $2`` and walks the index
    where a large selection wants a sequential scan (the histograms of 440,000 of a
    million estimates took 12.3 s instead of 3.0 s). Nothing changes on SQLite."""
    if connection.dialect.name != "postgresql":
        yield
        return
    connection.exec_driver_sql("SET plan_cache_mode = force_custom_plan")
    try:
        yield
    finally:
        connection.exec_driver_sql("RESET plan_cache_mode")


def is_statement_timeout(error: BaseException) -> bool:
    """True for a PostgreSQL statement timeout or an interrupted SQLite statement."""
    original = getattr(error, "orig", error)
    try:
        from psycopg import errors as pg_errors

        if isinstance(original, pg_errors.QueryCanceled):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(original, sqlite3.OperationalError) and "interrupted" in str(original)
