"""Database-backed inference: which spectra to estimate, in which batches, and how one
batch is read, predicted and written. No Celery here (``etl.tasks`` wraps these).

Selection
    Only spectra whose LASP class is STAR (or unknown, NULL) are estimated: galaxies and
    QSOs are not stars (``predict-files`` flags them NOT_A_STAR; the catalogue keeps no
    row for them). ``mode="all"`` takes every such spectrum; ``mode="stale"`` those
    without an estimate *and* without a recorded failure from the model version (a
    failure is retried only with ``retry_failed``, so a broken file is not re-read at
    every scheduled pass). An ingest that changes what an estimate is computed from
    (``etl.ingest.ESTIMATE_INPUT_COLUMNS``: the file, z, SNRg, class, subclass) deletes the
    spectrum's estimates and failures, so it is stale again. Batches are runs of
    consecutive obsids (neighbouring obsids are neighbouring files of the same plate).

Spectrum files
    ``spectra.file_path`` is relative to a spectra root. The root of each spectrum is, in
    order: the worker's ``LAMOST_VAC_SPECTRA_ROOT`` (a worker machine that mounts the
    data elsewhere sets this), the ``spectra_root`` recorded by the ingest run that wrote
    the row, and last the root of the latest ingest run that recorded one. Task messages
    never carry a root (or any other path): the worker's own configuration decides. A
    path that leads outside its root (``..``, absolute, a symlink pointing out) is never
    opened: the spectrum fails at stage ``read`` with the reason (``etl.spectrum_files``).

Model artifacts
    The worker loads the artifact its own database registers for the version, only from
    under its own LAMOST_VAC_MODEL_DIR and only after checking its SHA-256
    (:func:`registered_artifact`).

One batch (:func:`infer_obsids`)
    read every file, preprocess all of them in one vectorised pass, predict in one pass
    with every quality flag (``models.pipeline.predict_features``: the model's, the
    redshift's and the LASP subclass's), then write in ONE transaction: estimates upserted
    on (obsid, model_version) -- a redelivered batch overwrites its own rows, never
    duplicates them -- and failures
    (stage ``read``, ``preprocess`` -- no usable redshift, too few usable pixels -- or
    ``predict``, with the reason) upserted with
    ``attempts + 1``; a success deletes the spectrum's failure row of that version. A
    failure never deletes an estimate already stored for the version (a file that became
    unreadable does not erase a value computed from it when it was readable).

Provenance on every estimate: model version, code version (``lamost-vac`` package),
preprocessing hash (of the artifact's preprocessing configuration), run id (the
``ingest_runs`` row of kind ``infer``) and the time it was written (UTC).
"""
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from sqlalchemy import and_, delete, exists, func, or_, select, update

from etl import db, schema
from etl.ingest import utcnow
from etl.spectrum_files import UnsafePathError, resolve_under_root
from etl.settings import settings as default_settings
from models.artifact import UntrustedArtifactError, artifact_under, code_version, load_model
from models.flags import NOT_ESTIMATED
from models.labels import LABELS, estimate_columns
from models.pipeline import featurise_files, predict_features

MODES = ("stale", "all")
S, E, F = schema.spectra, schema.estimates, schema.estimate_failures


class NoModelError(LookupError):
    """No model version given and none is current, or the version is not registered."""


# ---------------------------------------------------------------------------------------
# Models (the registry and its statuses: etl.registry)
def model_row(connection, version: Optional[str] = None):
    """The registry row of ``version`` (default: the current model)."""
    models = schema.models
    query = select(models)
    query = query.where(models.c.version == version) if version else \
        query.where(models.c.status == "current")
    row = connection.execute(query).mappings().first()
    if row is None:
        raise NoModelError(f"model version {version!r} is not registered" if version else
                           "no current model: run 'lamost-vac train' first")
    return row


_ARTIFACTS: "OrderedDict[tuple, dict]" = OrderedDict()
_ARTIFACTS_LOCK = threading.Lock()


def registered_artifact(model, model_dir: str, keep: int = 2) -> dict:
    """The artifact of a ``models`` row, loaded once per process (a worker keeps the last
    ``keep`` versions).

    Artifacts are code: the row's path must lie under ``model_dir`` (the worker's own
    LAMOST_VAC_MODEL_DIR), and the file's SHA-256 must match both the row and the sidecar
    before it is unpickled (:func:`models.artifact.load_model`). A replaced file is
    refused, never silently used under another version's name.
    """
    key = (model["version"], model["artifact_sha256"])
    with _ARTIFACTS_LOCK:
        artifact = _ARTIFACTS.get(key)
        if artifact is not None:
            _ARTIFACTS.move_to_end(key)
            return artifact
    path = artifact_under(model_dir, model["artifact_path"])
    artifact = load_model(path, expected_sha256=model["artifact_sha256"])
    if artifact["version"] != model["version"]:
        raise UntrustedArtifactError(f"{path} holds model {artifact['version']}, the registry "
                                     f"row is {model['version']}")
    with _ARTIFACTS_LOCK:
        _ARTIFACTS[key] = artifact
        while len(_ARTIFACTS) > keep:
            _ARTIFACTS.popitem(last=False)
    return artifact


# ---------------------------------------------------------------------------------------
# Selection and batching
def star_condition():
    return or_(S.c.class_.is_(None), func.upper(func.trim(S.c.class_)) == "STAR")


def selection_query(model_version: str, mode: str = "stale", retry_failed: bool = False):
    """SELECT obsid of the spectra to estimate with ``model_version`` (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    query = select(S.c.obsid).where(star_condition())
    if mode == "stale":
        query = query.where(~exists().where(and_(E.c.obsid == S.c.obsid,
                                                 E.c.model_version == model_version)))
        if not retry_failed:
            query = query.where(~exists().where(and_(F.c.obsid == S.c.obsid,
                                                     F.c.model_version == model_version)))
    return query.order_by(S.c.obsid)


def count_selected(connection, model_version, mode="stale", retry_failed=False) -> int:
    inner = selection_query(model_version, mode, retry_failed).order_by(None).subquery()
    return connection.execute(select(func.count()).select_from(inner)).scalar_one()


def iter_batches(engine, model_version, mode="stale", batch_size=500, retry_failed=False,
                 limit=None):
    """Yield lists of obsids (ascending, ``batch_size`` each), streamed from the database."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    query = selection_query(model_version, mode, retry_failed)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as connection:
        if db.is_postgres(connection):
            # Every row of the cursor is read: plan for all of them. With the default (the
            # first 10%) PostgreSQL walked spectra in obsid order through the primary key
            # of a table clustered by position: 28.5 s instead of 6.7 s on 11 M spectra.
            connection.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
        result = connection.execution_options(stream_results=True, yield_per=batch_size) \
            .execute(query)
        for partition in result.partitions(batch_size):
            yield [int(row[0]) for row in partition]


def dispatch_batches(engine, task, model_version, run_id, mode="stale", batch_size=500,
                     retry_failed=False, limit=None, eager=False):
    """Send the selected spectra to ``task`` in batches of obsids; yields
    ``(async_result, batch size, obsids)`` per batch as it is sent.

    Messages carry ids only (model version, obsids, run id). ``eager`` (tasks run in this
    process): the whole selection is read first, so that the same SQLite file is never
    read and written at once.
    """
    batches = iter_batches(engine, model_version, mode, batch_size, retry_failed, limit)
    if eager:
        batches = list(batches)
    for obsids in batches:
        yield task.apply_async((model_version, obsids, run_id)), len(obsids), obsids


# ---------------------------------------------------------------------------------------
# Runs
def start_inference_run(engine, model_version, options) -> str:
    from etl.ingest import start_run

    return start_run(engine, "infer", source=f"model {model_version}", options=options)


def is_inference_run(connection, run_id) -> bool:
    """Whether ``run_id`` names an ``infer`` run of this database (a task's run must)."""
    runs = schema.ingest_runs
    return connection.execute(select(runs.c.run_id).where(
        runs.c.run_id == run_id, runs.c.kind == "infer")).first() is not None


def finish_inference_run(engine, run_id, totals: "BatchResult", status="finished", message=None):
    with engine.begin() as connection:
        connection.execute(update(schema.ingest_runs)
                           .where(schema.ingest_runs.c.run_id == run_id)
                           .values(status=status, finished_at=utcnow(), n_read=totals.selected,
                                   n_loaded=totals.done, n_quarantined=totals.failed,
                                   message=message or totals.text()))


# ---------------------------------------------------------------------------------------
# One batch
@dataclass
class BatchResult:
    selected: int = 0          # obsids asked for
    done: int = 0              # estimates written
    flagged: int = 0           # ... of which with a non-zero quality flag
    failed: int = 0            # failures recorded (read / preprocess / predict)
    missing: int = 0           # obsids not in the spectra table (nothing written)
    reasons: Dict[str, int] = field(default_factory=dict)

    def __iadd__(self, other):
        self.selected += other.selected
        self.done += other.done
        self.flagged += other.flagged
        self.failed += other.failed
        self.missing += other.missing
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count
        return self

    def as_dict(self):
        return {"selected": self.selected, "done": self.done, "flagged": self.flagged,
                "failed": self.failed, "missing": self.missing, "reasons": dict(self.reasons)}

    @classmethod
    def from_dict(cls, data):
        return cls(**{k: data.get(k, 0) for k in ("selected", "done", "flagged", "failed",
                                                  "missing")},
                   reasons=dict(data.get("reasons", {})))

    def text(self):
        return (f"{self.done} done ({self.flagged} flagged), {self.failed} failed"
                + (f", {self.missing} unknown obsids" if self.missing else ""))


def latest_spectra_root(connection) -> Optional[str]:
    runs = schema.ingest_runs
    return connection.execute(
        select(runs.c.spectra_root).where(runs.c.spectra_root.is_not(None))
        .order_by(runs.c.started_at.desc()).limit(1)).scalar()


def spectra_for(connection, obsids, spectra_root=None, settings=None, refused=None):
    """Rows (obsid, path or None, z, snrg) for ``obsids``, paths resolved (module doc).

    A stored path that leaves its root is never opened (``resolve_under_root``): its path
    is None and ``refused`` (a dict) gets obsid -> reason; without ``refused`` it raises.
    """
    settings = settings or default_settings
    runs = schema.ingest_runs
    rows = connection.execute(
        select(S.c.obsid, S.c.file_path, S.c.z, S.c.snrg, runs.c.spectra_root)
        .select_from(S.outerjoin(runs, S.c.ingest_run_id == runs.c.run_id))
        .where(S.c.obsid.in_([int(o) for o in obsids])).order_by(S.c.obsid)).all()
    fixed_root = spectra_root or settings.spectra_root
    fallback = None
    out = []
    for obsid, relative, z, snrg, run_root in rows:
        root = fixed_root or run_root
        if root is None and relative is not None and not os.path.isabs(relative):
            fallback = fallback or latest_spectra_root(connection)
            root = fallback
        path = None
        if relative is not None:
            try:
                path = resolve_under_root(root, relative)
            except UnsafePathError as error:
                if refused is None:
                    raise UnsafePathError(f"spectrum {obsid}: {error}") from None
                refused[int(obsid)] = str(error)
        out.append((int(obsid), path, z, snrg))
    return out


def subclasses_for(connection, obsids):
    """LASP subclass (None when unknown) of each obsid, in the order given."""
    rows = dict(connection.execute(select(S.c.obsid, S.c.subclass)
                                   .where(S.c.obsid.in_([int(o) for o in obsids]))).all())
    return [rows.get(int(o)) for o in obsids]


def reason_class(reason: str) -> str:
    """A failure reason without its file- or value-specific detail, for summaries."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()[:80] or reason[:80]


def _none_if_nan(value):
    value = float(value)
    return None if math.isnan(value) else value


def infer_obsids(engine, artifact, model_version, obsids, run_id, settings=None, n_jobs=1,
                 blas_threads=1) -> BatchResult:
    """Estimate one batch and write it in one transaction (module doc); returns counts.

    BLAS is limited to ``blas_threads`` while it runs: a worker process is one core, and
    OpenBLAS threads fighting over the cores made small batches ~10x slower.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _infer_obsids(engine, artifact, model_version, obsids, run_id, settings, n_jobs)


def _infer_obsids(engine, artifact, model_version, obsids, run_id, settings, n_jobs) -> BatchResult:
    result = BatchResult(selected=len(obsids))
    refused = {}
    with engine.connect() as connection:
        rows = spectra_for(connection, obsids, settings=settings, refused=refused)
    result.missing = len(set(int(o) for o in obsids) - {r[0] for r in rows})
    failures = {}                                   # obsid -> (stage, reason)
    readable = []
    for obsid, path, z, snrg in rows:
        if path is None:
            failures[obsid] = ("read", refused.get(
                obsid, "no spectrum file recorded (metadata-only ingest)"))
        else:
            readable.append((obsid, path, z, snrg))
    estimates = []
    if readable:
        paths = [r[1] for r in readable]
        z = np.array([np.nan if r[2] is None else r[2] for r in readable], dtype=float)
        snrg = np.array([np.nan if r[3] is None else r[3] for r in readable], dtype=float)
        feature_set = featurise_files(paths, z, artifact["preprocess"], n_jobs=n_jobs,
                                      chunk_size=max(len(paths), 1))
        for index, reason in feature_set.errors.items():
            failures[readable[index][0]] = ("read", reason)
        with engine.connect() as connection:
            subclass = subclasses_for(connection, [r[0] for r in readable])
        try:
            predicted = predict_features(artifact["model"], feature_set, snrg, subclass=subclass)
        except Exception as error:  # noqa: BLE001 -- recorded per spectrum, batch goes on
            for index in range(len(readable)):
                if index not in feature_set.errors:
                    failures[readable[index][0]] = ("predict", f"{type(error).__name__}: {error}")
            predicted = None
        if predicted is not None:
            # not estimated: no usable redshift, too few usable pixels (unreadable: above)
            for index, reason in predicted["problem"].items():
                if index not in feature_set.errors:
                    failures[readable[index][0]] = ("preprocess", reason)
            keep = [i for i in range(len(readable)) if i not in predicted["problem"]]
            if keep:
                estimates = _estimate_rows({k: v[keep] for k, v in predicted.items() if k != "problem"},
                                           [readable[i][0] for i in keep], model_version,
                                           artifact, run_id, failures)
    write_batch(engine, model_version, run_id, estimates, failures)
    result.done = len(estimates)
    result.flagged = sum(1 for row in estimates if row["flags"])
    result.failed = len(failures)
    for stage, reason in failures.values():
        key = f"{stage}: {reason_class(reason)}"
        result.reasons[key] = result.reasons.get(key, 0) + 1
    return result


def _estimate_rows(predicted, obsids, model_version, artifact, run_id, failures):
    now = utcnow()
    version = code_version()
    rows = []
    for k, obsid in enumerate(obsids):
        if any(np.isnan(predicted[label][k]) for label in LABELS) \
                or int(predicted["flags"][k]) & NOT_ESTIMATED:
            failures[obsid] = ("predict", "model returned no value")
            continue
        # the model speaks the schema's names (models.labels)
        rows.append({"obsid": obsid, "model_version": model_version,
                     **{name: _none_if_nan(predicted[name][k]) for name in estimate_columns()},
                     "flags": int(predicted["flags"][k]), "code_version": version,
                     "preprocessing_hash": artifact["preprocess_hash"], "run_id": run_id,
                     "created_at": now})
    return rows


ESTIMATE_COLUMNS = [c.name for c in E.columns if c.name != "estimate_id"]
ESTIMATE_KEY = ("obsid", "model_version")


def _dialect_insert(connection):
    if db.is_postgres(connection):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def write_batch(engine, model_version, run_id, estimates: List[dict], failures: dict):
    """Write a batch's estimates and failures in one transaction (idempotent upserts)."""
    with engine.begin() as connection:
        write_rows(connection, model_version, run_id, estimates, failures)


def _upsert_estimates(connection, estimates, insert):
    """Insert or replace ``estimates``. On PostgreSQL by COPY into a staging table and one
    upsert statement (``etl.db.bulk_upsert``): the triggers that keep estimate_cells
    counted then run once per batch, not once per row as they would for an executemany
    (statement-level triggers), and 500 rows are written faster too. SQLite (row-level
    triggers) keeps the executemany, whose timestamps SQLAlchemy formats."""
    if db.is_postgres(connection):
        db.bulk_upsert(connection, E, [tuple(row[c] for c in ESTIMATE_COLUMNS)
                                       for row in estimates],
                       list(ESTIMATE_KEY), columns=ESTIMATE_COLUMNS)
        return
    statement = insert(E)
    updates = {c: statement.excluded[c] for c in ESTIMATE_COLUMNS if c not in ESTIMATE_KEY}
    connection.execute(statement.on_conflict_do_update(
        index_elements=list(ESTIMATE_KEY), set_=updates), estimates)


def write_rows(connection, model_version, run_id, estimates: List[dict], failures: dict):
    """Upsert ``estimates`` (rows of :data:`ESTIMATE_COLUMNS`) and ``failures`` (obsid ->
    (stage, reason)) in the caller's transaction; a success clears the spectrum's failure."""
    now = utcnow()
    insert = _dialect_insert(connection)
    if estimates:
        _upsert_estimates(connection, estimates, insert)
        connection.execute(delete(F).where(
            F.c.model_version == model_version,
            F.c.obsid.in_([row["obsid"] for row in estimates])))
    if failures:
        version = code_version()
        rows = [{"obsid": obsid, "model_version": model_version, "stage": stage,
                 "reason": reason[:2000], "attempts": 1, "code_version": version,
                 "run_id": run_id, "created_at": now}
                for obsid, (stage, reason) in sorted(failures.items())]
        statement = insert(F)
        connection.execute(statement.on_conflict_do_update(
            index_elements=["obsid", "model_version"],
            set_={"stage": statement.excluded.stage, "reason": statement.excluded.reason,
                  "attempts": F.c.attempts + 1, "code_version": statement.excluded.code_version,
                  "run_id": statement.excluded.run_id,
                  "created_at": statement.excluded.created_at}), rows)


# ---------------------------------------------------------------------------------------
# Summaries straight from the database (independent of task results)
def database_counts(connection, model_version) -> dict:
    done = connection.execute(select(func.count()).select_from(E)
                              .where(E.c.model_version == model_version)).scalar_one()
    flagged = connection.execute(select(func.count()).select_from(E)
                                 .where(E.c.model_version == model_version, E.c.flags != 0)
                                 ).scalar_one()
    failed = connection.execute(select(func.count()).select_from(F)
                                .where(F.c.model_version == model_version)).scalar_one()
    return {"estimated": done, "flagged": flagged, "failed": failed}
