"""Benchmark: the query service on 1 million estimates in PostgreSQL (Q3C).

In one run:
1. Loads N spectra and their current-model estimates (COPY) into a throwaway database,
   positions jittered (Gaussian, 0.5 deg) around the real LAMOST DR10 positions in
   ``data/labels/lamost_dr10_lasp_afg_rows.csv`` (labels from the same rows), then
   clusters on the Q3C index and ANALYZEs, as ``lamost-vac db maintain`` does.
2. Latency p50/p95/p99 of 1-arcmin and 10-arcmin cones (centres: random catalogue
   positions), each measured five ways with the same centres (:func:`cone_methods`),
   interleaved and warm (:func:`interleaved_latency`): the bare positions by
   ``q3c_radial_query`` via psycopg (planned per call, and prepared with a generic plan),
   the catalogue's rows in the cone as a collaborator selects them from
   ``v_current_estimates``, the exact statement /scs runs via psycopg, and ``GET /scs``
   (VOTable) over HTTP from gunicorn (2 sync workers), reader role, one request at a time.
3. Throughput: ``GET /scs`` 1-arcmin cones from several client processes against the same
   gunicorn, a bounded number of requests; requests/s and error count.

Usage:
    python bench/api.py [--rows 1000000] [--requests 300] [--load-requests 6000]
Needs PostgreSQL with q3c (LAMOST_VAC_TEST_PG_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres) and gunicorn; the database
lamost_vac_bench_api_<pid> is created and dropped. Prints one JSON document.
"""
import argparse
import contextlib
import csv
import datetime as dt
import http.client
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import numpy as np
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throwaway_db import throwaway_database  # noqa: E402
from etl import db, schema  # noqa: E402
from etl.settings import settings  # noqa: E402

MODEL = "bench-1.0"
FIRST_OBSID = 1_000_000_000     # the spectra loaded have obsids FIRST_OBSID, FIRST_OBSID + 1, ...
RADII_ARCMIN = (1.0, 10.0)


def real_positions(shared):
    path = os.path.join(shared, "data", "labels", "lamost_dr10_lasp_afg_rows.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows


def footprint_positions(rows, n, rng):
    """(pick, ra, dec) of n positions following the LAMOST footprint: each jittered
    (Gaussian, 0.5 deg) around the position of a random row of ``rows``
    (:func:`real_positions`), the index of which is ``pick``."""
    pick = rng.integers(0, len(rows), n)
    ra0 = np.array([float(row["ra"]) for row in rows])[pick]
    dec0 = np.array([float(row["dec"]) for row in rows])[pick]
    dec = np.clip(dec0 + rng.normal(0, 0.5, n), -89.99, 89.99)
    ra = (ra0 + rng.normal(0, 0.5, n) / np.cos(np.radians(dec))) % 360.0
    ra[ra >= 360.0] = 0.0
    return pick, ra, dec


def load(url, n, rng, shared):
    rows = real_positions(shared)
    pick, ra, dec = footprint_positions(rows, n, rng)
    teff = np.array([float(rows[i]["teff"] or 5000) for i in pick]) + rng.normal(0, 50, n)
    logg = np.array([float(rows[i]["logg"] or 4) for i in pick]) + rng.normal(0, 0.1, n)
    feh = np.array([float(rows[i]["feh"] or 0) for i in pick]) + rng.normal(0, 0.05, n)
    snrg = np.array([float(rows[i]["snrg"] or 20) for i in pick])
    zone_height = schema.ZONE_HEIGHT_DEG
    zone = np.minimum(np.floor((dec + 90.0) / zone_height).astype(int),
                      int(np.ceil(180.0 / zone_height)) - 1)
    obsid = np.arange(FIRST_OBSID, FIRST_OBSID + n)
    flags = rng.choice([0, 0, 0, 0, 1, 2, 4], n)
    now = dt.datetime.now(dt.timezone.utc)

    engine = db.make_engine(url)
    started = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(schema.models.insert().values(
            version=MODEL, created_at=now, artifact_path="bench", artifact_sha256="0" * 64,
            training_set={"bench": True}, metrics={}, status="current"))
        db.copy_rows(connection, "spectra", ["obsid", "ra", "dec", "zone", "snrg", "class"],
                     zip(obsid.tolist(), ra.tolist(), dec.tolist(), zone.tolist(),
                         snrg.tolist(), ["STAR"] * n))
        estimate_columns = ["obsid", "model_version", "teff", "teff_err_model", "teff_err",
                            "logg", "logg_err_model", "logg_err", "feh", "feh_err_model",
                            "feh_err", "flags", "code_version", "preprocessing_hash",
                            "run_id", "created_at"]
        db.copy_rows(connection, "estimates", estimate_columns, (
            (o, MODEL, t, 40.0, 90.0, g, 0.05, 0.12, f, 0.03, 0.07, fl, "bench", "0" * 16,
             "bench", now)
            for o, t, g, f, fl in zip(obsid.tolist(), teff.tolist(), logg.tolist(),
                                      feh.tolist(), flags.tolist())))
    loaded = time.perf_counter() - started
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        db.cluster_on_position(connection)
        db.analyze(connection, ["estimates", "models"])
        connection.exec_driver_sql("VACUUM ANALYZE estimates")
    maintained = time.perf_counter() - started - loaded
    engine.dispose()
    return ra, dec, {"load_s": round(loaded, 1), "cluster_analyze_s": round(maintained, 1)}


def percentiles(samples_s):
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": int(len(ms))}


def psycopg_connection(url, generic=False):
    """A plain psycopg connection (autocommit) to the database at ``url``, JIT off as in
    the service (a generic Q3C plan's cost estimate would trigger a JIT compilation
    costing seconds); ``generic``: prepared statements get a generic plan."""
    import psycopg

    parsed = make_url(url)
    options = "-c jit=off" + (" -c plan_cache_mode=force_generic_plan" if generic else "")
    return psycopg.connect(host=parsed.host, port=parsed.port or 5432,
                           user=parsed.username, dbname=parsed.database,
                           autocommit=True, options=options)


RAW_Q3C = ("SELECT obsid, ra, dec FROM spectra "
           "WHERE q3c_radial_query(ra, dec, %(ra)s, %(dec)s, %(r)s)")
# What a collaborator writes in SQL for the same catalogue rows (README: SQL), unsorted
RAW_Q3C_CATALOGUE = ("SELECT * FROM v_current_estimates "
                     "WHERE q3c_radial_query(ra, dec, %(ra)s, %(dec)s, %(r)s)")


def scs_equivalent_sql():
    """The statement /scs compiles (VERB=2), as text with psycopg placeholders."""
    from sqlalchemy.dialects import postgresql

    from service.blueprints.scs import scs_statement

    dialect = postgresql.psycopg.dialect()

    class Bind:  # just enough for etl.db.is_postgres
        pass

    bind = Bind()
    bind.dialect = dialect
    statement = scs_statement(bind, 11.125, 22.375, 0.3125, 2, 10001)
    compiled = statement.compile(dialect=dialect)
    sql = compiled.string
    mapping = {}
    for name, value in compiled.params.items():
        if value == 11.125:
            mapping[name] = "%(ra)s"
        elif value == 22.375:
            mapping[name] = "%(dec)s"
        elif value == 0.3125:
            mapping[name] = "%(r)s"
        elif isinstance(value, int):
            mapping[name] = str(value)
        else:
            mapping[name] = "'" + str(value).replace("'", "''") + "'"
    for name, replacement in mapping.items():
        sql = sql.replace(f"%({name})s", replacement)
    return sql.replace("::VARCHAR", "").replace("::INTEGER", "")


@contextlib.contextmanager
def cone_methods(reader_url, port):
    """The ways of asking for a cone, as {name: run(ra, dec, radius_deg)}; ``run`` returns
    the rows (or the answer's size in rows for HTTP), None on an error. Each SQL method has
    its own connection (autocommit, JIT off):

    * ``raw_sql_q3c``: the bare positions, ``SELECT obsid, ra, dec ... q3c_radial_query``,
      planned for each call (what psql or a simple client gets);
    * ``raw_sql_q3c_prepared_generic``: the same, prepared with a generic plan;
    * ``raw_sql_q3c_catalogue``: the catalogue's rows in the cone as a collaborator asks
      for them in SQL, ``SELECT * FROM v_current_estimates WHERE q3c_radial_query(...)``
      (every spectrum in the cone, no MAXREC, unsorted), planned for each call;
    * ``raw_sql_scs_query_prepared_generic``: the very statement /scs runs (join to the
      current estimates, its columns, MAXREC), prepared with a generic plan as the service
      does -- the price of /scs's rows in SQL;
    * ``scs_http``: ``GET /scs`` (VOTable) from the server on ``port``.
    """
    scs_sql = scs_equivalent_sql()
    connections = []

    def sql(statement, generic):
        connection = psycopg_connection(reader_url, generic)
        connections.append(connection)
        cursor = connection.cursor()

        def run(ra, dec, radius_deg):
            cursor.execute(statement, {"ra": ra, "dec": dec, "r": radius_deg}, prepare=generic)
            return len(cursor.fetchall())
        return run

    def http(ra, dec, radius_deg):
        status, body = http_get(port, scs_path(ra, dec, radius_deg))
        return body.count(b"<TR>") if votable_answered(status, body) else None

    try:
        yield {"raw_sql_q3c": sql(RAW_Q3C, False),
               "raw_sql_q3c_prepared_generic": sql(RAW_Q3C, True),
               "raw_sql_q3c_catalogue": sql(RAW_Q3C_CATALOGUE, False),
               "raw_sql_scs_query_prepared_generic": sql(scs_sql, True),
               "scs_http": http}
    finally:
        for connection in connections:
            connection.close()


def interleaved_latency(methods, centres, radius_deg, rounds=1):
    """Latency of each method of :func:`cone_methods` at the same centres, measured fairly:
    every method first reads each centre once untimed (so that no method pays for bringing
    pages into the cache that a later one then finds warm), then each centre is timed by
    every method in turn, the order rotating from centre to centre (and round to round) so
    that none is always first. Returns {name: percentiles + rows_mean + errors}."""
    names = list(methods)
    for ra, dec in centres:
        for name in names:
            methods[name](ra, dec, radius_deg)
    timings = {name: [] for name in names}
    rows = {name: [] for name in names}
    errors = dict.fromkeys(names, 0)
    turn = 0
    for _ in range(rounds):
        for ra, dec in centres:
            turn += 1
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                started = time.perf_counter()
                result = methods[name](ra, dec, radius_deg)
                timings[name].append(time.perf_counter() - started)
                if result is None:
                    errors[name] += 1
                else:
                    rows[name].append(result)
    return {name: dict(percentiles(timings[name]), errors=errors[name],
                       rows_mean=round(float(np.mean(rows[name])), 1) if rows[name] else None)
            for name in names}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def scs_path(ra, dec, radius_deg):
    return "/scs?" + urlencode({"RA": repr(ra), "DEC": repr(dec), "SR": repr(radius_deg)})


def votable_answered(status, body):
    """Whether a VOTable service answered: HTTP 200 and no QUERY_STATUS ERROR."""
    return status == 200 and b'value="ERROR"' not in body


def _load_worker(args):
    port, centres, radius_deg, threads = args
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()
    chunks = [centres[i::threads] for i in range(threads)]

    def run(chunk):
        ok = errors = 0
        for ra, dec in chunk:
            try:
                status, body = http_get(port, scs_path(ra, dec, radius_deg))
                if votable_answered(status, body):
                    ok += 1
                else:
                    errors += 1
            except OSError:
                errors += 1
        with lock:
            counts["ok"] += ok
            counts["errors"] += errors

    workers = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts


def throughput(port, centres, radius_deg, processes=2, threads=4):
    chunks = [(port, centres[i::processes], radius_deg, threads) for i in range(processes)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(_load_worker, chunks)
    elapsed = time.perf_counter() - started
    ok = sum(r["ok"] for r in results)
    errors = sum(r["errors"] for r in results)
    return {"requests": ok + errors, "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round((ok + errors) / elapsed, 1),
            "client_processes": processes, "threads_per_process": threads}


def start_gunicorn(url, reader_url, port, gunicorn_args=("-w", "2"), environ=None):
    """gunicorn serving the app on 127.0.0.1:``port`` with ``gunicorn_args`` (e.g.
    ``-c python:service.gunicorn_conf``), once /health answers 200."""
    env = dict(os.environ, LAMOST_VAC_DATABASE_URL=url,
               LAMOST_VAC_READER_DATABASE_URL=reader_url, **(environ or {}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *gunicorn_args, "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", "service.app:create_app()"],
        cwd=root, env=env, start_new_session=True)
    for _ in range(200):
        try:
            status, _ = http_get(port, "/health")
            if status == 200:
                return process
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError("gunicorn exited")
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not start")


def stop(process):
    if process and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _holds_rows(url, rows):
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql(
                "SELECT count(*) FROM estimates").scalar() == rows
    except Exception:  # noqa: BLE001 -- not migrated or half loaded: load again
        return False
    finally:
        engine.dispose()


def _positions(url):
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT ra, dec FROM spectra").all()
    engine.dispose()
    array = np.array(rows, dtype=float)
    return array[:, 0], array[:, 1]


@dataclass
class BenchCatalogue:
    """A migrated PostgreSQL catalogue of spectra and estimates (see :func:`load`)."""
    url: str                # writer
    reader_url: str
    ra: np.ndarray          # positions of the spectra
    dec: np.ndarray
    load: object            # load timings, or "reused"


@contextlib.contextmanager
def bench_catalogue(rows, rng, shared, keep=False):
    """Yield a :class:`BenchCatalogue` in the database lamost_vac_bench_api_<pid>,
    dropped on exit; with ``keep``, in lamost_vac_bench_api, kept and reused by the next
    run when it already holds ``rows`` estimates."""
    name = "lamost_vac_bench_api" if keep else f"lamost_vac_bench_api_{os.getpid()}"
    with throwaway_database(name, keep=keep, reuse=(lambda url: _holds_rows(url, rows))
                            if keep else None) as database:
        url = database.url
        if database.reused:
            ra, dec = _positions(url)
            load_report = "reused"
        else:
            db.upgrade(url)
            ra, dec, load_report = load(url, rows, rng, shared)
        yield BenchCatalogue(url, db.reader_url_for(url), ra, dec, load_report)


def add_catalogue_arguments(parser):
    """--shared, --seed and --keep: the options of :func:`bench_catalogue` that every bench
    on this catalogue (api, attack, tap) takes."""
    parser.add_argument("--shared", default=os.environ.get("LAMOST_VAC_SHARED",
                                                           settings.shared_dir))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true",
                        help="keep the database lamost_vac_bench_api (and reuse it when it "
                        "already holds --rows estimates) instead of a throwaway one")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300,
                        help="cones per latency measurement")
    parser.add_argument("--load-requests", type=int, default=6000,
                        help="requests in the throughput run")
    add_catalogue_arguments(parser)
    options = parser.parse_args()
    rng = np.random.default_rng(options.seed)

    server = None
    report = {"rows": options.rows, "model_version": MODEL}
    with bench_catalogue(options.rows, rng, options.shared, options.keep) as catalogue:
        url, reader_url, ra, dec = (catalogue.url, catalogue.reader_url, catalogue.ra,
                                    catalogue.dec)
        report["load"] = catalogue.load
        try:
            pick = rng.integers(0, len(ra), options.requests)
            centres = list(zip(((ra[pick] + rng.normal(0, 0.01, len(pick))) % 360.0).tolist(),
                               np.clip(dec[pick] + rng.normal(0, 0.01, len(pick)), -90, 90)
                               .tolist()))
            port = free_port()
            server = start_gunicorn(url, reader_url, port)
            report["latency"] = {}
            with cone_methods(reader_url, port) as methods:
                for arcmin in RADII_ARCMIN:
                    entry = interleaved_latency(methods, centres, arcmin / 60.0)
                    for key in ("raw_sql_q3c", "raw_sql_q3c_prepared_generic",
                                "raw_sql_q3c_catalogue",
                                "raw_sql_scs_query_prepared_generic"):
                        entry[f"scs_p50_over_{key}_p50"] = round(
                            entry["scs_http"]["p50_ms"] / entry[key]["p50_ms"], 2)
                    report["latency"][f"{arcmin:g}arcmin"] = entry
            pick = rng.integers(0, len(ra), options.load_requests)
            load_centres = list(zip(ra[pick].tolist(), dec[pick].tolist()))
            for centre in load_centres[:50]:           # warm-up, untimed
                http_get(port, scs_path(*centre, 1 / 60.0))
            report["throughput_1arcmin"] = throughput(port, load_centres, 1 / 60.0)
            report["throughput_1arcmin"]["gunicorn_workers"] = 2
            report["goals"] = {
                "scs_p50_le_2x_raw_sql_1arcmin":
                    report["latency"]["1arcmin"]["scs_p50_over_raw_sql_q3c_p50"] <= 2.0,
                "scs_p50_le_2x_raw_sql_10arcmin":
                    report["latency"]["10arcmin"]["scs_p50_over_raw_sql_q3c_p50"] <= 2.0,
                "ge_300_requests_per_s":
                    report["throughput_1arcmin"]["requests_per_s"] >= 300}
            report["cpu_count"] = os.cpu_count()
        finally:
            stop(server)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
