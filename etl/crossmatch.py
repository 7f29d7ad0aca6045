"""Cross-match spectra with reference labels: every reference star within the radius,
ranked by separation per (spectrum, label set); rank 1 is the best match, as in TOPCAT's
"best match for each row of table 1" mode that Li et al. used.

PostgreSQL: one ``q3c_join`` query (uses the Q3C index of reference_labels).
SQLite: astropy ``search_around_sky`` in memory.

The result is merged into ``crossmatch``: pairs no longer within the radius are deleted,
changed pairs updated, unchanged pairs left alone (with their run id), so re-running
changes nothing.
"""
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
from sqlalchemy import select

from etl import db, schema
from etl.ingest import IngestSummary, finish_run, start_run

CROSSMATCH_COLUMNS = [c.name for c in schema.crossmatch.columns]
STAGING = "staging_crossmatch"


@dataclass
class CrossmatchOptions:
    radius_arcsec: float = 3.0
    label_set: Optional[str] = None          # None: every label set


@dataclass
class CrossmatchSummary(IngestSummary):
    removed: int = 0
    matched_spectra: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        return (f"crossmatch: {self.matched_spectra} spectra matched, {self.loaded} pairs new, "
                f"{self.updated} updated, {self.unchanged} unchanged, {self.removed} removed "
                f"[run {self.run_id}, {self.seconds:.1f} s]")


def crossmatch(engine, options: CrossmatchOptions, log=sys.stderr) -> CrossmatchSummary:
    import time

    if not options.radius_arcsec > 0:
        raise ValueError("radius must be positive")
    run_id = start_run(engine, "crossmatch", options=vars(options))
    summary = CrossmatchSummary(run_id, "crossmatch")
    started = time.perf_counter()
    try:
        with engine.begin() as connection:
            db.create_staging(connection, "crossmatch", STAGING, CROSSMATCH_COLUMNS)
            if db.is_postgres(connection):
                _stage_with_q3c(connection, options, run_id)
            else:
                _stage_with_astropy(connection, options, run_id)
            _merge(connection, options, summary)
            connection.exec_driver_sql(f"DROP TABLE {STAGING}")
            db.analyze(connection, ["crossmatch"])
    except BaseException as error:
        finish_run(engine, summary, status="failed", message=f"{type(error).__name__}: {error}")
        raise
    summary.seconds = time.perf_counter() - started
    finish_run(engine, summary)
    return summary


def _stage_with_q3c(connection, options, run_id):
    label_filter = "AND l.label_set = %(label_set)s" if options.label_set else ""
    # q3c_join(ra1, dec1, ra2, dec2, r) probes the Q3C index of the second table for each
    # spectrum; row_number() over the exact distance gives the rank.
    connection.exec_driver_sql(
        f"""INSERT INTO {STAGING}
            SELECT obsid, label_id, label_set, apogee_id, separation_arcsec,
                   row_number() OVER (PARTITION BY obsid, label_set
                                      ORDER BY separation_arcsec, label_id) AS match_rank,
                   %(radius)s, %(run_id)s
            FROM (SELECT s.obsid, l.label_id, l.label_set, l.apogee_id,
                         q3c_dist(s.ra, s.dec, l.ra, l.dec) * 3600.0 AS separation_arcsec
                  FROM spectra s
                  JOIN reference_labels l
                    ON q3c_join(s.ra, s.dec, l.ra, l.dec, %(radius_deg)s)
                  WHERE true {label_filter}) AS pairs""",
        {"radius": options.radius_arcsec, "radius_deg": options.radius_arcsec / 3600.0,
         "run_id": run_id, "label_set": options.label_set})


def _stage_with_astropy(connection, options, run_id):
    spectra = connection.execute(select(schema.spectra.c.obsid, schema.spectra.c.ra,
                                        schema.spectra.c.dec)).all()
    labels_query = select(schema.reference_labels.c.label_id,
                          schema.reference_labels.c.label_set,
                          schema.reference_labels.c.apogee_id,
                          schema.reference_labels.c.ra, schema.reference_labels.c.dec)
    if options.label_set:
        labels_query = labels_query.where(
            schema.reference_labels.c.label_set == options.label_set)
    labels = connection.execute(labels_query).all()
    rows = match_pairs(spectra, labels, options.radius_arcsec, run_id)
    if rows:
        placeholders = ", ".join("?" for _ in CROSSMATCH_COLUMNS)
        connection.exec_driver_sql(f"INSERT INTO {STAGING} VALUES ({placeholders})", rows)


def match_pairs(spectra, labels, radius_arcsec, run_id=None):
    """All (spectrum, label) pairs within the radius, ranked per (obsid, label_set).

    ``spectra``: rows (obsid, ra, dec); ``labels``: rows (label_id, label_set, apogee_id,
    ra, dec). Returns tuples in ``crossmatch`` column order.
    """
    from astropy import units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    if not spectra or not labels:
        return []
    obsids = np.array([s[0] for s in spectra], dtype=np.int64)
    spectra_coords = SkyCoord(np.array([s[1] for s in spectra]) * u.deg,
                              np.array([s[2] for s in spectra]) * u.deg)
    rows = []
    label_sets = sorted({label[1] for label in labels})
    for label_set in label_sets:
        subset = [label for label in labels if label[1] == label_set]
        label_coords = SkyCoord(np.array([lab[3] for lab in subset]) * u.deg,
                                np.array([lab[4] for lab in subset]) * u.deg)
        spectrum_index, label_index, separation, _ = search_around_sky(
            spectra_coords, label_coords, radius_arcsec * u.arcsec)
        separation_arcsec = separation.to_value(u.arcsec)
        label_ids = np.array([lab[0] for lab in subset], dtype=np.int64)[label_index]
        # Sort by spectrum, then separation, then label id: rank = position in the group.
        order = np.lexsort((label_ids, separation_arcsec, obsids[spectrum_index]))
        previous, rank = None, 0
        for k in order.tolist():
            obsid = int(obsids[spectrum_index[k]])
            rank = rank + 1 if obsid == previous else 1
            previous = obsid
            label = subset[label_index[k]]
            rows.append((obsid, int(label[0]), label_set, label[2],
                         float(separation_arcsec[k]), rank, float(radius_arcsec), run_id))
    return rows


def _merge(connection, options, summary):
    scope = "WHERE label_set = :label_set" if options.label_set else ""
    parameters = {"label_set": options.label_set} if options.label_set else {}
    from sqlalchemy import text

    removed = connection.execute(text(
        f"""DELETE FROM crossmatch
            WHERE {'label_set = :label_set AND' if options.label_set else ''}
                  NOT EXISTS (SELECT 1 FROM {STAGING} s
                              WHERE s.obsid = crossmatch.obsid
                                AND s.label_id = crossmatch.label_id)"""), parameters).rowcount
    total = connection.execute(text(f"SELECT count(*) FROM {STAGING} {scope}"),
                               parameters).scalar()
    compare = [c for c in CROSSMATCH_COLUMNS
               if c not in ("obsid", "label_id", "crossmatch_run_id")]
    counts = db.merge_staging(connection, "crossmatch", STAGING, CROSSMATCH_COLUMNS,
                              ["obsid", "label_id"], compare, (), total)
    summary.add(counts)
    summary.read = total
    summary.removed = removed
    summary.matched_spectra = connection.exec_driver_sql(
        f"SELECT count(DISTINCT obsid) FROM {STAGING}").scalar()
