"""Benchmark: a 1-arcmin ADQL cone through /tap/sync against the same cone through /scs
and raw SQL, on 1 million estimates in PostgreSQL (Q3C).

In one run:
1. The catalogue of ``bench/api.py`` (its helpers: --rows spectra and current-model
   estimates in a throw-away database, clustered on Q3C and analysed), served by gunicorn
   (2 sync workers, reader role) as bench/api.py serves it.
2. For each of --requests cone centres (random catalogue positions, jittered), every
   path in a random order, so that each sees the same load of the shared machine:
   * ``tap_sync_http``: ``GET /tap/sync?LANG=ADQL&QUERY=...`` (VOTable TABLEDATA, the
     default MAXREC) of ``SELECT obsid, ra, dec, DISTANCE(...) AS distance, snrg, <labels
     and errors>, flags, model_version FROM v_current_estimates WHERE 1 =
     CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', ra0, dec0, 1/60.))``;
   * ``scs_http``: ``GET /scs`` (VOTable, VERB=2: the same columns plus designation,
     ordered by distance) with the same centre and radius;
   * ``raw_sql_q3c``: ``SELECT obsid, ra, dec FROM spectra WHERE q3c_radial_query(...)``
     via psycopg (bench/api.py's baseline);
   * ``raw_sql_tap_query``: the SQL /tap/sync runs for that ADQL (``service.adql``'s
     translation: the view, ``q3c_radial_query``, ``q3c_dist``, the cone's numbers bound
     as parameters), via psycopg: what the database costs, without HTTP, parsing and
     VOTable writing (PostgreSQL plans it for each cone, as the service does);
     ``..._prepared_generic``: the same as a prepared statement with a generic plan
     (not planned per cone, as /scs's statement; a generic plan of this join scans all
     estimates: it shows what planning costs and why the service does not use one).
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

from bench.api import (RAW_Q3C, add_catalogue_arguments, bench_catalogue, free_port, http_get,  # noqa: E402
                       percentiles, psycopg_connection, scs_path, start_gunicorn, stop,
                       votable_answered)
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


def measure(port, reader_url, centres, radius_deg, rng):
    """Latencies of the paths, interleaved centre by centre in a random order (the first
    WARMUP centres are run but not counted), HTTP errors, rows per cone and the p50
    ratios."""
    plain, generic = psycopg_connection(reader_url), psycopg_connection(reader_url, True)
    errors = {"tap_sync_http": 0, "scs_http": 0}

    def http(name, path):
        status, body = http_get(port, path)
        errors[name] += not votable_answered(status, body)

    def sql(connection, statement, parameters, prepare=None):
        return len(connection.execute(statement, parameters, prepare=prepare).fetchall())

    paths = {
        "tap_sync_http": lambda ra, dec, _: http("tap_sync_http",
                                                 tap_path(ra, dec, radius_deg)),
        "scs_http": lambda ra, dec, _: http("scs_http", scs_path(ra, dec, radius_deg)),
        "raw_sql_q3c": lambda ra, dec, _: sql(plain, RAW_Q3C,
                                              {"ra": ra, "dec": dec, "r": radius_deg}),
        "raw_sql_tap_query": lambda ra, dec, translation: sql(
            plain, translation.sql, translation.parameters),
        "raw_sql_tap_query_prepared_generic": lambda ra, dec, translation: sql(
            generic, translation.sql, translation.parameters, prepare=True),
    }
    timings = {name: [] for name in paths}
    rows = []
    try:
        for i, (ra, dec) in enumerate(list(centres[:WARMUP]) + list(centres)):
            # what /tap/sync runs for this cone (default MAXREC, + 1 row to see overflow)
            translation = adql.translate(cone_adql(ra, dec, radius_deg),
                                         maxrows=settings.tap_default_maxrec + 1)
            for name in rng.permutation(list(paths)):     # no path always first
                run = paths[name]
                started = time.perf_counter()
                found = run(ra, dec, translation)
                elapsed = time.perf_counter() - started
                if i >= WARMUP:
                    timings[name].append(elapsed)
                    if name == "raw_sql_tap_query":
                        rows.append(found)
    finally:
        plain.close()
        generic.close()
    report = {name: percentiles(samples) for name, samples in timings.items()}
    report["errors"] = errors
    report["rows_per_cone_mean"] = round(float(np.mean(rows)), 2)
    for name in list(paths)[1:]:
        report[f"tap_p50_over_{name}_p50"] = round(
            report["tap_sync_http"]["p50_ms"] / report[name]["p50_ms"], 2)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300, help="cones per path")
    parser.add_argument("--radius-arcmin", type=float, default=1.0)
    add_catalogue_arguments(parser)
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
            report["latency"] = measure(port, catalogue.reader_url, centres, radius, rng)
        finally:
            stop(server)
    report["load_average_at_end"] = os.getloadavg()
    report["goals"] = {"tap_p50_le_2x_scs": report["latency"]["tap_p50_over_scs_http_p50"] <= 2.0}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
