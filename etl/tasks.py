"""Celery application and tasks of the batch pipeline.

Configuration comes from :mod:`etl.settings` (environment variables):

* ``LAMOST_VAC_BROKER_URL`` -- the broker (``redis://host:6379/0``). **Unset: eager
  mode**, every task runs in the calling process, so ``lamost-vac infer`` works on a
  SQLite file with no services.
* ``LAMOST_VAC_RESULT_BACKEND`` -- where task results (per-batch counts, read by
  ``infer`` for its progress and summary) are kept; default: the broker URL when the
  broker is Redis, none otherwise (``infer`` then dispatches without waiting).
* ``LAMOST_VAC_DATABASE_URL`` -- the one database this worker reads and writes.
* ``LAMOST_VAC_MODEL_DIR`` -- the only folder this worker loads model artifacts from.
* ``LAMOST_VAC_SPECTRA_ROOT`` -- where this worker finds the spectrum files (see
  :mod:`etl.inference` for the order in which roots are tried).
* ``LAMOST_VAC_VISIBILITY_TIMEOUT_S`` (default 1800) -- Redis: a message delivered to a
  worker that died (kill -9, lost machine) goes back to the queue after this long; keep it
  above the longest batch (a batch still running then is re-run elsewhere: harmless, the
  writes are idempotent, only wasted work).
* ``LAMOST_VAC_REPROCESS_INTERVAL_S`` (default 3600) -- period of the beat entry that
  runs :func:`reprocess_stale`.

Messages carry ids, never URLs or paths. Anyone who can write to the broker can queue a
task, so a worker trusts nothing in a message but ids, and checks them against its own
database: ``infer_batch(model_version, obsids, run_id)`` needs a model version registered
there and an ``infer`` run of that database. A message with any other argument (an older
dispatcher's ``database_url`` or ``spectra_root``, or a forgery naming another database) or
with a run of another database is refused and logged (:class:`TaskRefused`), and nothing
is connected to or loaded. The artifact the worker's own registry names is loaded only from
under LAMOST_VAC_MODEL_DIR after its SHA-256 is checked (:mod:`models.artifact`).

Delivery is at-least-once: ``task_acks_late`` (a message is acknowledged only after the
task returned), ``task_reject_on_worker_lost`` (a pool process killed mid-task puts its
message back), ``worker_prefetch_multiplier = 1`` (a worker holds one message per
process, so a dead worker strands at most that many). A task may therefore run twice;
each batch writes in one transaction with upserts on (obsid, model_version), so running it
twice leaves the same rows -- nothing is lost, nothing duplicated.
"""
import uuid
from contextlib import contextmanager
from dataclasses import replace

from celery import Celery
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger
from sqlalchemy.exc import InterfaceError, OperationalError

from etl import db
from etl.commands import display_url
from etl.settings import settings as _settings
from models.artifact import IncompatibleArtifactError

REPROCESS_MAX_BATCHES = 2000            # per beat tick; the rest waits for the next tick
MAX_BATCH = 100_000                     # obsids per task message (infer --batch-size)
logger = get_task_logger(__name__)


def configure(app, settings=None):
    """(Re)configure ``app`` from ``settings`` (default: the process settings)."""
    settings = settings or _settings
    broker = settings.broker_url
    backend = settings.result_backend
    if backend is None and broker and broker.startswith(("redis://", "rediss://")):
        backend = broker
    visibility = settings.visibility_timeout_s
    interval = settings.reprocess_interval_s
    app.conf.update(
        broker_url=broker or "memory://localhost/",
        result_backend=backend if broker else None,
        task_always_eager=not broker,
        task_eager_propagates=True,
        task_store_eager_result=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        timezone="UTC",
        enable_utc=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            # Sweep for messages of dead workers every few seconds (default: 100 s).
            "unacked_restore_interval": max(1, min(10, visibility // 2)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": visibility},
        beat_schedule={
            "reprocess-stale": {
                "task": "etl.tasks.reprocess_stale",
                "schedule": float(interval),
                # A tick not started before the next one is dropped, never stacked.
                "options": {"expires": float(interval)},
            },
        },
        lamost_vac_settings=settings,
    )
    return app


app = configure(Celery("lamost_vac", include=["etl.tasks"]))


def current_settings():
    return app.conf.get("lamost_vac_settings") or _settings


def messages_in_broker():
    """Messages of the task queue that the Redis broker still holds: waiting, or taken by a
    worker and not yet acknowledged. None when the broker cannot tell (not Redis)."""
    if not str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        return None
    try:
        with app.connection_for_read() as connection:
            client = connection.default_channel.client
            return int(client.llen(app.conf.task_default_queue)) + int(client.hlen("unacked"))
    except Exception:  # noqa: BLE001 -- unknown is an answer here
        return None


# ---------------------------------------------------------------------------------------
# Database engines, one per process (created after a prefork child starts).
_ENGINES = {}


@worker_process_init.connect
def _reset_engines(**_):
    _ENGINES.clear()       # never share a parent's pooled connections with a child


def engine_for():
    """This process's engine on the worker's own database (never one a message names)."""
    url = current_settings().database_url
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = db.make_engine(url)
    return engine


@contextmanager
def in_process_worker(database_url):
    """Eager mode: this process is the worker, and its database is the one the command was
    given (``--url``); tasks run here use it until the block ends."""
    previous = app.conf.get("lamost_vac_settings")
    app.conf.lamost_vac_settings = replace(current_settings(), database_url=database_url)
    try:
        yield
    finally:
        app.conf.lamost_vac_settings = previous


# ---------------------------------------------------------------------------------------
class TaskRefused(ValueError):
    """A task message this worker does not run (module doc); never retried."""


def refuse(task, reason):
    logger.error("refused task %s[%s]: %s", task.name, task.request.id, reason)
    raise TaskRefused(reason)


def check_arguments(task, unexpected, model_version=None, obsids=None, run_id=None):
    """Refuse a message with arguments beyond the ids, or ids of the wrong type."""
    if unexpected:
        refuse(task, f"unexpected argument(s) {', '.join(sorted(unexpected))}: a worker uses "
               "only its own database, model directory and spectra root, never ones a message "
               "names")
    problems = []
    if model_version is not None and not _short_text(model_version):
        problems.append("model_version must be a version string")
    if obsids is not None and not (isinstance(obsids, list) and len(obsids) <= MAX_BATCH and
                                   all(type(o) is int and 0 < o < 2 ** 63 for o in obsids)):
        problems.append(f"obsids must be a list of at most {MAX_BATCH} positive 64-bit integers")
    if run_id is not None and not _short_text(run_id):
        problems.append("run_id must be a run id string")
    if problems:
        refuse(task, "; ".join(problems))


def _short_text(value):
    return isinstance(value, str) and 0 < len(value) <= 64


def _count(value, most):
    return type(value) is int and 0 < value <= most


# ---------------------------------------------------------------------------------------
@app.task(bind=True, name="etl.tasks.infer_batch", acks_late=True, throws=(TaskRefused,),
          autoretry_for=(OperationalError, InterfaceError, ConnectionError),
          retry_backoff=2, retry_backoff_max=120, retry_jitter=True, max_retries=8)
def infer_batch(self, model_version, obsids, run_id, **unexpected):
    """Read, preprocess, predict and write one batch of spectra (one transaction).

    Idempotent: re-running it rewrites the same (obsid, model_version) rows. Per-spectrum
    problems become ``estimate_failures`` rows; only database or broker trouble makes the
    task retry; a message this worker does not trust is refused (module doc). Returns the
    batch's counts (:class:`etl.inference.BatchResult` as a dict).
    """
    from etl import inference

    check_arguments(self, unexpected, model_version, obsids, run_id)
    settings = current_settings()
    engine = engine_for()
    with engine.connect() as connection:
        if not inference.is_inference_run(connection, run_id):
            refuse(self, f"run {run_id} is not an infer run of this worker's database "
                   f"({display_url(settings.database_url)}): the task was meant for another "
                   "database")
        try:
            model = inference.model_row(connection, model_version)
        except inference.NoModelError as error:
            refuse(self, f"{error} in this worker's database")
    try:
        artifact = inference.registered_artifact(model, settings.model_dir)
    except (IncompatibleArtifactError, FileNotFoundError) as error:
        refuse(self, f"model {model_version}: {error}")
    result = inference.infer_obsids(engine, artifact, model_version, obsids, run_id,
                                    settings=settings)
    return result.as_dict()


@app.task(bind=True, name="etl.tasks.reprocess_stale", acks_late=True, throws=(TaskRefused,))
def reprocess_stale(self, batch_size=500, max_batches=REPROCESS_MAX_BATCHES, **unexpected):
    """Beat entry: dispatch the stale spectra (no estimate, no failure) of the pending
    version if there is one, else of the current one.

    Does not wait for the batches. Registering a new version therefore gets the whole
    catalogue re-estimated by the next ticks; earlier versions' rows stay. Each tick first
    makes a pending version current once the earlier ticks' batches have estimated every
    spectrum the current version serves (:func:`etl.registry.promote_pending`), so the
    switch comes at most one tick after its last batch. Returns ``{"model_version",
    "run_id", "batches", "spectra", "promoted"}``.
    """
    from etl import inference, registry

    check_arguments(self, unexpected)
    if not (_count(batch_size, MAX_BATCH) and _count(max_batches, 10 * REPROCESS_MAX_BATCHES)):
        refuse(self, f"batch_size must be an integer in 1-{MAX_BATCH} and max_batches one in "
               f"1-{10 * REPROCESS_MAX_BATCHES}")
    engine = engine_for()
    promotion = registry.promote_pending(engine)
    try:
        with engine.connect() as connection:
            model = registry.model_to_estimate(connection)
    except inference.NoModelError:
        return {"model_version": None, "run_id": None, "batches": 0, "spectra": 0, "promoted": None}
    if promotion.blocked_by_failures():
        logger.warning("%s", promotion.text())
    version = model["version"]
    run_id = inference.start_inference_run(
        engine, version, {"mode": "stale", "batch_size": batch_size, "scheduled": True})
    batches = spectra = 0
    totals = inference.BatchResult()
    eager = app.conf.task_always_eager
    for async_result, size, _ in inference.dispatch_batches(
            engine, infer_batch, version, run_id, "stale", batch_size,
            limit=batch_size * max_batches, eager=eager):
        if eager:
            totals += inference.BatchResult.from_dict(async_result.get())
        batches += 1
        spectra += size
    totals.selected = spectra
    message = (None if eager else
               f"scheduled reprocessing dispatched {batches} batches ({spectra} spectra)")
    inference.finish_inference_run(engine, run_id, totals, message=message)
    if eager and not promotion.promoted:    # the batches ran: promote now, not next tick
        promotion = registry.promote_pending(engine)
    return {"model_version": version, "run_id": run_id, "batches": batches, "spectra": spectra,
            "promoted": promotion.version if promotion.promoted else None}


def new_run_id() -> str:
    return str(uuid.uuid4())
