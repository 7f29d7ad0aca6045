"""Benchmark: the catalogue pages on 1 million estimates in PostgreSQL (Q3C).

Loads the catalogue of ``bench/api.py`` (same helpers), serves it with gunicorn and the
shipped configuration (``service.gunicorn_conf``), then times, one request at a time as a
browser asks them (``Accept: text/html``):

* ``search_kiel``: the search page of a range query (4000-6000 K: ~44% of the rows): one
  page of the table plus the Kiel diagram and the histograms of the whole selection,
  counted by the database (``/api/v1/estimates/histograms``) and drawn in the same request;
* ``search_cone``: the search page of a 10-arcmin cone (a small query);
* ``spectrum``: ``/spectra/<obsid>`` of random obsids (the bench catalogue has no
  spectrum files: the page without its plot; the plot itself is read + normalise + draw).

Time to first byte and total, p50/p95 in ms.

Usage:
    python bench/pages.py [--rows 1000000] [--requests 20] [--keep]
Prints one JSON document.
"""
import argparse
import http.client
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from api import bench_catalogue, free_port, start_gunicorn, stop  # noqa: E402
from etl.settings import load_settings  # noqa: E402

HEADERS = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def timed_get(port, path):
    """(status, time to first byte s, total s, bytes)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", path, headers=HEADERS)
    response = connection.getresponse()
    first = response.read(1)
    ttfb = time.perf_counter() - started
    body = first + response.read()
    total = time.perf_counter() - started
    connection.close()
    return response.status, ttfb, total, len(body)


def measure(port, paths, warmup=2):
    for path in paths[:warmup]:
        timed_get(port, path)
    samples = []
    for path in paths:
        samples.append(timed_get(port, path))
        # A large query's slot is released once its answer has been sent, a moment after
        # the client has it: without a pause the next one would be refused (429).
        time.sleep(0.1)
    statuses = sorted({s[0] for s in samples})
    ttfb = np.array([s[1] for s in samples]) * 1000
    total = np.array([s[2] for s in samples]) * 1000
    return {"requests": len(samples), "statuses": statuses,
            "ttfb_ms": {"p50": round(float(np.percentile(ttfb, 50)), 1),
                        "p95": round(float(np.percentile(ttfb, 95)), 1)},
            "total_ms": {"p50": round(float(np.percentile(total, 50)), 1),
                         "p95": round(float(np.percentile(total, 95)), 1)},
            "bytes_p50": int(np.median([s[3] for s in samples]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--keep", action="store_true",
                        help="keep the bench database and reuse it next time")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shared = load_settings().shared_dir
    with bench_catalogue(args.rows, rng, shared, keep=args.keep) as catalogue:
        port = free_port()
        server = start_gunicorn(catalogue.url, catalogue.reader_url, port,
                                ("-c", "python:service.gunicorn_conf"))
        try:
            n = args.requests
            picks = rng.integers(0, len(catalogue.ra), n)
            report = {
                "rows": args.rows,
                # 4000-6000 K holds ~44% of the rows; the plots count all of them
                "search_kiel": measure(port, [
                    f"/?teff_min={4000 + i}&teff_max=6000&limit=50&search=1"
                    for i in range(n)]),
                "search_cone": measure(port, [
                    f"/?ra={float(catalogue.ra[i])!r}&dec={float(catalogue.dec[i])!r}&radius=10+arcmin"
                    for i in picks]),
                "spectrum": measure(port, [f"/spectra/{obsid}" for obsid in
                                           _obsids(catalogue.url, rng, n)]),
            }
        finally:
            stop(server)
    print(json.dumps(report, indent=2))


def _obsids(url, rng, n):
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.connect() as connection:
        obsids = [r[0] for r in connection.exec_driver_sql(
            "SELECT obsid FROM spectra ORDER BY random() LIMIT 1000").all()]
    engine.dispose()
    return [int(o) for o in rng.choice(obsids, n)]


if __name__ == "__main__":
    main()
