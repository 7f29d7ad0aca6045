"""Benchmark: a 1-arcmin ADQL cone through /tap/sync against the same cone through /scs
and raw SQL, on 1 million estimates in PostgreSQL (Q3C).

In one run:
1. The catalogue of ``bench/api.py`` (its helpers: --rows spectra and current-model
   estimates in a throw-away database, clustered on Q3C and analysed), served by gunicorn
   (2 sync workers, reader role) as bench/api.py serves it.
2. For each of --requests cone centres (random catalogue positions, jittered), in turn,
   so that every path sees the same load of the shared machine:
   * ``tap_sync_http``: ``GET /tap/sync?LANG=ADQL&QUERY=...`` (VOTable TABLEDATA, the
     default MAXREC) of ``SELECT obsid, ra, dec, DISTANCE(...) AS distance, snrg, <labels
     and errors>, flags, model_version FROM v_current_estimates WHERE 1 =
     CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', ra0, dec0, 1/60.))``;
   * ``scs_http``: ``GET /scs`` (VOTable, VERB=2: the same columns plus designation,
     ordered by distance) with the same centre and radius;
   * ``raw_sql_q3c``: ``SELECT obsid, ra, dec FROM spectra WHERE q3c_radial_query(...)``
     via psycopg (bench/api.py's baseline);
   * ``raw_sql_tap_query``: the SQL /tap/sync runs for that ADQL (``service.adql``'s
     translation: the view, ``q3c_radial_query``, ``q3c_dist``), via psycopg: what the
     database costs, without HTTP, parsing and VOTable writing.
   Client-side latency (request to last byte; execute + fetch), p50/p95/p99.

Prints one JSON document; ``goals.tap_p50_le_2x_scs``: /tap/sync p50 within 2x of /scs
p50 (issue 16).

Usage:
    python bench/tap.py [--rows 1000000] [--requests 300] [--radius-arcmin 1] [--keep]
Needs PostgreSQL with q3c (LAMOST_VAC_TEST_PG_URL) and gunicorn, as bench/api.py.
"""
import argparse
import json
import os
import sys
import time
from urllib.parse import urlencode

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.api import (RAW_Q3C, bench_catalogue, free_port, http_get,  # noqa: E402
                       percentiles, psycopg_connection, scs_path, start_gunicorn, stop)
from etl.settings import settings  # noqa: E402
from service import adql  # noqa: E402

TABLE = "v_current_estimates"
COLUMNS = ("obsid, ra, dec, DISTANCE(POINT('ICRS', ra, dec), POINT('ICRS', {ra!r}, {dec!r}))"
           " AS distance, snrg, teff, teff_err, logg, logg_err, feh, feh_err, flags, "
           "model_version")
WARMUP = 20


def cone_adql(ra, dec, radius_deg):
    return (f"SELECT {COLUMNS.format(ra=ra, dec=dec)} FROM {TABLE} WHERE 1 = "
            f"CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra!r}, {dec!r}, "
            f"{radius_deg!r}))")


def tap_path(ra, dec, radius_deg):
    return "/tap/sync?" + urlencode({"REQUEST": "doQuery", "LANG": "ADQL",
                                     "QUERY": cone_adql(ra, dec, radius_deg)})


def tap_query_sql():
    """The SQL /tap/sync runs for :func:`cone_adql` (with its default MAXREC + 1 row cap),
    with psycopg placeholders for the centre and radius."""
    sentinels = {"11.125": "%(ra)s", "22.375": "%(dec)s", "0.3125": "%(r)s"}
    sql = adql.translate(cone_adql(11.125, 22.375, 0.3125),
                         maxrows=settings.tap_default_maxrec + 1).sql
    for value, placeholder in sentinels.items():
        assert sql.count(value) >= 1, sql
        sql = sql.replace(value, placeholder)
    return sql


def measure(port, reader_url, centres, radius_deg):
    """Latencies of the four paths, interleaved centre by centre; the first WARMUP
    centres are run but not counted."""
    tap_sql = tap_query_sql()
    timings = {"tap_sync_http": [], "scs_http": [], "raw_sql_q3c": [],
               "raw_sql_tap_query": []}
    rows, errors = [], {"tap_sync_http": 0, "scs_http": 0}
    connection = psycopg_connection(reader_url)
    try:
        with connection.cursor() as cursor:
            for i, (ra, dec) in enumerate(list(centres[:WARMUP]) + list(centres)):
                counted = i >= WARMUP
                for name, path in (("tap_sync_http", tap_path(ra, dec, radius_deg)),
                                   ("scs_http", scs_path(ra, dec, radius_deg))):
                    started = time.perf_counter()
                    status, body = http_get(port, path)
                    elapsed = time.perf_counter() - started
                    if status != 200 or b'value="ERROR"' in body:
                        errors[name] += 1
                    if counted:
                        timings[name].append(elapsed)
                for name, sql in (("raw_sql_q3c", RAW_Q3C), ("raw_sql_tap_query", tap_sql)):
                    started = time.perf_counter()
                    cursor.execute(sql, {"ra": ra, "dec": dec, "r": radius_deg})
                    result = cursor.fetchall()
                    if counted:
                        timings[name].append(time.perf_counter() - started)
                        if name == "raw_sql_tap_query":
                            rows.append(len(result))
    finally:
        connection.close()
    report = {name: percentiles(samples) for name, samples in timings.items()}
    report["errors"] = errors
    report["rows_per_cone_mean"] = round(float(np.mean(rows)), 2)
    p50 = {name: report[name]["p50_ms"] for name in timings}
    report["tap_p50_over_scs_p50"] = round(p50["tap_sync_http"] / p50["scs_http"], 2)
    report["tap_p50_over_raw_sql_tap_query_p50"] = round(
        p50["tap_sync_http"] / p50["raw_sql_tap_query"], 2)
    report["tap_p50_over_raw_sql_q3c_p50"] = round(
        p50["tap_sync_http"] / p50["raw_sql_q3c"], 2)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300, help="cones per path")
    parser.add_argument("--radius-arcmin", type=float, default=1.0)
    parser.add_argument("--shared", default=os.environ.get("LAMOST_VAC_SHARED",
                                                           settings.shared_dir))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true",
                        help="keep and reuse the database lamost_vac_bench_api (as "
                        "bench/api.py --keep)")
    options = parser.parse_args()
    rng = np.random.default_rng(options.seed)
    radius = options.radius_arcmin / 60.0
    report = {"rows": options.rows, "radius_arcmin": options.radius_arcmin,
              "requests": options.requests, "cpu_count": os.cpu_count(),
              "load_average_at_start": os.getloadavg()}
    server = None
    with bench_catalogue(options.rows, rng, options.shared, options.keep) as catalogue:
        report["load"] = catalogue.load
        try:
            pick = rng.integers(0, len(catalogue.ra), options.requests)
            centres = list(zip(
                ((catalogue.ra[pick] + rng.normal(0, 0.01, len(pick))) % 360.0).tolist(),
                np.clip(catalogue.dec[pick] + rng.normal(0, 0.01, len(pick)), -90, 90)
                .tolist()))
            port = free_port()
            server = start_gunicorn(catalogue.url, catalogue.reader_url, port)
            report["latency"] = measure(port, catalogue.reader_url, centres, radius)
        finally:
            stop(server)
    report["load_average_at_end"] = os.getloadavg()
    report["goals"] = {"tap_p50_le_2x_scs": report["latency"]["tap_p50_over_scs_p50"] <= 2.0}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
