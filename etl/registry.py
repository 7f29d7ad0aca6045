"""The model registry: which version the catalogue serves, and how that changes.

A registered version (a ``models`` row) is

* ``current``: the catalogue's, what the API, TAP, SCS and ``export`` serve (at most one);
* ``pending``: registered while another version was current (at most one). ``infer`` and
  the beat estimate with it (:func:`model_to_estimate`), and :func:`promote_pending` makes
  it current once it has an estimate of every spectrum the current version serves, so a
  model update never takes a spectrum out of the served catalogue, and re-estimating DR8
  (hours) never shows a partial one;
* ``retired``: an earlier version; its estimates stay queryable.

Every change of status takes :func:`lock_models` and happens in one transaction, so a
reader sees either the old current version or the new one.
"""
import os
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import case, exists, func, insert, select, update

from etl import db, schema
from etl.histogram_cells import CELL_HISTOGRAMS, KIEL_AXES
from etl.inference import NoModelError, model_row
from etl.ingest import utcnow
from models.artifact import code_version

M, E, F = schema.models, schema.estimates, schema.estimate_failures
ACTIVATIONS = ("when-estimated", "now")


def lock_models(connection):
    """Serialise changes of the registry's statuses (PostgreSQL; SQLite has one writer).

    Two at once would otherwise each retire the same row, then both insert or promote a
    current model: the second refused by the one-current index after its whole work."""
    if db.is_postgres(connection):
        connection.exec_driver_sql("LOCK TABLE models IN SHARE ROW EXCLUSIVE MODE")


def _version_with(connection, status) -> Optional[str]:
    return connection.execute(select(M.c.version).where(M.c.status == status)).scalar()


def _make_current(connection, version):
    """``version`` current; the current and pending versions other than it retired."""
    connection.execute(update(M).where(M.c.status.in_(("current", "pending")), M.c.version != version)
                       .values(status="retired"))
    connection.execute(update(M).where(M.c.version == version).values(status="current"))


def register_model(engine, version, artifact_path, sha256, training, metrics, notes=None,
                   activate="when-estimated"):
    """Insert the models row; returns its status.

    ``activate="when-estimated"`` (the default): while another version is current, the
    new one is ``pending`` and replaces an earlier pending one; with no current version it
    is current at once. ``"now"``: current at once (the served catalogue holds only what it
    has estimated so far); the current and pending versions are retired.
    """
    if activate not in ACTIVATIONS:
        raise ValueError(f"activate must be one of {ACTIVATIONS}, got {activate!r}")
    with engine.begin() as connection:
        lock_models(connection)
        waits = activate == "when-estimated" and _version_with(connection, "current") is not None
        status, replaced = ("pending", ("pending",)) if waits else ("current", ("current", "pending"))
        connection.execute(update(M).where(M.c.status.in_(replaced)).values(status="retired"))
        connection.execute(insert(M).values(
            version=version, created_at=utcnow(), artifact_path=os.path.abspath(artifact_path),
            artifact_sha256=sha256, training_set=training, metrics=metrics, status=status,
            code_version=code_version(), notes=notes))
    return status


def model_to_estimate(connection, version: Optional[str] = None):
    """The registry row ``infer`` and the beat estimate with: ``version`` if given, else
    the pending version if there is one, else the current one."""
    if version:
        return model_row(connection, version)
    row = connection.execute(select(M).where(M.c.status == "pending")).mappings().first()
    return row if row is not None else model_row(connection)


def _served_without(pending):
    """SELECT of the spectra the current version serves that have no estimate from
    ``pending``: (obsid, failed), ``failed`` 1 where it recorded a failure for it."""
    served = E.alias("served")
    current = select(M.c.version).where(M.c.status == "current").scalar_subquery()
    failed = exists().where(F.c.obsid == served.c.obsid, F.c.model_version == pending)
    return select(served.c.obsid, case((failed, 1), else_=0).label("failed")).where(
        served.c.model_version == current,
        ~exists().where(E.c.obsid == served.c.obsid, E.c.model_version == pending))


@dataclass
class Promotion:
    """What :func:`promote_pending` found: the pending version (None: there is none),
    whether it became current, and if not, how many spectra the current version serves
    that it has not estimated (``missing``), of which ``failed`` with a recorded failure
    (retried only by ``infer --retry-failed``)."""
    version: Optional[str] = None
    promoted: bool = False
    missing: int = 0
    failed: int = 0

    def blocked_by_failures(self) -> bool:
        return self.version is not None and not self.promoted and self.missing == self.failed > 0

    def text(self) -> str:
        if self.promoted:
            return f"model {self.version} now estimates every spectrum of the catalogue and is current"
        if self.blocked_by_failures():
            return (f"model {self.version} stays pending: {self.failed} spectra the current "
                    f"version serves failed with it (estimate_failures); retry them with 'infer "
                    f"--retry-failed', or switch anyway with 'lamost-vac models activate "
                    f"{self.version}'")
        return (f"model {self.version} is pending: {self.missing} spectra the current version "
                f"serves have no estimate from it yet" + (f" ({self.failed} failed)" if self.failed else ""))


def promote_pending(engine) -> Promotion:
    """Make the pending version current once it has an estimate of every spectrum the
    current version serves (spectra that version does not serve -- new ones, its own
    failures -- do not hold it back); the current one is retired in the same transaction."""
    with engine.connect() as connection:
        pending = _version_with(connection, "pending")
        if pending is None:
            return Promotion()
        # the check runs without the lock: it scans the catalogue (seconds at DR8 size)
        if connection.execute(select(exists(_served_without(pending)))).scalar():
            missing = _served_without(pending).subquery()      # counted in one pass
            n_missing, n_failed = connection.execute(
                select(func.count(), func.coalesce(func.sum(missing.c.failed), 0))).one()
            return Promotion(pending, False, n_missing, n_failed)
        current = _version_with(connection, "current")
    with engine.begin() as connection:
        lock_models(connection)
        # the versions may have changed meanwhile (a registration, an activation): then
        # the next call decides. The pending version's estimates only grow meanwhile.
        if (_version_with(connection, "pending"), _version_with(connection, "current")) != (pending, current):
            return Promotion(_version_with(connection, "pending"))
        _make_current(connection, pending)
    return Promotion(pending, True)


def _registered(connection, version):
    try:
        return model_row(connection, version)
    except NoModelError as error:
        raise ValueError(str(error)) from None


def activate_model(engine, version) -> Optional[str]:
    """Make ``version`` (pending or retired: a roll-back) current now; the current and
    pending versions are retired. Returns the version that was current."""
    with engine.begin() as connection:
        lock_models(connection)
        _registered(connection, version)
        previous = _version_with(connection, "current")
        _make_current(connection, version)
    return previous


def withdraw_model(engine, version):
    """Retire the pending ``version`` (its estimates stay); ValueError if it is not pending."""
    with engine.begin() as connection:
        lock_models(connection)
        status = _registered(connection, version)["status"]
        if status != "pending":
            raise ValueError(f"model {version} is {status}: only a pending version can be withdrawn")
        connection.execute(update(M).where(M.c.version == version).values(status="retired"))


def model_versions(engine) -> list:
    """Every registered version, newest first: version, status, created_at, code_version,
    and its numbers of estimates and failures."""
    counted = {}
    cells = schema.estimate_cells.c
    # estimates are counted from their Kiel-diagram cells, which the triggers keep exact
    # and which hold every estimate once (NULL labels in a bin of their own): ~100,000
    # cells per version instead of its 10 M estimates at DR8 size
    by_version = {
        "estimates": select(cells.model_version, func.sum(cells.n))
        .where(cells.histogram == CELL_HISTOGRAMS.index(KIEL_AXES))
        .group_by(cells.model_version),
        "failures": select(F.c.model_version, func.count()).group_by(F.c.model_version)}
    with engine.connect() as connection:
        for name, statement in by_version.items():
            for version, n in connection.execute(statement):
                counted.setdefault(version, {})[name] = int(n)
        rows = connection.execute(select(M.c.version, M.c.status, M.c.created_at, M.c.code_version)
                                  .order_by(M.c.created_at.desc(), M.c.version)).mappings().all()
    return [{**row, "estimates": counted.get(row["version"], {}).get("estimates", 0),
             "failures": counted.get(row["version"], {}).get("failures", 0)} for row in rows]
