"""Benchmark: the sort indexes of migration 0003 and how /api/v1/estimates reads a page --
what they buy and what they cost, side by side in one run (issue 15).

On a PostgreSQL catalogue with a current and a retired model version (``--url`` of a
migrated catalogue, e.g. one that ``bench/api.py --keep`` left; otherwise bench/api.py's
loader builds one of ``--rows`` spectra in lamost_vac_bench_api and keeps it), measures:

1. ``requests``: a fixed set of ``/api/v1/estimates`` requests through the app (the
   issue's four, every order both ways, deep pages through the cursor, selective and
   unselective ranges, flags, the retired version, cones, refused shapes): status, read
   path and latency p50/p95 over ``--repeats``, at head and with the schema of 0002
   (``db downgrade 0002``: without the sort indexes; upgraded again afterwards);
2. ``estimate_upserts``: rows/s of the inference workers' write (etl.inference.write_rows,
   batches of 1,000 rows of a new model version) with and without the 0003 indexes on
   estimates (dropped inside the measuring transaction, which is rolled back; the teff
   index stands in for 0002's (model_version, teff)), without the triggers of 0006
   that keep ``estimate_cells`` counted (disabled in the same way), and as written before
   0006 (an executemany upsert, no triggers);
3. ``spectra_ingest``: rows/s of ``lamost-vac ingest spectra --metadata-only``
   (etl.ingest.ingest_spectra on a CSV) of ``--ingest-rows`` new spectra, with and
   without spectra's (snrg, obsid) index (dropped and rebuilt between rounds; the rows
   are deleted at the end);
4. ``layout``: ``estimates`` as one table against a copy LIST-partitioned by model
   version (per-partition (column, obsid) indexes): page reads, upserts, dropping a
   version (DELETE against DETACH + DROP, rolled back) and the stale set of a new version;
   the copy is dropped at the end (``--no-layout`` skips it).

Rounds of the write measurements alternate the configurations (the machine's load moves).

Usage:
    python bench/query_indexes.py --url postgresql://postgres@127.0.0.1/lamost_vac_bench_api
    python bench/query_indexes.py --rows 2000000 [--repeats 20] [--no-layout]
Prints one JSON document and, on stderr, the requests as a markdown table.
"""
import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.api import MODEL, bench_catalogue, percentiles, psycopg_connection  # noqa: E402
from bench.ingest import jittered_catalogue, real_rows, write_catalogue  # noqa: E402
from etl import db, schema  # noqa: E402
from etl.settings import Settings, settings  # noqa: E402

RETIRED = "bench-0.9"
NEW = "bench-new"               # the version the write measurements write (rolled back)
SORT_INDEXES = [f"ix_estimates_model_version_{name}_obsid"
                for name in schema.SORT_INDEX_COLUMNS["estimates"]]
NEW_ON_ESTIMATES = SORT_INDEXES[1:]          # teff's stands in for 0002's (version, teff)
SPECTRA_INDEX = "ix_spectra_snrg_obsid"
SLOW_S = 2.0                    # a request this slow is not repeated

# name -> query; {teff_mid}, {feh_mid}, {snrg_mid}: a cursor in the middle of that order
REQUESTS = [
    ("issue: hottest stars", "order=-teff&limit=100"),
    ("issue: snrg_min=70 by feh", "snrg_min=70&order=feh&limit=100"),
    ("issue: metal-rich dwarfs by -snrg", "logg_min=4.5&feh_min=0.3&order=-snrg&limit=100"),
    ("issue: very metal-poor", "feh_max=-2.5&limit=100"),
    *[(f"order {o}", f"order={o}&limit=100")
      for name in ("obsid", "teff", "logg", "feh", "snrg") for o in (name, "-" + name)],
    ("deep page -teff", "order=-teff&limit=100&cursor={teff_mid}"),
    ("deep page feh", "order=feh&limit=100&cursor={feh_mid}"),
    ("deep page -snrg", "order=-snrg&limit=100&cursor={snrg_mid}"),
    ("narrow range, own order", "teff_min=6000&teff_max=6100&order=-teff&limit=100"),
    ("unselective ranges by feh", "teff_min=4000&logg_min=1&order=feh&limit=100"),
    ("flags=0 by -teff", "flags=0&order=-teff&limit=100"),
    ("exclude_flags=7 by logg", "exclude_flags=7&order=logg&limit=100"),
    ("small selection by ra", "feh_max=-2.5&order=ra&limit=100"),
    ("retired version by -feh", f"model_version={RETIRED}&order=-feh&limit=100"),
    ("retired version, ranges", f"model_version={RETIRED}&teff_min=5000&logg_max=3"
                                "&order=teff&limit=100"),
    ("cone 1 arcmin", "ra=120&dec=30&radius=0.0167&limit=100"),
    ("cone 1 deg by -teff", "ra=120&dec=30&radius=1&order=-teff&limit=100"),
    ("page of 5000 by feh", "order=feh&limit=5000"),
    ("refused: no index (ra)", "order=ra&limit=100"),
    ("refused: sparse in order", "logg_max=1.5&feh_max=-1&order=-teff&limit=100"),
]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def run_sql(url, *statements, autocommit=True):
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            if autocommit:
                connection.execution_options(isolation_level="AUTOCOMMIT")
            results = []
            for statement in statements:
                result = connection.exec_driver_sql(statement)
                results.append(result.all() if result.returns_rows else None)
            return results
    finally:
        engine.dispose()


def ensure_retired_version(url):
    """A retired model version with an estimate for every spectrum, when there is none."""
    [[(count,)]] = run_sql(url, f"SELECT count(*) FROM models WHERE version = '{RETIRED}'")
    if count:
        return "present"
    started = time.perf_counter()
    run_sql(url, f"""INSERT INTO models (version, created_at, artifact_path, artifact_sha256,
                         training_set, metrics, status)
                     VALUES ('{RETIRED}', now(), 'bench', repeat('0', 64), '{{}}', '{{}}',
                             'retired')""",
            f"""INSERT INTO estimates (obsid, model_version, teff, teff_err_model, teff_err,
                    logg, logg_err_model, logg_err, feh, feh_err_model, feh_err, flags,
                    code_version, preprocessing_hash, run_id, created_at)
                SELECT obsid, '{RETIRED}', teff + 30, teff_err_model, teff_err, logg + 0.02,
                       logg_err_model, logg_err, feh - 0.01, feh_err_model, feh_err, flags,
                       code_version, preprocessing_hash, run_id, created_at
                FROM estimates WHERE model_version = '{MODEL}'""",
            "VACUUM ANALYZE estimates")
    return f"added in {time.perf_counter() - started:.0f} s"


def middle_cursors(url):
    """Cursors in the middle of the -teff, feh and -snrg orders (deep pages)."""
    from service.blueprints.estimates import encode_cursor

    [[(rows,)]] = run_sql(url, f"SELECT count(*) FROM estimates WHERE model_version = '{MODEL}'")
    half = rows // 2
    [[teff], [feh], [snrg]] = run_sql(
        url,
        f"SELECT teff, obsid FROM estimates WHERE model_version = '{MODEL}' "
        f"AND teff IS NOT NULL ORDER BY teff DESC, obsid DESC OFFSET {half} LIMIT 1",
        f"SELECT feh, obsid FROM estimates WHERE model_version = '{MODEL}' "
        f"AND feh IS NOT NULL ORDER BY feh, obsid OFFSET {half} LIMIT 1",
        f"SELECT snrg, obsid FROM spectra WHERE snrg IS NOT NULL "
        f"ORDER BY snrg DESC, obsid DESC OFFSET {half} LIMIT 1")
    return {"teff_mid": encode_cursor("-teff", *teff), "feh_mid": encode_cursor("feh", *feh),
            "snrg_mid": encode_cursor("-snrg", *snrg)}


def time_requests(url, cursors, repeats, budget):
    """Each request of REQUESTS through the app (reader = writer URL, 10 s timeout)."""
    from service.app import create_app
    from service.blueprints import estimates as api
    from service.openapi import parse
    from werkzeug.datastructures import MultiDict
    from urllib.parse import parse_qsl

    app = create_app(Settings(database_url=url, reader_database_url=url,
                              statement_timeout_ms=10_000, large_queries_per_client=100,
                              large_queries_max=100, api_max_rows_read=budget))
    client, service = app.test_client(), app.extensions["lamost_vac"]
    out = {}
    for name, template in REQUESTS:
        query = template.format(**cursors)
        args = parse(api.parameters(service.limits), MultiDict(parse_qsl(query)))
        with service.engine.connect() as connection:
            version = api.resolve_model_version(connection, args["model_version"])
            try:
                path = api.read_path(connection, args, version, budget).kind
            except api.ParamError:
                path = "refused up front"
        client.get("/api/v1/estimates?" + query)           # warm-up
        timings, statuses = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get("/api/v1/estimates?" + query)
            timings.append(time.perf_counter() - started)
            statuses.append(response.status_code)
            if timings[-1] > SLOW_S:
                break
        out[name] = {"query": template, "path": path, "status": sorted(set(statuses)),
                     **percentiles(timings)}
        if response.status_code != 200:
            out[name]["error"] = response.get_json().get("error", "")
        log(f"  {statuses[-1]} {out[name]['p50_ms']:9.1f} ms  {path:17s} {name}")
    service.dispose()
    return out


def estimate_rows(first_obsid, n, rng):
    now = dt.datetime.now(dt.timezone.utc)
    return [{"obsid": obsid, "model_version": NEW, "teff": float(rng.normal(5000, 700)),
             "teff_err_model": 30.0, "teff_err": float(rng.uniform(50, 200)),
             "logg": float(rng.normal(3.5, 1)), "logg_err_model": 0.05,
             "logg_err": float(rng.uniform(0.05, 0.3)), "feh": float(rng.normal(-0.3, 0.4)),
             "feh_err_model": 0.03, "feh_err": float(rng.uniform(0.03, 0.2)),
             "flags": int(rng.choice([0, 0, 4, 256])), "code_version": "bench",
             "preprocessing_hash": "0" * 16, "run_id": "bench", "created_at": now}
            for obsid in range(first_obsid, first_obsid + n)]


@contextlib.contextmanager
def new_model_version(url):
    run_sql(url, f"""INSERT INTO models (version, created_at, artifact_path, artifact_sha256,
                         training_set, status)
                     VALUES ('{NEW}', now(), 'bench', repeat('0', 64), '{{}}', 'retired')""")
    try:
        yield
    finally:
        run_sql(url, f"DELETE FROM estimates WHERE model_version = '{NEW}'",
                f"DELETE FROM models WHERE version = '{NEW}'")


def executemany_upsert(connection, rows):
    """The workers' estimate write before migration 0006: an executemany upsert."""
    from sqlalchemy.dialects.postgresql import insert

    statement = insert(schema.estimates)
    connection.execute(statement.on_conflict_do_update(
        index_elements=["obsid", "model_version"],
        set_={c: statement.excluded[c] for c in rows[0] if c not in ("obsid", "model_version")}),
        rows)


def estimate_upserts(url, rounds, batches, rng):
    """Rows/s of write_rows with and without the 0003 indexes (see the module doc)."""
    from etl.inference import write_rows

    engine = db.make_engine(url)
    with engine.connect() as connection:
        first, count = connection.exec_driver_sql(
            "SELECT min(obsid), count(*) FROM spectra").one()
    rates = {"with_0003_indexes": [], "without": [], "without_cell_triggers": [],
             "executemany_before_0006": []}
    with new_model_version(url):
        for _ in range(rounds):
            for config in rates:
                start = first + int(rng.integers(0, max(1, count - batches * 1000)))
                with engine.connect() as connection:
                    transaction = connection.begin()
                    if config == "without":
                        connection.exec_driver_sql("DROP INDEX " + ", ".join(NEW_ON_ESTIMATES))
                    if config in ("without_cell_triggers", "executemany_before_0006"):
                        connection.exec_driver_sql(         # migration 0006's triggers
                            "ALTER TABLE estimates DISABLE TRIGGER USER")
                    write = (executemany_upsert if config == "executemany_before_0006"
                             else lambda c, rows: write_rows(c, NEW, "bench", rows, {}))
                    started = time.perf_counter()
                    for b in range(batches):
                        write(connection, estimate_rows(start + b * 1000, 1000, rng))
                    rates[config].append(batches * 1000 / (time.perf_counter() - started))
                    transaction.rollback()
    engine.dispose()
    compared = _compared(rates, "with_0003_indexes", "without", batch_rows=1000,
                         rows_per_run=batches * 1000)
    for other in ("without_cell_triggers", "executemany_before_0006"):
        compared[f"ratio_to_{other}"] = round(
            compared["with_0003_indexes_rows_per_s"] / compared[f"{other}_rows_per_s"], 3)
    return compared


def _compared(rates, new, old, **extra):
    medians = {k: round(statistics.median(v)) for k, v in rates.items()}
    return {**extra, **{f"{k}_rows_per_s": medians[k] for k in rates},
            "runs_rows_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
            "ratio": round(medians[new] / medians[old], 3)}


def spectra_ingest(url, rounds, n, shared, rng):
    """Rows/s of ingest_spectra (metadata only) with and without spectra's snrg index."""
    from etl.ingest import SpectraIngestOptions, ingest_spectra

    rows = real_rows(shared)
    engine = db.make_engine(url)
    rates = {"with_0003_index": [], "without": []}
    first = 3_000_000_000
    try:
        with tempfile.TemporaryDirectory() as folder:
            for r in range(rounds):
                for config in rates:
                    indexed = config == "with_0003_index"
                    run_sql(url, f"CREATE INDEX IF NOT EXISTS {SPECTRA_INDEX} "
                                 "ON spectra (snrg, obsid)" if indexed else
                                 f"DROP INDEX IF EXISTS {SPECTRA_INDEX}")
                    pick, ra, dec = jittered_catalogue(rows, n, rng)
                    path = os.path.join(folder, f"catalogue-{r}-{config}.csv")
                    write_catalogue(path, rows, pick, ra, dec, first_obsid=first)
                    first += n
                    started = time.perf_counter()
                    summary = ingest_spectra(engine, SpectraIngestOptions(
                        catalogue=path, metadata_only=True, batch_rows=100_000,
                        show_progress=False))
                    rates[config].append(n / (time.perf_counter() - started))
                    assert summary.loaded == n, summary.text()
    finally:
        run_sql(url, f"CREATE INDEX IF NOT EXISTS {SPECTRA_INDEX} ON spectra (snrg, obsid)",
                "DELETE FROM spectra WHERE obsid >= 3000000000", "VACUUM ANALYZE spectra")
        engine.dispose()
    return _compared(rates, "with_0003_index", "without", rows_per_run=n)


PAGE_READS = {
    "page -teff": "SELECT obsid, teff FROM {t} WHERE model_version = '{v}' AND teff IS NOT NULL "
                  "ORDER BY teff DESC, obsid DESC LIMIT 101",
    "deep page feh": "SELECT obsid, feh FROM {t} WHERE model_version = '{v}' AND feh IS NOT NULL "
                     "AND (feh, obsid) > (0.1, 0) ORDER BY feh, obsid LIMIT 101",
    "range logg<=1.5 by obsid": "SELECT obsid FROM (SELECT obsid FROM {t} WHERE model_version "
                                "= '{v}' AND logg <= 1.5 OFFSET 0) s ORDER BY obsid LIMIT 101",
    "retired version page feh": "SELECT obsid, feh FROM {t} WHERE model_version = '{r}' AND feh "
                                "IS NOT NULL ORDER BY feh, obsid LIMIT 101",
    "whole version (count, avg teff)": "SELECT count(*), avg(teff) FROM {t} "
                                       "WHERE model_version = '{v}'",
}


def layout(url, rounds, repeats, rng):
    """One table against LIST partitions by model version (see the module doc)."""
    [[(versions,)]] = run_sql(url, "SELECT array_agg(DISTINCT model_version) FROM estimates")
    started = time.perf_counter()
    run_sql(url, "DROP TABLE IF EXISTS estimates_part",
            "CREATE TABLE estimates_part (LIKE estimates INCLUDING DEFAULTS) "
            "PARTITION BY LIST (model_version)",
            *[f"CREATE TABLE estimates_part_{i} PARTITION OF estimates_part "
              f"FOR VALUES IN ('{version}')" for i, version in enumerate(versions)],
            f"CREATE TABLE estimates_part_new PARTITION OF estimates_part FOR VALUES IN ('{NEW}')",
            "INSERT INTO estimates_part SELECT * FROM estimates",
            "ALTER TABLE estimates_part ADD PRIMARY KEY (estimate_id, model_version)",
            "ALTER TABLE estimates_part ADD UNIQUE (obsid, model_version)",
            *[f"CREATE INDEX ON estimates_part ({name}, obsid)"
              for name in schema.SORT_INDEX_COLUMNS["estimates"]],
            "VACUUM ANALYZE estimates_part")
    report = {"copy_and_index_s": round(time.perf_counter() - started, 1)}
    connection = psycopg_connection(url)
    try:
        cursor = connection.cursor()
        cursor.execute("SET max_parallel_workers_per_gather = 0")
        reads = {}
        for name, sql in PAGE_READS.items():
            reads[name] = {}
            for table in ("estimates", "estimates_part"):
                statement = sql.format(t=table, v=MODEL, r=RETIRED)
                timings = []
                for i in range(repeats if "whole" not in name else 3):
                    started = time.perf_counter()
                    cursor.execute(statement)
                    cursor.fetchall()
                    timings.append(time.perf_counter() - started)
                reads[name][table] = percentiles(timings)["p50_ms"]
        report["reads_p50_ms"] = reads
        report["index_sizes_mb"] = _index_sizes(cursor)
        report["upserts"] = _partition_upserts(cursor, rounds, rng)
        drop = {}
        for what, statements in (
                ("delete_rows_s", [f"DELETE FROM estimates WHERE model_version = '{RETIRED}'"]),
                ("detach_and_drop_partition_s", [
                    "ALTER TABLE estimates_part DETACH PARTITION estimates_part_"
                    f"{versions.index(RETIRED)}",
                    f"DROP TABLE estimates_part_{versions.index(RETIRED)}"])):
            cursor.execute("BEGIN")
            started = time.perf_counter()
            for statement in statements:
                cursor.execute(statement)
            drop[what] = round(time.perf_counter() - started, 3)
            cursor.execute("ROLLBACK")
        report["drop_retired_version"] = drop
        stale = {}
        for table in ("estimates", "estimates_part"):
            started = time.perf_counter()
            cursor.execute(f"SELECT count(*) FROM spectra s WHERE NOT EXISTS (SELECT 1 FROM "
                           f"{table} e WHERE e.obsid = s.obsid AND e.model_version = '{NEW}')")
            cursor.fetchall()
            stale[table] = round(time.perf_counter() - started, 2)
        report["stale_set_of_a_new_version_s"] = stale
    finally:
        connection.close()
        run_sql(url, "DROP TABLE IF EXISTS estimates_part")
    return report


def _index_sizes(cursor):
    cursor.execute("SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i "
                   "JOIN pg_class c ON c.oid = i.indexrelid "
                   "JOIN pg_class t ON t.oid = i.indrelid "
                   "WHERE t.relname = 'estimates' OR t.relname LIKE 'estimates_part_%'")
    sizes = {"estimates": 0, "estimates_part": 0}
    for name, size in cursor.fetchall():
        if any(column in name for column in schema.SORT_INDEX_COLUMNS["estimates"]):
            sizes["estimates_part" if name.startswith("estimates_part") else "estimates"] += size
    return {f"{table}_sort_indexes": round(size / 2 ** 20) for table, size in sizes.items()}


def _partition_upserts(cursor, rounds, rng):
    columns = list(estimate_rows(1, 1, rng)[0])
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    cursor.execute("SELECT min(obsid), count(*) FROM spectra")
    first, count = cursor.fetchone()
    cursor.execute(f"INSERT INTO models (version, created_at, artifact_path, artifact_sha256, "
                   f"training_set, status) VALUES ('{NEW}', now(), 'bench', repeat('0', 64), "
                   f"'{{}}', 'retired') ON CONFLICT DO NOTHING")
    rates = {"estimates_part": [], "estimates": []}
    for _ in range(rounds):
        for table in rates:
            start = first + int(rng.integers(0, max(1, count - 5000)))
            cursor.execute("BEGIN")
            started = time.perf_counter()
            for b in range(5):
                rows = [tuple(row.values()) for row in estimate_rows(start + b * 1000, 1000, rng)]
                cursor.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                    f"({', '.join(['%s'] * len(columns))}) ON CONFLICT (obsid, model_version) "
                    f"DO UPDATE SET {updates}", rows)
            rates[table].append(5000 / (time.perf_counter() - started))
            cursor.execute("ROLLBACK")
    cursor.execute(f"DELETE FROM models WHERE version = '{NEW}'")
    return _compared(rates, "estimates_part", "estimates", rows_per_run=5000)


def markdown(requests_after, requests_before):
    lines = ["| request | query | path | p50 ms (0002) | p50 ms | p95 ms | status |",
             "|---|---|---|---:|---:|---:|---|"]
    for name, after in requests_after.items():
        before = requests_before.get(name, {})
        status = "/".join(str(s) for s in after["status"])
        old = f"{before['p50_ms']:,.0f}" + ("" if before["status"] == [200] else
                                            f" ({'/'.join(map(str, before['status']))})") \
            if before else ""
        lines.append(f"| {name} | `{after['query']}` | {after['path']} | {old} | "
                     f"{after['p50_ms']:,.0f} | {after['p95_ms']:,.0f} | {status} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a migrated catalogue (default: build one)")
    parser.add_argument("--rows", type=int, default=2_000_000,
                        help="spectra of the catalogue built without --url")
    parser.add_argument("--repeats", type=int, default=20, help="timings per request")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the write measurements")
    parser.add_argument("--ingest-rows", type=int, default=200_000)
    parser.add_argument("--budget", type=int, default=settings.api_max_rows_read,
                        help="LAMOST_VAC_API_MAX_ROWS_READ of the requests")
    parser.add_argument("--no-before", action="store_true",
                        help="skip the requests with the schema of 0002")
    parser.add_argument("--no-layout", action="store_true", help="skip the partitioning run")
    parser.add_argument("--shared", default=os.environ.get("LAMOST_VAC_SHARED",
                                                           settings.shared_dir))
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    rng = np.random.default_rng(options.seed)

    with contextlib.ExitStack() as stack:
        url = options.url
        if url is None:
            url = stack.enter_context(bench_catalogue(options.rows, rng, options.shared,
                                                      keep=True)).url
        url = db.normalise_url(url)
        [[(spectra, estimates)]] = run_sql(
            url, "SELECT (SELECT count(*) FROM spectra), (SELECT count(*) FROM estimates)")
        report = {"database": url.rsplit("/", 1)[-1], "spectra": spectra,
                  "retired_version": ensure_retired_version(url), "cpu_count": os.cpu_count(),
                  "load_average_at_start": os.getloadavg()[0], "budget": options.budget}
        report["estimates"] = run_sql(url, "SELECT count(*) FROM estimates")[0][0][0]
        cursors = middle_cursors(url)
        log("requests at head:")
        report["requests"] = time_requests(url, cursors, options.repeats, options.budget)
        before = {}
        if not options.no_before:
            log("requests with the schema of 0002 (downgrade) ...")
            db.downgrade(url, "0002")
            try:
                before = time_requests(url, cursors, options.repeats, options.budget)
            finally:
                db.upgrade(url)
                run_sql(url, "ANALYZE estimates", "ANALYZE spectra")
        report["requests_with_0002_schema"] = before
        log("estimate upserts ...")
        report["estimate_upserts"] = estimate_upserts(url, options.rounds, 5, rng)
        log("spectra ingest ...")
        report["spectra_ingest"] = spectra_ingest(url, options.rounds, options.ingest_rows,
                                                  options.shared, rng)
        if not options.no_layout:
            log("layout: LIST partitions ...")
            report["layout"] = layout(url, options.rounds, options.repeats, rng)
        report["load_average_at_end"] = os.getloadavg()[0]
    log(markdown(report["requests"], before))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
