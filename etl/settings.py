"""Every setting of lamost-vac, declared once, read once from environment variables.

Each field of :class:`Settings` names its environment variable, what it means and its
default; :func:`load_settings` reads them all with one reader per type, and the README's
configuration table is :func:`markdown_table` (a test checks that they agree). Every
process (CLI, Celery worker and beat, Flask service, gunicorn) reads the same object:
:data:`settings`; tests and tools that need other values build their own with
``load_settings({...})`` or ``Settings(...)``.

This module imports nothing from the rest of the project, so that the read-only service
can read its configuration without importing the writer side.
"""
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Mapping, Optional

DEFAULT_DATABASE_URL = "sqlite:///lamost_vac.db"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))     # the CPUs this process may run on
    except AttributeError:                      # not on Linux
        return os.cpu_count() or 1


def _half_the_cores() -> int:
    """Large queries keep the other half of the cores for everything else."""
    return max(1, available_cores() // 2)


def setting(variable, meaning, default=None, *, shown=None, minimum=None, secret=False,
            default_factory=None):
    """A field of :class:`Settings` read from ``variable``.

    ``shown``: the default as the documentation states it (when the value alone does not
    say it); ``minimum``: the smallest accepted number (numbers are otherwise > 0);
    ``secret``: never shown by ``repr``, and also read from the file ``variable_FILE``.
    """
    metadata = {"variable": variable, "meaning": meaning, "shown": shown,
                "minimum": minimum, "secret": secret}
    if default_factory is not None:
        return field(default_factory=default_factory, repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # -- where things are
    database_url: str = setting(
        "LAMOST_VAC_DATABASE_URL", "catalogue database (writer)", DEFAULT_DATABASE_URL)
    reader_database_url: Optional[str] = setting(
        "LAMOST_VAC_READER_DATABASE_URL",
        "what the API connects with (production: the `lamost_vac_reader` role)",
        shown="the writer URL")
    broker_url: Optional[str] = setting(
        "LAMOST_VAC_BROKER_URL",
        "Celery broker, e.g. `redis://:PASSWORD@127.0.0.1:6379/0` (password URL-encoded)",
        shown="unset: tasks run in-process")
    result_backend: Optional[str] = setting(
        "LAMOST_VAC_RESULT_BACKEND", "Celery results", shown="the broker when it is Redis")
    model_dir: str = setting(
        "LAMOST_VAC_MODEL_DIR",
        "where model artifacts are stored; workers and `infer` load artifacts only from under it",
        "runs/models")
    spectra_root: Optional[str] = setting(
        "LAMOST_VAC_SPECTRA_ROOT",
        "where a worker (or `infer` without a broker) finds the spectrum files",
        shown="the root recorded at ingest")
    shared_dir: str = setting(
        "LAMOST_VAC_SHARED", "shared test data (`data/`, `tools/`)", "../shared")
    debug: bool = setting(
        "LAMOST_VAC_DEBUG", "`1`: a failing command shows the Python traceback instead of "
        "one line", False)
    # -- ETL and batch pipeline
    ingest_batch_rows: int = setting(
        "LAMOST_VAC_INGEST_BATCH_ROWS", "rows per COPY and transaction during ingest", 50000)
    visibility_timeout_s: int = setting(
        "LAMOST_VAC_VISIBILITY_TIMEOUT_S",
        "Redis: a batch taken by a worker that died is redelivered after this long; keep "
        "it above the longest batch", 1800)
    reprocess_interval_s: int = setting(
        "LAMOST_VAC_REPROCESS_INTERVAL_S", "beat period of the stale-spectra reprocessing", 3600)
    # -- the query service
    statement_timeout_ms: int = setting(
        "LAMOST_VAC_STATEMENT_TIMEOUT_MS", "every API statement is cancelled after this long "
        "(HTTP 503)", 10000)
    scs_max_sr_deg: float = setting(
        "LAMOST_VAC_SCS_MAX_SR_DEG", "largest cone radius (`/scs` SR, `/api/v1` radius), deg", 3.0)
    scs_default_maxrec: int = setting(
        "LAMOST_VAC_SCS_MAXREC_DEFAULT", "rows `/scs` returns when MAXREC is not given", 10000)
    scs_max_records: int = setting(
        "LAMOST_VAC_SCS_MAXREC_MAX", "hard row cap of `/scs` (a larger MAXREC is reduced to it)",
        20000)
    api_default_limit: int = setting(
        "LAMOST_VAC_API_LIMIT_DEFAULT", "rows per page of `/api/v1/estimates` by default", 100)
    api_max_limit: int = setting(
        "LAMOST_VAC_API_LIMIT_MAX", "largest `limit` of `/api/v1/estimates`", 5000)
    api_max_rows_read: int = setting(
        "LAMOST_VAC_API_MAX_ROWS_READ", "most rows a page of `/api/v1/estimates` without a "
        "cone reads (PostgreSQL): a selection is sorted up to this size, an index walked no "
        "further; a page that needs more is refused (HTTP 400 saying what to narrow)", 10000)
    small_cone_deg: float = setting(
        "LAMOST_VAC_SMALL_CONE_DEG", "cones up to this radius (deg) are small queries; wider "
        "cones and range queries without one are large", 0.25)
    large_queries_per_client: int = setting(
        "LAMOST_VAC_LARGE_QUERIES_PER_CLIENT",
        "large queries one client address runs at once (more: 429 with Retry-After)", 1)
    large_queries_max: int = setting(
        "LAMOST_VAC_LARGE_QUERIES_MAX",
        "large queries the whole API runs at once, all gunicorn workers together",
        shown="half the cores, at least 1", default_factory=_half_the_cores)
    health_timeout_ms: int = setting(
        "LAMOST_VAC_HEALTH_TIMEOUT_MS",
        "statement timeout and pool wait of `/health`, `/availability`, `/capabilities`", 1000)
    trusted_proxies: int = setting(
        "LAMOST_VAC_TRUSTED_PROXIES",
        "reverse proxies in front of the API whose `X-Forwarded-For` names the client", 0,
        minimum=0)
    trusted_hosts: Optional[str] = setting(
        "LAMOST_VAC_TRUSTED_HOSTS",
        "host names the API answers to, comma-separated (e.g. `vac.example.org,localhost`); "
        "a request naming another `Host` gets 400. Every absolute link the service writes "
        "(next pages, TAP jobs, DataLink, capabilities) is built from the request's host",
        shown="unset: any host (development)")
    tap_default_maxrec: int = setting(
        "LAMOST_VAC_TAP_MAXREC_DEFAULT", "rows `/tap/sync` returns when MAXREC is not given",
        10000)
    tap_max_records: int = setting(
        "LAMOST_VAC_TAP_MAXREC_MAX",
        "hard row cap of `/tap/sync` (a larger MAXREC is reduced to it)", 100000)
    tap_sync_timeout_ms: int = setting(
        "LAMOST_VAC_TAP_SYNC_TIMEOUT_MS",
        "a `/tap/sync` ADQL query is cancelled after this long", 30000)
    tap_upload_max_rows: int = setting(
        "LAMOST_VAC_TAP_UPLOAD_MAX_ROWS", "most rows of a table uploaded to `/tap` (UPLOAD)",
        10000)
    tap_upload_max_bytes: int = setting(
        "LAMOST_VAC_TAP_UPLOAD_MAX_BYTES", "largest VOTable uploaded to `/tap`, bytes",
        5000000)
    tap_async_timeout_ms: int = setting(
        "LAMOST_VAC_TAP_ASYNC_TIMEOUT_MS",
        "a `/tap/async` job's query is cancelled after this long", 600000)
    tap_async_jobs_per_client: int = setting(
        "LAMOST_VAC_TAP_ASYNC_JOBS_PER_CLIENT",
        "`/tap/async` jobs one client address may have queued or executing at once", 2)
    tap_async_kept_jobs_per_client: int = setting(
        "LAMOST_VAC_TAP_ASYNC_KEPT_JOBS_PER_CLIENT",
        "`/tap/async` jobs one client address may keep, in any phase, until they are "
        "destroyed or deleted (each may hold uploads and a result on disk)", 100)
    tap_job_dir: str = setting(
        "LAMOST_VAC_TAP_JOB_DIR",
        "where `/tap/async` jobs and their results are kept (shared by the API and the "
        "workers that run them)", "runs/tap-jobs")
    tap_retention_s: int = setting(
        "LAMOST_VAC_TAP_RETENTION_S",
        "a `/tap/async` job and its result are destroyed this long after creation", 86400)
    datalink_max_ids: int = setting(
        "LAMOST_VAC_DATALINK_MAX_IDS",
        "obsids one DataLink `/datalink/links` request answers (the rest: DALI overflow)",
        1000)
    # -- passwords of the PostgreSQL roles, for the role set-up only (never printed)
    writer_password: Optional[str] = setting(
        "LAMOST_VAC_WRITER_PASSWORD", "password `lamost-vac db upgrade` gives the "
        "`lamost_vac_writer` role (`_FILE`: read from that file, e.g. a Docker secret)",
        shown="unset: left as it is", secret=True)
    reader_password: Optional[str] = setting(
        "LAMOST_VAC_READER_PASSWORD", "the same for the `lamost_vac_reader` role",
        shown="unset: left as it is", secret=True)
    analyst_password: Optional[str] = setting(
        "LAMOST_VAC_ANALYST_PASSWORD", "the same for the `lamost_vac_analyst` role (SQL "
        "collaborators)", shown="unset: left as it is", secret=True)

    @property
    def trusted_host_names(self) -> Optional[list]:
        """``trusted_hosts`` as a list (None: any host)."""
        if not self.trusted_hosts:
            return None
        return [name.strip() for name in self.trusted_hosts.split(",") if name.strip()]

    @property
    def reader_url(self) -> str:
        """The URL for read-only access; falls back to the writer URL (embedded use)."""
        return self.reader_database_url or self.database_url

    @property
    def eager_tasks(self) -> bool:
        """No broker configured: Celery tasks run in-process."""
        return not self.broker_url


def _blank_to_none(value):
    return value if value not in (None, "") else None


def _field_type(hint):
    """``int``, ``float`` or ``str`` of a field annotation (``Optional[X]`` -> ``X``)."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments else hint


def _read_secret(env, name):
    """``NAME_FILE`` (a Docker or Kubernetes secret file) or else ``NAME``."""
    path, value = _blank_to_none(env.get(name + "_FILE")), _blank_to_none(env.get(name))
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    try:
        with open(path, encoding="utf-8") as handle:
            return _blank_to_none(handle.read().rstrip("\r\n"))
    except OSError as error:
        raise ValueError(f"{name}_FILE: cannot read {path}: {error.strerror}") from None


def _read_flag(name, raw):
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (true or false), got {raw!r}")


def _read_number(kind, name, raw, minimum):
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    if minimum is None and value <= 0:
        raise ValueError(f"{name} must be above 0, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); unset or empty = the default.

    A value that cannot be read raises ValueError naming the variable.
    """
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values = {}
    for item in fields(Settings):
        name, meta = item.metadata["variable"], item.metadata
        if meta["secret"]:
            values[item.name] = _read_secret(env, name)
            continue
        raw = _blank_to_none(env.get(name))
        if raw is None:
            continue                                  # the declared default
        kind = _field_type(hints[item.name])
        if kind is str:
            values[item.name] = raw
        elif kind is bool:
            values[item.name] = _read_flag(name, raw)
        else:
            values[item.name] = _read_number(kind, name, raw, meta["minimum"])
    result = Settings(**values)
    _check(result)
    return result


def _check(s: Settings):
    if s.scs_default_maxrec > s.scs_max_records:
        raise ValueError("LAMOST_VAC_SCS_MAXREC_DEFAULT exceeds LAMOST_VAC_SCS_MAXREC_MAX")
    if s.api_default_limit > s.api_max_limit:
        raise ValueError("LAMOST_VAC_API_LIMIT_DEFAULT exceeds LAMOST_VAC_API_LIMIT_MAX")
    if s.tap_default_maxrec > s.tap_max_records:
        raise ValueError("LAMOST_VAC_TAP_MAXREC_DEFAULT exceeds LAMOST_VAC_TAP_MAXREC_MAX")
    if not 0 < s.scs_max_sr_deg <= 180:
        raise ValueError("LAMOST_VAC_SCS_MAX_SR_DEG must be in (0, 180]")


def documented_default(item) -> str:
    """The default of a :class:`Settings` field as the configuration table states it."""
    if item.metadata["shown"] is not None:
        return item.metadata["shown"]
    if isinstance(item.default, bool):
        return f"`{int(item.default)}`"
    return f"`{item.default}`"


def markdown_table() -> str:
    """The configuration table of the README (a test compares them)."""
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    for item in fields(Settings):
        lines.append(f"| `{item.metadata['variable']}` | {item.metadata['meaning']} | "
                     f"{documented_default(item)} |")
    return "\n".join(lines)


settings = load_settings()
