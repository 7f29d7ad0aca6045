"""Benchmark: the catalogue at LAMOST DR8 size (issue 15) -- load, maintenance, every
query shape through the HTTP API, full exports and the stale-set plan, in one run.

1. A throw-away PostgreSQL database (bench/throwaway_db.py) with --rows spectra
   (default 11,000,000, DR8 LRS size): positions following the LAMOST footprint
   (bench/api.py's footprint_positions: real DR10 positions jittered by 0.5 deg), numbered
   plate by plate as LAMOST numbers them (:func:`plate_order`); SNRg,
   LASP subclass and the labels drawn from the real LAMOST rows of the shared data (DR10
   A/F/G and DR1 A/F/G/K LASP rows) with scatter, so that values are not repeated
   blocks; ~9% of the spectra are not STAR (GALAXY, QSO, Unknown), as in DR8.
   * **ingest**: the catalogue is written as a CSV and loaded with ``lamost-vac ingest
     spectra --metadata-only``'s code (parsing and validation included), rows/s;
   * **estimates**: --versions model versions (the last one current), one estimate per
     STAR spectrum and version (COPY; flags from ``models.flags.domain_flags``), rows/s;
   * **reference labels** for --labels-fraction of the spectra (bench/ingest.py's
     load_labels), then the **cross-match** (``etl.crossmatch``), seconds;
   * **db maintain** (``lamost-vac db maintain``, a child process) and a VACUUM ANALYZE
     of the estimates (which ``db maintain`` does not analyse), seconds.
2. gunicorn with the shipped configuration (``-c python:service.gunicorn_conf``); every
   shape of :data:`QUERY_SHAPES` (and :data:`DEEP_PAGES`, which follow the cursor) is
   requested up to --repeat times (within --shape-budget-s seconds per shape) after one
   warm-up request, one request at a time: latency p50/p95/p99 and the HTTP statuses (a
   400 refusal is a valid outcome: the service refuses shapes it cannot serve fast).
   The cones are then measured again, warm and interleaved with three references at the
   same centres (bench/api.py's ``interleaved_latency``): the bare positions by raw
   ``q3c_radial_query``, the same on ``v_current_estimates`` (the catalogue's rows, as a
   collaborator selects them) and /scs's own statement, all via psycopg.
3. **Exports**: ``lamost-vac export`` of the current model in CSV, FITS and VOTable
   (each a child process): seconds, rows/s, bytes and the child's peak RSS (its VmHWM in
   /proc, read every 0.1 s while it runs: ``wait4``'s ru_maxrss would report this
   bench's own RSS, which Linux carries over a fork and exec).
4. **Stale-set plan**: the time ``lamost-vac infer --stale`` (and the hourly
   ``reprocess_stale``) takes to count and list the spectra to estimate -- for the current
   model (nothing to do) and after a new model version is registered as current
   (everything to do); the previous current model is then restored.

Prints one JSON document on stdout (progress and a markdown table for the README on
stderr; the table is also in the JSON as ``markdown``). The database is dropped at the
end unless --keep (then named in the JSON; a later --keep run with the same --rows and
--versions reuses it, reporting the load as "reused").

Usage:
    python bench/scale.py [--rows 11000000] [--versions 3] [--keep] [--repeat 20]
Needs PostgreSQL with q3c (LAMOST_VAC_TEST_PG_URL) and gunicorn, as bench/api.py.
"""
import argparse
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.api import (cone_methods, footprint_positions, free_port,  # noqa: E402
                       http_get, interleaved_latency, percentiles, real_positions,
                       start_gunicorn, stop)
from bench.ingest import load_labels  # noqa: E402
from bench.throwaway_db import throwaway_database  # noqa: E402
from etl import db, schema  # noqa: E402
from etl.settings import settings  # noqa: E402
from models.flags import (CATALOGUE_OUT_OF_DOMAIN, MASKED_SELECTED_PIXELS,  # noqa: E402
                          OUT_OF_DISTRIBUTION, domain_flags)
from service.blueprints.estimates import ORDER_COLUMNS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ---------------------------------------------------------------------------------------
# The query shapes: (name, path). In a path, {ra} and {dec} are replaced by a random
# catalogue position for each request, {old_version} by a model version that is not
# current. Add a line to measure another shape.
ESTIMATES = "/api/v1/estimates?limit=100"
CONES_DEG = {"1'": 1 / 60, "10'": 1 / 6, "0.5 deg": 0.5, "1 deg": 1.0}
QUERY_SHAPES = [
    # every ORDER column both ways, over the whole catalogue (the first page)
    *[(f"order={o}", f"{ESTIMATES}&order={o}")
      for column in ORDER_COLUMNS if column != "distance" for o in (column, "-" + column)],
    # selective ranges (few rows match) and unselective ones (most rows match)
    ("feh_max=-2.5 (selective)", f"{ESTIMATES}&feh_max=-2.5"),
    ("teff 6400-6500 by -teff (selective)", f"{ESTIMATES}&teff_min=6400&teff_max=6500"
                                            "&order=-teff"),
    ("logg>=4.5 feh>=0.3 by -snrg", f"{ESTIMATES}&logg_min=4.5&feh_min=0.3&order=-snrg"),
    ("snrg>=70 by feh", f"{ESTIMATES}&snrg_min=70&order=feh"),
    ("teff_err<=60 by -snrg", f"{ESTIMATES}&teff_err_max=60&order=-snrg"),
    ("teff 4000-6500 (unselective)", f"{ESTIMATES}&teff_min=4000&teff_max=6500"),
    ("teff 4000-6500 by -logg (unselective)", f"{ESTIMATES}&teff_min=4000&teff_max=6500"
                                              "&order=-logg"),
    ("giants: logg<=3.5 teff 4000-5200 by teff", f"{ESTIMATES}&logg_max=3.5&teff_min=4000"
                                                 "&teff_max=5200&order=teff"),
    # flags
    ("flags=0", f"{ESTIMATES}&flags=0"),
    ("flags=0 by -teff", f"{ESTIMATES}&flags=0&order=-teff"),
    ("exclude_flags=7 by feh", f"{ESTIMATES}&exclude_flags=7&order=feh"),
    ("flags=512 (rare)", f"{ESTIMATES}&flags=512"),
    # the aggregates the search page plots (Kiel diagram, 1-D histograms) over the whole
    # selection, computed in SQL
    ("histograms, every current estimate", "/api/v1/estimates/histograms?"),
    ("histograms, teff 4000-6000", "/api/v1/estimates/histograms?teff_min=4000&teff_max=6000"),
    ("histograms, giants with flags=0", "/api/v1/estimates/histograms?logg_max=3.5&flags=0"),
    # a model version that is not current
    ("old model", f"{ESTIMATES}&model_version={{old_version}}"),
    ("old model by -teff", f"{ESTIMATES}&model_version={{old_version}}&order=-teff"),
    ("old model feh_max=-2.5", f"{ESTIMATES}&model_version={{old_version}}&feh_max=-2.5"),
    # cones: cone search, and range queries within a cone
    *[(f"/scs {name}", f"/scs?RA={{ra}}&DEC={{dec}}&SR={radius!r}")
      for name, radius in CONES_DEG.items()],
    *[(f"cone {name}", f"{ESTIMATES}&ra={{ra}}&dec={{dec}}&radius={radius!r}")
      for name, radius in CONES_DEG.items()],
    ("cone 1 deg by distance", f"{ESTIMATES}&ra={{ra}}&dec={{dec}}&radius=1.0"
                               "&order=distance"),
    ("cone 1 deg teff>=6000 by -teff", f"{ESTIMATES}&ra={{ra}}&dec={{dec}}&radius=1.0"
                                       "&teff_min=6000&order=-teff"),
]
# Deep pages: (name, first page); each request is the next page, following the cursor.
DEEP_PAGES = [
    ("pages by obsid", f"{ESTIMATES}&order=obsid"),
    ("pages by -teff", f"{ESTIMATES}&order=-teff"),
    ("pages flags=0 by feh", f"{ESTIMATES}&flags=0&order=feh"),
]
EXPORT_FORMATS = ("csv", "fits", "votable")
VERSION = "scale-{}"
NOT_STAR = {"GALAXY": 0.06, "QSO": 0.01, "Unknown": 0.02}   # DR8 LRS: ~91% STAR
CHUNK = 500_000              # rows written or converted at a time
FIRST_OBSID = 100_000_000
PLATE_DEG = 5.0              # LAMOST's field of view
PLATE_FIBRES = 4000


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - started, 2)


# ---------------------------------------------------------------------------------------
# The catalogue
def label_rows(shared):
    """Real LAMOST rows with LASP Teff, log g, [Fe/H] and SNRg: {name: array}."""
    sources = [os.path.join(shared, "data", "labels", "lamost_dr10_lasp_afg_rows.csv"),
               os.path.join(shared, "data", "lamost-real", "dr1-plate-B6212",
                            "dr1_afgk_catalog_rows.csv")]
    rows = []
    for path in sources:
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    columns = {name: np.array([float(row[name]) for row in rows])
               for name in ("teff", "logg", "feh", "snrg")}
    columns["subclass"] = np.array([row["subclass"] for row in rows])
    columns["snrg"][columns["snrg"] <= 0] = np.nan          # -9999: no value
    return columns


def plate_order(ra, dec, rng):
    """A permutation of the positions into an observing order like LAMOST's, in which
    obsids are consecutive within a plate: fields of PLATE_DEG x PLATE_DEG, each cut into
    plates of PLATE_FIBRES fibres (a field is observed again and again), the plates in
    random order. Of the obsid-sorted DR10 rows of the shared data (3,000 rows, a median
    obsid gap of 982), 79% lie within 3 deg of the next one; with obsids drawn at random
    over the sky, as before, estimates (written in obsid order) of neighbouring stars lie
    anywhere in the table."""
    band = np.floor((dec + 90.0) / PLATE_DEG)
    ring = np.floor(ra * np.cos(np.radians((band + 0.5) * PLATE_DEG - 90.0)) / PLATE_DEG)
    field = band * 1000 + ring
    order = np.lexsort((rng.random(len(ra)), field))        # by field, shuffled within
    in_order = field[order]
    starts = np.flatnonzero(np.r_[True, in_order[1:] != in_order[:-1]])
    rank_in_field = np.arange(len(ra)) - np.repeat(starts, np.diff(np.r_[starts, len(ra)]))
    _, plate = np.unique(in_order * 100_000 + rank_in_field // PLATE_FIBRES,
                         return_inverse=True)
    plate_rank = rng.permutation(plate.max() + 1)[plate]
    return order[np.argsort(plate_rank, kind="stable")]


def make_catalogue(n, rng, shared):
    """Spectra (positions, class, subclass, SNRg, z) and each spectrum's true labels."""
    _, ra, dec = footprint_positions(real_positions(shared), n, rng)
    observed = plate_order(ra, dec, rng)
    ra, dec = ra[observed], dec[observed]
    source = label_rows(shared)
    pick = rng.integers(0, len(source["teff"]), n)
    classes = np.full(n, "STAR", dtype=object)
    draw = rng.random(n)
    edge = 0.0
    for name, share in NOT_STAR.items():
        classes[(draw >= edge) & (draw < edge + share)] = name
        edge += share
    return {"obsid": np.arange(FIRST_OBSID, FIRST_OBSID + n), "ra": ra, "dec": dec,
            "class": classes,
            "subclass": np.where(classes == "STAR", source["subclass"][pick], ""),
            "snrg": source["snrg"][pick] * np.exp(rng.normal(0, 0.3, n)),
            "z": rng.normal(0, 1e-4, n),
            "teff": source["teff"][pick] * np.exp(rng.normal(0, 0.02, n)),
            "logg": source["logg"][pick] + rng.normal(0, 0.15, n),
            "feh": source["feh"][pick] + rng.normal(0, 0.1, n)}


def write_catalogue(path, catalogue):
    """The DR8-like catalogue CSV that ``lamost-vac ingest spectra`` reads."""
    with open(path, "w") as handle:
        handle.write("obsid,ra,dec,snrg,class,subclass,z\n")
        for start in range(0, len(catalogue["obsid"]), CHUNK):
            part = slice(start, start + CHUNK)
            handle.writelines(
                f"{o},{r:.7f},{d:.7f},{'' if s != s else f'{s:.2f}'},{c},{sc},{z:.7f}\n"
                for o, r, d, s, c, sc, z in zip(
                    catalogue["obsid"][part].tolist(), catalogue["ra"][part].tolist(),
                    catalogue["dec"][part].tolist(), catalogue["snrg"][part].tolist(),
                    catalogue["class"][part].tolist(), catalogue["subclass"][part].tolist(),
                    catalogue["z"][part].tolist()))


def ingest(url, catalogue, folder):
    from etl.ingest import SpectraIngestOptions, ingest_spectra

    path = os.path.join(folder, "catalogue.csv")
    _, written_s = timed(write_catalogue, path, catalogue)
    engine = db.make_engine(url)
    summary, seconds = timed(ingest_spectra, engine, SpectraIngestOptions(
        catalogue=path, metadata_only=True, batch_rows=100_000, show_progress=False))
    engine.dispose()
    os.remove(path)
    n = len(catalogue["obsid"])
    if summary.loaded != n:
        raise RuntimeError(f"ingest loaded {summary.loaded} of {n} rows: {summary.text()}")
    return {"rows": n, "csv_write_s": written_s, "seconds": seconds,
            "rows_per_s": round(n / seconds)}


def load_estimates(url, catalogue, versions, rng):
    """One estimate per STAR spectrum and model version (COPY); the last version is
    current. Each version's labels are the spectrum's own plus that version's scatter."""
    star = catalogue["class"] == "STAR"
    obsid, snrg = catalogue["obsid"][star], catalogue["snrg"][star]
    catalogue_flags = np.where(catalogue["teff"][star] > 6500, CATALOGUE_OUT_OF_DOMAIN, 0)
    now = dt.datetime.now(dt.timezone.utc)
    columns = ["obsid", "model_version", "teff", "teff_err_model", "teff_err", "logg",
               "logg_err_model", "logg_err", "feh", "feh_err_model", "feh_err", "flags",
               "code_version", "preprocessing_hash", "run_id", "created_at"]
    engine = db.make_engine(url)
    report = []
    for number in range(1, versions + 1):
        version = VERSION.format(number)
        n = len(obsid)
        teff = catalogue["teff"][star] * np.exp(rng.normal(0, 0.01, n))
        logg = catalogue["logg"][star] + rng.normal(0, 0.05, n)
        feh = catalogue["feh"][star] + rng.normal(0, 0.03, n)
        # the calibrated error falls with SNRg and is unknown (NULL) at SNRg <= 5
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(snrg > 5, 1.0 / np.sqrt(np.minimum(snrg, 80) / 10.0), np.nan)
        flags = (domain_flags(teff, feh, snrg) | catalogue_flags
                 | np.where(rng.random(n) < 0.02, MASKED_SELECTED_PIXELS, 0)
                 | np.where(rng.random(n) < 0.01, OUT_OF_DISTRIBUTION, 0))

        # and varies from star to star and label to label (the ensemble spread, the
        # label itself), so that the uncertainties' histograms are not one curve of SNRg
        def spread():
            return scale * np.exp(rng.normal(0, 0.3, n))

        values = {"obsid": obsid, "teff": teff, "teff_err_model": 60 * spread(),
                  "teff_err": 110 * spread(), "logg": logg, "logg_err_model": 0.08 * spread(),
                  "logg_err": 0.15 * spread(), "feh": feh, "feh_err_model": 0.05 * spread(),
                  "feh_err": 0.09 * spread(), "flags": flags}
        provenance = {"model_version": version, "code_version": "bench",
                      "preprocessing_hash": "0" * 16, "run_id": "bench", "created_at": now}
        started = time.perf_counter()
        with engine.begin() as connection:
            connection.execute(schema.models.insert().values(
                version=version, created_at=now, artifact_path="bench",
                artifact_sha256="0" * 64, training_set={"bench": True}, metrics={},
                status="current" if number == versions else "retired"))
            db.copy_rows(connection, "estimates", columns,
                         _rows(columns, values, provenance, n))
        seconds = time.perf_counter() - started
        report.append({"model_version": version, "rows": n, "seconds": round(seconds, 2),
                       "rows_per_s": round(n / seconds)})
        log(f"estimates of {version}: {n} rows in {seconds:.1f} s")
    engine.dispose()
    return report


def _rows(columns, arrays, constants, n):
    """Row tuples in ``columns`` order from per-column ``arrays`` (NaN -> NULL) and
    ``constants``, converted a chunk at a time (10 million rows as Python objects at once
    would take gigabytes)."""
    for start in range(0, n, CHUNK):
        part = {name: [None if v != v else v for v in array[start:start + CHUNK].tolist()]
                for name, array in arrays.items()}
        size = len(part["obsid"])
        yield from zip(*[part[c] if c in part else [constants[c]] * size for c in columns])


def build(url, options, rng):
    """Load everything, timing each step (see the module docstring)."""
    from etl.crossmatch import CrossmatchOptions, crossmatch

    catalogue, generated_s = timed(make_catalogue, options.rows, rng, options.shared)
    report = {"generate_s": generated_s}
    db.upgrade(url)
    with tempfile.TemporaryDirectory() as folder:
        report["ingest"] = ingest(url, catalogue, folder)
    log(f"ingest: {report['ingest']}")
    report["estimates"] = load_estimates(url, catalogue, options.versions, rng)
    n_labels = int(round(options.rows * options.labels_fraction))
    engine = db.make_engine(url)
    _, report["labels_load_s"] = timed(load_labels, engine, catalogue["ra"],
                                       catalogue["dec"], n_labels, rng)
    summary = crossmatch(engine, CrossmatchOptions(radius_arcsec=3.0))
    engine.dispose()
    report["crossmatch"] = {"labels": n_labels, "seconds": round(summary.seconds, 2),
                            "pairs": summary.loaded,
                            "matched_spectra": summary.matched_spectra}
    log(f"crossmatch: {report['crossmatch']}")
    return report


def cli(*arguments):
    """Run ``lamost-vac ARGUMENTS`` in a child process; its wall time [s]."""
    return timed(subprocess.run, [sys.executable, "-m", "etl.cli", *arguments], check=True,
                 cwd=REPO, env=_child_env(), stdout=subprocess.DEVNULL)[1]


def maintain(url):
    """``lamost-vac db maintain`` (a child process), then VACUUM ANALYZE estimates;
    ``cli_startup_s``: ``lamost-vac --help``, the part of each child's time that is
    starting Python and importing the project."""
    startup_s = cli("--help")
    maintain_s = cli("db", "maintain", "--url", url)
    engine = db.make_engine(url)
    started = time.perf_counter()
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql("VACUUM ANALYZE estimates")
    engine.dispose()
    return {"cli_startup_s": startup_s, "db_maintain_s": maintain_s,
            "vacuum_analyze_estimates_s": round(time.perf_counter() - started, 2)}


def _child_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def holds_catalogue(url, rows, versions):
    """Whether the database at ``url`` holds a complete catalogue of this size (a kept
    database from an earlier run)."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            spectra = connection.exec_driver_sql("SELECT count(*) FROM spectra").scalar()
            models = connection.exec_driver_sql("SELECT count(*) FROM models").scalar()
        return spectra == rows and models == versions
    except Exception:  # noqa: BLE001 -- not migrated or half loaded: load again
        return False
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------
# Query shapes over HTTP
def measure_shape(port, shape, repeat, budget_s):
    """Latency and HTTP statuses of the requests of ``shape`` (:class:`Cones` or
    :class:`Pages`): one warm-up request, then up to ``repeat`` within ``budget_s``."""
    timings, statuses, first_status = [], Counter(), None
    for i in range(repeat + 1):
        path = shape.next_path()
        if path is None:
            break
        started = time.perf_counter()
        try:
            status, body = http_get(port, path)
        except OSError:
            status, body = 0, b""
        elapsed = time.perf_counter() - started
        shape.answered(body)
        if i == 0:
            first_status = status
            continue
        timings.append(elapsed)
        statuses[str(status)] += 1
        if sum(timings) > budget_s:
            break
    result = percentiles(timings) if timings else {"n": 0}
    result["statuses"] = dict(statuses)
    # a walk of pages whose first page is refused (or is the last) times nothing: say so
    result["first_status"] = first_status
    return result


class Cones:
    """The requests of a shape of :data:`QUERY_SHAPES`: its path with a new random
    catalogue position each time."""

    def __init__(self, template, positions, old_version):
        self.template, self.positions, self.old_version = template, positions, old_version
        self.count = 0

    def next_path(self):
        ra, dec = self.positions[self.count % len(self.positions)]
        self.count += 1
        return self.template.format(ra=repr(ra), dec=repr(dec), old_version=self.old_version)

    def answered(self, body):
        pass


class Pages:
    """The requests of a shape of :data:`DEEP_PAGES`: each the ``next`` link of the
    previous answer (None after the last page)."""

    def __init__(self, first):
        self.path = first

    def next_path(self):
        return self.path

    def answered(self, body):
        try:
            link = json.loads(body).get("next")
        except ValueError:
            link = None
        parts = urlsplit(link) if link else None
        self.path = f"{parts.path}?{parts.query}" if parts else None


def measure_queries(port, reader_url, ra, dec, old_version, options, rng):
    pick = rng.integers(0, len(ra), options.repeat + 1)
    positions = list(zip(ra[pick].tolist(), dec[pick].tolist()))
    report = {}
    for name, template in QUERY_SHAPES:
        report[name] = measure_shape(port, Cones(template, positions, old_version),
                                     options.repeat, options.shape_budget_s)
        log(f"{name}: {report[name]}")
    for name, first in DEEP_PAGES:
        report[name] = measure_shape(port, Pages(first), options.repeat,
                                     options.shape_budget_s)
        log(f"{name}: {report[name]}")
    # The cones once more, interleaved and warm (bench/api.py's interleaved_latency), beside
    # three references at the same centres: the bare positions by q3c_radial_query (what
    # the issue names), the catalogue rows in the cone as a collaborator selects them from
    # v_current_estimates (all of them, unsorted), and the very statement /scs runs,
    # prepared with a generic plan as the service does -- the price of the same rows in
    # SQL, so the ratio to it is what HTTP, the VOTable and the service add. (The shapes
    # above ran first and cold: comparing them with references measured afterwards, warm,
    # would not be fair to /scs.)
    raw = {}
    with cone_methods(reader_url, port) as methods:
        methods = {name: methods[name] for name in
                   ("raw_sql_q3c", "raw_sql_q3c_catalogue",
                    "raw_sql_scs_query_prepared_generic", "scs_http")}
        for name, radius in CONES_DEG.items():
            measured = interleaved_latency(methods, positions[1:], radius, rounds=3)
            bare, catalogue, statement, scs = (
                measured["raw_sql_q3c"], measured["raw_sql_q3c_catalogue"],
                measured["raw_sql_scs_query_prepared_generic"], measured["scs_http"])
            raw[name] = dict(bare, catalogue=catalogue, scs_statement=statement, scs_warm=scs,
                             scs_p50_over_raw_p50=round(scs["p50_ms"] / bare["p50_ms"], 2),
                             scs_p50_over_catalogue_p50=round(
                                 scs["p50_ms"] / catalogue["p50_ms"], 2),
                             scs_p50_over_scs_statement_p50=round(
                                 scs["p50_ms"] / statement["p50_ms"], 2))
            log(f"cone {name}: {raw[name]}")
    return report, raw


# ---------------------------------------------------------------------------------------
# Exports and the stale-set plan
def peak_rss_while_running(child, interval_s=0.1):
    """The child's peak resident set (KiB): the high-water mark of its own address space
    (VmHWM), polled until it exits. Not ``wait4``'s ru_maxrss: Linux keeps the largest RSS a
    process ever had across exec, so a child forked from this bench (which holds the
    generated catalogue) would report the bench's size."""
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass                        # exited between poll() and open()
        time.sleep(interval_s)
    return peak


def export_all(url, folder):
    report = {}
    engine = db.make_engine(url)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT count(*) FROM estimates e JOIN models m ON m.version = e.model_version "
            "WHERE m.status = 'current'").scalar()
    engine.dispose()
    for fmt in EXPORT_FORMATS:
        out = os.path.join(folder, f"catalogue.{fmt}")
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "etl.cli", "export", "--format", fmt,
                                  "--out", out, "--url", url], cwd=REPO, env=_child_env())
        peak_kib = peak_rss_while_running(child)
        seconds = time.perf_counter() - started
        size = os.path.getsize(out) if os.path.exists(out) else None
        report[fmt] = {"rows": rows, "exit_status": child.returncode,
                       "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                       "bytes": size, "peak_rss_mb": round(peak_kib / 1024, 1)}
        log(f"export {fmt}: {report[fmt]}")
        if os.path.exists(out):
            os.remove(out)
    return report


def plan_stale(engine, version):
    """(spectra, seconds to count them, seconds to list them in batches) of the stale set
    of ``version``, as ``infer --stale`` and ``reprocess_stale`` compute it."""
    from etl.inference import count_selected, iter_batches

    with engine.connect() as connection:
        count, count_s = timed(count_selected, connection, version, "stale")
    listed, list_s = timed(lambda: sum(len(b) for b in iter_batches(engine, version,
                                                                      "stale", 500)))
    assert listed == count, (listed, count)
    return {"spectra": count, "count_s": count_s, "list_batches_s": list_s}


def stale_plans(url, versions):
    """The stale set of the current model, then of a new model registered as current
    (the previous current model is restored afterwards)."""
    current = VERSION.format(versions)
    new = VERSION.format("new")
    engine = db.make_engine(url)
    report = {"current_model": plan_stale(engine, current)}
    models = schema.models
    with engine.begin() as connection:
        connection.execute(models.update().where(models.c.version == current)
                           .values(status="retired"))
        connection.execute(models.insert().values(
            version=new, created_at=dt.datetime.now(dt.timezone.utc), artifact_path="bench",
            artifact_sha256="0" * 64, training_set={"bench": True}, metrics={},
            status="current"))
    try:
        report["after_model_update"] = plan_stale(engine, new)
    finally:
        with engine.begin() as connection:
            connection.execute(models.delete().where(models.c.version == new))
            connection.execute(models.update().where(models.c.version == current)
                               .values(status="current"))
        engine.dispose()
    return report


# ---------------------------------------------------------------------------------------
def markdown(report):
    """The measurements as a markdown table (for the README)."""
    lines = ["| measurement | result |", "|---|---|"]
    load = report["load"]
    if isinstance(load, dict):
        ingest_ = load["ingest"]
        lines.append(f"| ingest {ingest_['rows']:,} catalogue rows | {ingest_['seconds']} s "
                     f"({ingest_['rows_per_s']:,} rows/s) |")
        for entry in load["estimates"]:
            lines.append(f"| COPY estimates of {entry['model_version']} ({entry['rows']:,}) | "
                         f"{entry['seconds']} s ({entry['rows_per_s']:,} rows/s) |")
        match = load["crossmatch"]
        lines.append(f"| cross-match x {match['labels']:,} reference labels | "
                     f"{match['seconds']} s ({match['pairs']:,} pairs) |")
    for key, value in report["maintenance"].items():
        lines.append(f"| {key.removesuffix('_s').replace('_', ' ')} | {value} s |")
    for name, entry in report["queries"].items():
        if entry.get("n"):
            latency = f"p50 {entry['p50_ms']} / p95 {entry['p95_ms']} / p99 {entry['p99_ms']} ms"
        else:
            latency = f"nothing timed (first answer HTTP {entry.get('first_status')})"
        statuses = ", ".join(f"{k} x{v}" for k, v in entry["statuses"].items())
        lines.append(f"| `{name}` | {latency} (HTTP {statuses}) |")
    for name, entry in report["raw_sql_cones"].items():
        warm = entry["scs_warm"]
        lines.append(f"| `/scs {name}`, warm, interleaved with the references below | "
                     f"p50 {warm['p50_ms']} / p95 {warm['p95_ms']} ms "
                     f"({warm['rows_mean']:g} rows) |")
        lines.append(f"| raw q3c_radial_query {name}, bare positions ({entry['rows_mean']:g} "
                     f"rows) | p50 {entry['p50_ms']} ms (/scs p50 / raw p50: "
                     f"{entry['scs_p50_over_raw_p50']}) |")
        lines.append(f"| raw q3c_radial_query {name} on `v_current_estimates` "
                     f"({entry['catalogue']['rows_mean']:g} rows) | p50 "
                     f"{entry['catalogue']['p50_ms']} ms (/scs p50 / its p50: "
                     f"{entry['scs_p50_over_catalogue_p50']}) |")
        lines.append(f"| /scs's own statement in SQL, {name} | "
                     f"p50 {entry['scs_statement']['p50_ms']} ms (/scs p50 / its SQL p50: "
                     f"{entry['scs_p50_over_scs_statement_p50']}) |")
    for fmt, entry in report["exports"].items():
        lines.append(f"| export {fmt} ({entry['rows']:,} rows) | {entry['seconds']} s "
                     f"({entry['rows_per_s']:,} rows/s), peak RSS {entry['peak_rss_mb']} MB |")
    for name, entry in report["stale_plan"].items():
        lines.append(f"| stale set, {name.replace('_', ' ')} ({entry['spectra']:,} spectra) | "
                     f"count {entry['count_s']} s, list in batches {entry['list_batches_s']} s |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=11_000_000, help="spectra")
    parser.add_argument("--versions", type=int, default=3,
                        help="model versions (each with one estimate per STAR spectrum)")
    parser.add_argument("--labels-fraction", type=float, default=0.06,
                        help="reference labels per spectrum (DR8 x APOGEE: ~650,000)")
    parser.add_argument("--repeat", type=int, default=20, help="requests per query shape")
    parser.add_argument("--shape-budget-s", type=float, default=30.0,
                        help="stop repeating a shape after this many seconds of requests")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database lamost_vac_bench_scale (reused by the next "
                        "--keep run with the same --rows and --versions)")
    parser.add_argument("--shared", default=os.environ.get("LAMOST_VAC_SHARED",
                                                           settings.shared_dir))
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    if options.versions < 2:
        parser.error("--versions must be at least 2 (shapes query a model that is not current)")
    rng = np.random.default_rng(options.seed)
    name = "lamost_vac_bench_scale" if options.keep else f"lamost_vac_bench_scale_{os.getpid()}"
    report = {"rows": options.rows, "versions": options.versions,
              "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    reuse = (lambda url: holds_catalogue(url, options.rows, options.versions)) \
        if options.keep else None
    with throwaway_database(name, keep=options.keep, reuse=reuse) as database:
        url = database.url
        report["database"] = database.name if options.keep else None
        if database.reused:
            _, report["upgrade_s"] = timed(db.upgrade, url)
            report["load"] = "reused"
        else:
            report["load"] = build(url, options, rng)
        report["maintenance"] = maintain(url)
        engine = db.make_engine(url)
        with engine.connect() as connection:
            # REPEATABLE: the same centres in every run on the same catalogue
            positions = np.array(connection.exec_driver_sql(
                "SELECT ra, dec FROM spectra TABLESAMPLE BERNOULLI (1) "
                f"REPEATABLE ({int(options.seed)})").all(), dtype=float)
        engine.dispose()
        server = None
        try:
            port = free_port()
            server = start_gunicorn(url, db.reader_url_for(url), port,
                                    ("-c", "python:service.gunicorn_conf"))
            report["queries"], report["raw_sql_cones"] = measure_queries(
                port, db.reader_url_for(url), positions[:, 0], positions[:, 1],
                VERSION.format(1), options, rng)
        finally:
            stop(server)
        with tempfile.TemporaryDirectory() as folder:
            report["exports"] = export_all(url, folder)
        report["stale_plan"] = stale_plans(url, options.versions)
    report["load_average_at_end"] = os.getloadavg()
    report["markdown"] = markdown(report)
    print(json.dumps(report, indent=2))
    log(report["markdown"])


if __name__ == "__main__":
    main()
