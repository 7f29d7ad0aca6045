"""Benchmark: catalogue ingest into PostgreSQL (COPY path vs row-by-row ORM INSERT) and
the q3c_join cross-match of 1 million spectra x 230,000 reference stars.

Real catalogue rows (the LAMOST DR1 A/F/G/K rows in the shared data) are scaled up to
1 million by giving each copy a new obsid and a jittered position; the catalogue is
written as a CSV and loaded with the same code as ``lamost-vac ingest spectra --metadata-only``
(CSV parsing and validation included). The ORM baseline inserts a subset one row at a
time through a mapped class (add + flush per row) and its rate is extrapolated.

Usage:
    python bench/ingest.py [--rows 1000000] [--labels 230000] [--orm-rows 20000]
Needs PostgreSQL with q3c (LAMOST_VAC_TEST_PG_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres); a throwaway database
lamost_vac_bench_<pid> is created and dropped. Prints one JSON document.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np
from sqlalchemy.orm import Session, registry

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throwaway_db import throwaway_database  # noqa: E402
from etl import db, schema  # noqa: E402
from etl.crossmatch import CrossmatchOptions, crossmatch  # noqa: E402
from etl.ingest import SpectraIngestOptions, ingest_spectra  # noqa: E402
from etl.settings import settings  # noqa: E402

CATALOGUE_FIELDS = ["obsid", "designation", "lmjd", "mjd", "planid", "spid", "fiberid", "ra",
                    "dec", "snru", "snrg", "snrr", "snri", "snrz", "class", "subclass", "z",
                    "z_err"]


def real_rows(shared):
    path = os.path.join(shared, "data", "lamost-real", "dr1-plate-B6212",
                        "dr1_afgk_catalog_rows.csv")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def jittered_catalogue(rows, n, rng):
    """n rows: random real rows with new obsids, RA spread over the sky, jittered Dec."""
    pick = rng.integers(0, len(rows), n)
    ra0 = np.array([float(rows[i]["ra"]) for i in pick])
    dec0 = np.array([float(rows[i]["dec"]) for i in pick])
    ra = (ra0 + rng.integers(0, 72, n) * 5.0 + rng.normal(0, 1.0, n)) % 360.0
    dec = np.clip(dec0 + rng.normal(0, 1.0, n), -89.9, 89.9)
    return pick, ra, dec


def write_catalogue(path, rows, pick, ra, dec, first_obsid=1_000_000_000):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CATALOGUE_FIELDS)
        for k, (i, r, d) in enumerate(zip(pick.tolist(), ra.tolist(), dec.tolist())):
            row = rows[i]
            writer.writerow([first_obsid + k, row["designation"], row["lmjd"], "",
                             row["planid"], row["spid"], row["fiberid"], f"{r:.7f}",
                             f"{d:.7f}", row["snru"], row["snrg"], row["snrr"], row["snri"],
                             row["snrz"], row["class"], row["subclass"], "", ""])


def orm_insert_rate(url, rows, pick, ra, dec, n):
    """Row-by-row INSERT through the ORM (add + flush per row) into an empty table."""
    mapper_registry = registry()

    class Spectrum:
        pass

    mapper_registry.map_imperatively(Spectrum, schema.spectra)
    engine = db.make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE spectra CASCADE")
    started = time.perf_counter()
    with Session(engine) as session:
        for k in range(n):
            row = rows[pick[k]]
            spectrum = Spectrum()
            spectrum.obsid = 2_000_000_000 + k
            spectrum.designation = row["designation"]
            spectrum.ra, spectrum.dec = float(ra[k]), float(dec[k])
            spectrum.zone = db.zone_of(float(dec[k]))
            spectrum.lmjd = int(float(row["lmjd"]))
            spectrum.planid = row["planid"]
            spectrum.spid, spectrum.fiberid = int(float(row["spid"])), int(float(row["fiberid"]))
            spectrum.snrg = float(row["snrg"])
            spectrum.class_ = row["class"]
            spectrum.subclass = row["subclass"]
            session.add(spectrum)
            session.flush()
        session.commit()
    elapsed = time.perf_counter() - started
    with engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE spectra CASCADE")
    engine.dispose()
    return n / elapsed, elapsed


def load_labels(engine, ra, dec, n_labels, rng):
    """Reference stars: 85% within 1 arcsec of a spectrum, the rest anywhere near."""
    n_true = int(n_labels * 0.85)
    chosen = rng.choice(len(ra), n_true, replace=False)
    offset = rng.uniform(0, 1.0, n_true) / 3600.0
    angle = rng.uniform(0, 2 * np.pi, n_true)
    lab_dec = np.clip(dec[chosen] + offset * np.cos(angle), -89.9, 89.9)
    lab_ra = (ra[chosen] + offset * np.sin(angle) / np.cos(np.radians(lab_dec))) % 360.0
    extra = rng.choice(len(ra), n_labels - n_true, replace=False)
    lab_ra = np.concatenate([lab_ra, (ra[extra] + rng.normal(0, 0.01, len(extra))) % 360.0])
    lab_dec = np.concatenate([lab_dec, np.clip(dec[extra] + rng.normal(0, 0.01, len(extra)),
                                               -89.9, 89.9)])
    columns = [c.name for c in schema.reference_labels.columns if c.name != "label_id"]
    rows = []
    for k, (r, d) in enumerate(zip(lab_ra.tolist(), lab_dec.tolist())):
        values = {"label_set": "bench", "apogee_id": f"2M{k:016d}", "ra": r, "dec": d,
                  "zone": db.zone_of(d), "teff": 5000.0, "logg": 4.0, "feh": 0.0,
                  "good_flag": 1}
        rows.append(tuple(values.get(c) for c in columns))
    with engine.begin() as connection:
        db.bulk_upsert(connection, schema.reference_labels, rows, ["label_set", "apogee_id"],
                       columns=columns)
        db.analyze(connection, ["reference_labels"])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=230_000)
    parser.add_argument("--orm-rows", type=int, default=20_000)
    parser.add_argument("--shared", default=os.environ.get("LAMOST_VAC_SHARED",
                                                           settings.shared_dir))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = real_rows(args.shared)
    pick, ra, dec = jittered_catalogue(rows, args.rows, rng)
    result = {"database": "postgresql", "rows": args.rows, "labels": args.labels}
    with throwaway_database(f"lamost_vac_bench_{os.getpid()}") as database:
        url = database.url
        db.upgrade(url)
        orm_rate, orm_seconds = orm_insert_rate(url, rows, pick, ra, dec, args.orm_rows)
        result.update(orm_rows=args.orm_rows, orm_seconds=round(orm_seconds, 2),
                      orm_rows_per_s=round(orm_rate))
        engine = db.make_engine(url)
        with tempfile.TemporaryDirectory() as folder:
            catalogue = os.path.join(folder, "catalogue.csv")
            write_catalogue(catalogue, rows, pick, ra, dec)
            started = time.perf_counter()
            summary = ingest_spectra(engine, SpectraIngestOptions(
                catalogue=catalogue, metadata_only=True, batch_rows=100_000,
                show_progress=False))
            seconds = time.perf_counter() - started
        assert summary.loaded == args.rows, summary.text()
        copy_rate = args.rows / seconds
        result.update(copy_seconds=round(seconds, 2), copy_rows_per_s=round(copy_rate),
                      copy_vs_orm=round(copy_rate / orm_rate, 1),
                      goal_rows_per_s=50_000, ingest_goal_met=copy_rate >= 50_000)

        load_labels(engine, ra, dec, args.labels, rng)
        started = time.perf_counter()
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            db.cluster_on_position(connection)
        result["cluster_seconds"] = round(time.perf_counter() - started, 2)
        summary = crossmatch(engine, CrossmatchOptions(radius_arcsec=3.0))
        result.update(crossmatch_seconds=round(summary.seconds, 2),
                      crossmatch_pairs=summary.loaded,
                      crossmatch_matched_spectra=summary.matched_spectra,
                      crossmatch_goal_s=60, crossmatch_goal_met=summary.seconds < 60)
        again = crossmatch(engine, CrossmatchOptions(radius_arcsec=3.0))
        result["crossmatch_rerun_seconds"] = round(again.seconds, 2)
        engine.dispose()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
