"""Settings read once from environment variables, with defaults that need no services.

Every process (CLI, Celery worker, Flask service) imports :data:`settings`; tests and
tools that need different values build their own with :func:`load_settings`.

=================================  ==========================================  =========================
variable                           meaning                                     default
=================================  ==========================================  =========================
LAMOST_VAC_DATABASE_URL            SQLAlchemy URL of the catalogue (writer)    ``sqlite:///lamost_vac.db``
LAMOST_VAC_READER_DATABASE_URL     URL the read-only service connects with     same as the writer URL
                                   (production: the ``lamost_vac_reader`` role)
LAMOST_VAC_BROKER_URL              Celery broker (e.g. ``redis://...``)        unset = tasks run eagerly
LAMOST_VAC_RESULT_BACKEND          Celery result backend                       unset
LAMOST_VAC_MODEL_DIR               where trained model artifacts are stored    ``runs/models``
LAMOST_VAC_SPECTRA_ROOT            root that spectrum file paths are under     unset
LAMOST_VAC_SHARED                  shared folder (data/, tools/; tests, bench) ``../shared``
LAMOST_VAC_STATEMENT_TIMEOUT_MS    statement timeout for the read-only service ``10000``
LAMOST_VAC_INGEST_BATCH_ROWS       rows per COPY / transaction during ingest   ``50000``
LAMOST_VAC_WRITER_PASSWORD[_FILE]  password ``db upgrade`` gives the writer    unset: left as it is
                                   role (``_FILE``: read from that file)
LAMOST_VAC_READER_PASSWORD[_FILE]  the same for the reader role                unset: left as it is
=================================  ==========================================  =========================
"""
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

DEFAULT_DATABASE_URL = "sqlite:///lamost_vac.db"


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    reader_database_url: Optional[str] = None
    broker_url: Optional[str] = None
    result_backend: Optional[str] = None
    model_dir: str = "runs/models"
    spectra_root: Optional[str] = None
    shared_dir: str = "../shared"
    statement_timeout_ms: int = 10000
    ingest_batch_rows: int = 50000
    # passwords of the PostgreSQL roles, for the role set-up only (never printed)
    writer_password: Optional[str] = field(default=None, repr=False)
    reader_password: Optional[str] = field(default=None, repr=False)

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


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Build settings from ``environ`` (default ``os.environ``); unset or empty = default."""
    env = os.environ if environ is None else environ
    defaults = Settings()

    def text(name, default):
        return _blank_to_none(env.get(name)) or default

    def integer(name, default):
        raw = _blank_to_none(env.get(name))
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None

    def secret(name):
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

    return Settings(
        database_url=text("LAMOST_VAC_DATABASE_URL", defaults.database_url),
        reader_database_url=_blank_to_none(env.get("LAMOST_VAC_READER_DATABASE_URL")),
        broker_url=_blank_to_none(env.get("LAMOST_VAC_BROKER_URL")),
        result_backend=_blank_to_none(env.get("LAMOST_VAC_RESULT_BACKEND")),
        model_dir=text("LAMOST_VAC_MODEL_DIR", defaults.model_dir),
        spectra_root=_blank_to_none(env.get("LAMOST_VAC_SPECTRA_ROOT")),
        shared_dir=text("LAMOST_VAC_SHARED", defaults.shared_dir),
        statement_timeout_ms=integer("LAMOST_VAC_STATEMENT_TIMEOUT_MS", defaults.statement_timeout_ms),
        ingest_batch_rows=integer("LAMOST_VAC_INGEST_BATCH_ROWS", defaults.ingest_batch_rows),
        writer_password=secret("LAMOST_VAC_WRITER_PASSWORD"),
        reader_password=secret("LAMOST_VAC_READER_PASSWORD"),
    )


settings = load_settings()
