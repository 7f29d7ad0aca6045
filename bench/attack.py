"""Benchmark: does the query service stay responsive while clients send it the most
expensive queries it accepts? (the slow-query attack of issue 11)

One run:
1. A PostgreSQL catalogue of --rows spectra and estimates, built by bench/api.py's helpers
   (a throw-away database, or with --keep the database lamost_vac_bench_api, reused).
2. gunicorn serving the API with the shipped configuration (``-c
   python:service.gunicorn_conf``); --gunicorn-args replaces it, e.g. ``--gunicorn-args=-w
   --gunicorn-args=2`` for the two sync workers the issue was measured with.
3. The attack queries, built from the limits the service publishes in /health and
   /openapi.json: the largest cone (largest SR and MAXREC, VERB=3) at the densest position
   as VOTable and as FITS; the largest page of every column in the order of an index
   with a filter on another column (read by walking the index for up to
   LAMOST_VAC_API_MAX_ROWS_READ rows; a whole catalogue sorted on an unindexed column is
   refused since issue 15); the largest cone as a range query sorted by -distance, FITS.
   Each is first timed alone (``worst_queries``: how far below the statement timeout the
   worst accepted query stays).
4. Phases of --seconds each: no attackers, then each count of --attackers (default 2 and
   8). Throughout, --clients normal clients (one process each, one request at a time: a
   1-arcmin /scs cone, a 3-arcmin range query, a spectrum by obsid, in turn) and a /health
   probe every 0.2 s. Each attacker is a process connecting from its own loopback address
   (127.0.0.10, .11, ...), so that the service sees distinct clients; it sends the attack
   queries in turn and, after a 429, waits the Retry-After it was given (--flood: it
   retries at once, which is a request flood rather than a slow-query attack).

Prints one JSON document: per phase, the normal clients' requests/s, p50/p99 latency and
non-200 answers; /health p50/p99/max latency and statuses; the attackers' answers by
status; the 1-minute load average at the start and at the end of the phase (the machine
may be shared with other work: read the numbers with it). ``goals``: with the largest
attacker count, normal clients keep >= 50% of their unloaded throughput and /health
answers in < 200 ms.

Bounded in time: every phase lasts --seconds, plus at most --request-timeout for the
requests still in flight at its end.

Usage:
    python bench/attack.py [--rows 1000000] [--keep] [--seconds 15] [--clients 4]
                           [--attackers 2,8] [--flood] [--gunicorn-args=...]
Needs PostgreSQL with q3c (LAMOST_VAC_TEST_PG_URL) and gunicorn, as bench/api.py.
"""
import argparse
import http.client
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from urllib.parse import urlencode

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.api import (FIRST_OBSID, add_catalogue_arguments, bench_catalogue,  # noqa: E402
                       free_port, percentiles, start_gunicorn, stop)

SHIPPED_CONFIG = ("-c", "python:service.gunicorn_conf")
NORMAL_SOURCE = "127.0.0.1"
HEALTH_PERIOD_S = 0.2
WARMUP_S = 2.0          # attackers start this long before the normal clients are measured


def get(port, path, source=NORMAL_SOURCE, timeout=60.0):
    """(status, body bytes, Retry-After, seconds) of one GET on a new connection from the
    address ``source``; status 0 when the connection failed or timed out."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0))
    started = time.perf_counter()
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return (response.status, len(body), response.getheader("Retry-After"),
                time.perf_counter() - started)
    except (OSError, http.client.HTTPException):
        return 0, 0, None, time.perf_counter() - started
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------
# Queries
def densest_position(ra, dec, cell_deg=2.0):
    """Centre of the most populated cell_deg x cell_deg cell (the worst place for a cone)."""
    counts, ra_edges, dec_edges = np.histogram2d(
        ra, dec, bins=[np.arange(0, 360 + cell_deg, cell_deg),
                       np.arange(-90, 90 + cell_deg, cell_deg)])
    i, j = np.unravel_index(np.argmax(counts), counts.shape)
    return (float(ra_edges[i] + cell_deg / 2), float(dec_edges[j] + cell_deg / 2))


def attack_queries(limits, estimate_columns, centre):
    """name -> path of the most expensive queries the service accepts."""
    ra, dec = centre
    cone = {"RA": ra, "DEC": dec, "SR": limits["scs_max_sr_deg"],
            "MAXREC": limits["scs_max_records"], "VERB": 3}
    every_column = ",".join(c for c in estimate_columns if c != "distance")
    page = {"limit": limits["api_max_limit"], "columns": every_column}
    return {
        "scs_largest_cone_votable": "/scs?" + urlencode(cone),
        "scs_largest_cone_fits": "/scs?" + urlencode(dict(cone, RESPONSEFORMAT="fits")),
        # exclude_flags: a filter the planner cannot estimate, so the page is read by
        # walking the feh index (for up to LAMOST_VAC_API_MAX_ROWS_READ rows)
        "estimates_largest_page_index_walk": "/api/v1/estimates?" + urlencode(
            dict(page, order="-feh", exclude_flags=4, format="votable")),
        "estimates_largest_cone_fits": "/api/v1/estimates?" + urlencode(
            dict(page, ra=ra, dec=dec, radius=limits["scs_max_sr_deg"], order="-distance",
                 format="fits")),
    }


def normal_queries(ra, dec, rows, rng, count=300):
    """Paths of what a normal client asks: small cones, small range queries, spectra."""
    pick = rng.integers(0, len(ra), count)
    paths = []
    for n, i in enumerate(pick):
        kind = n % 3
        if kind == 0:
            paths.append("/scs?" + urlencode({"RA": ra[i], "DEC": dec[i], "SR": 1 / 60}))
        elif kind == 1:
            paths.append("/api/v1/estimates?" + urlencode(
                {"ra": ra[i], "dec": dec[i], "radius": 3 / 60, "limit": 100}))
        else:
            paths.append(f"/api/v1/spectra/{FIRST_OBSID + int(rng.integers(0, rows))}")
    return paths


def _json(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    document = json.loads(connection.getresponse().read())
    connection.close()
    return document


def published_limits(port):
    """The service's limits (/health) and the column names /api/v1/estimates offers."""
    limits = _json(port, "/health")["limits"]
    openapi = _json(port, "/openapi.json")
    parameters = openapi["paths"]["/api/v1/estimates"]["get"]["parameters"]
    columns = next(p for p in parameters if p["name"] == "columns")["schema"]["items"]["enum"]
    return limits, columns


# ---------------------------------------------------------------------------------------
# Client processes; each puts one list of (status, seconds[, ...]) on ``results``.
def normal_client(port, paths, start_at, end_at, results):
    samples = []
    while time.time() < start_at:
        time.sleep(0.01)
    for path in itertools.cycle(paths):
        if time.time() >= end_at:
            break
        status, _, _, seconds = get(port, path)
        if time.time() <= end_at:       # completed inside the measured window
            samples.append((status, seconds))
    results.put(("normal", samples))


def attacker(port, source, paths, end_at, flood, results):
    samples = []
    for path in itertools.cycle(paths):
        if time.time() >= end_at:
            break
        status, size, retry_after, seconds = get(port, path, source=source)
        samples.append((status, seconds, size))
        if status == 429 and not flood:
            time.sleep(max(0.0, min(float(retry_after or 1), end_at - time.time())))
    results.put(("attacker", samples))


def health_probe(port, start_at, end_at, results):
    samples = []
    while time.time() < start_at:
        time.sleep(0.01)
    while time.time() < end_at:
        status, _, _, seconds = get(port, "/health")
        samples.append((status, seconds))
        time.sleep(HEALTH_PERIOD_S)
    results.put(("health", samples))


def run_phase(port, attackers, normal_paths, attack_paths, options):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start_at = time.time() + WARMUP_S
    end_at = start_at + options.seconds
    processes = [context.Process(target=attacker, args=(
        port, f"127.0.0.{10 + i}", attack_paths[i % len(attack_paths):]
        + attack_paths[:i % len(attack_paths)], end_at, options.flood, results))
        for i in range(attackers)]
    processes += [context.Process(target=normal_client, args=(
        port, normal_paths[i::options.clients], start_at, end_at, results))
        for i in range(options.clients)]
    processes.append(context.Process(target=health_probe,
                                     args=(port, start_at, end_at, results)))
    load_before = os.getloadavg()[0]
    for process in processes:
        process.start()
    collected = {"normal": [], "attacker": [], "health": []}
    deadline = end_at + options.request_timeout + 10
    for _ in processes:
        kind, samples = results.get(timeout=max(1.0, deadline - time.time()))
        collected[kind].extend(samples)
    for process in processes:
        process.join(max(0.1, deadline - time.time()))
        if process.is_alive():
            process.terminate()
    normal = collected["normal"]
    ok = [seconds for status, seconds in normal if status == 200]
    health = collected["health"]
    return {
        "attackers": attackers,
        "normal_clients": {
            "requests": len(normal), "non_200": len(normal) - len(ok),
            "requests_per_s": round(len(normal) / options.seconds, 1),
            "latency": percentiles(ok) if ok else None},
        "health": {
            "requests": len(health),
            "statuses": dict(Counter(str(status) for status, _ in health)),
            "latency": percentiles([s for _, s in health]) if health else None,
            "max_ms": round(max(s for _, s in health) * 1000, 1) if health else None},
        "attacker_answers": dict(Counter(str(s[0]) for s in collected["attacker"])),
        "load_average_1min": {"start": round(load_before, 2),
                              "end": round(os.getloadavg()[0], 2)},
    }


def time_alone(port, paths, timeout):
    report = {}
    for name, path in paths.items():
        status, size, _, seconds = get(port, path, timeout=timeout)
        report[name] = {"status": status, "seconds": round(seconds, 3), "bytes": size}
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="spectra and estimates in the catalogue")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=4, help="normal client processes")
    parser.add_argument("--attackers", default="2,8",
                        help="comma-separated attacker counts, one phase each")
    parser.add_argument("--flood", action="store_true",
                        help="attackers ignore Retry-After and retry at once")
    parser.add_argument("--gunicorn-args", action="append", default=None,
                        help="gunicorn arguments replacing the shipped configuration "
                        f"({' '.join(SHIPPED_CONFIG)}); repeat for each argument")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="client timeout of one request [s]")
    add_catalogue_arguments(parser)
    options = parser.parse_args()
    attacker_counts = [int(n) for n in options.attackers.split(",") if n.strip()]
    gunicorn_args = tuple(options.gunicorn_args or SHIPPED_CONFIG)
    rng = np.random.default_rng(options.seed)
    report = {"rows": options.rows, "gunicorn_args": list(gunicorn_args),
              "cpu_count": os.cpu_count(), "flood": options.flood}
    with bench_catalogue(options.rows, rng, options.shared, options.keep) as catalogue:
        report["load"] = catalogue.load
        port = free_port()
        server = start_gunicorn(catalogue.url, catalogue.reader_url, port, gunicorn_args)
        try:
            limits, columns = published_limits(port)
            report["limits"] = limits
            centre = densest_position(catalogue.ra, catalogue.dec)
            attack = attack_queries(limits, columns, centre)
            report["attack_queries"] = attack
            report["worst_queries"] = time_alone(port, attack, options.request_timeout)
            normal = normal_queries(catalogue.ra, catalogue.dec, options.rows, rng)
            for path in normal[:30]:                # warm the workers' pools and caches
                get(port, path)
            phases = [run_phase(port, n, normal, list(attack.values()), options)
                      for n in [0] + attacker_counts]
        finally:
            stop(server)
    report["phases"] = phases
    unloaded = phases[0]["normal_clients"]["requests_per_s"]
    for phase in phases:
        phase["normal_clients"]["throughput_vs_unloaded"] = (
            round(phase["normal_clients"]["requests_per_s"] / unloaded, 3) if unloaded else None)
    worst = phases[-1]
    health_latency = worst["health"]["latency"] or {}
    report["goals"] = {
        "attackers": worst["attackers"],
        "normal_throughput_ge_50pct_of_unloaded":
            (worst["normal_clients"]["throughput_vs_unloaded"] or 0) >= 0.5,
        "health_p99_lt_200ms": health_latency.get("p99_ms", float("inf")) < 200,
        "health_max_lt_200ms": (worst["health"]["max_ms"] or float("inf")) < 200,
        "health_all_200": set(worst["health"]["statuses"]) == {"200"},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
