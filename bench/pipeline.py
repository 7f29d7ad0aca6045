"""End-to-end inference throughput: FITS files on disk -> estimate rows in PostgreSQL.

Compares, in one run on the same data, database and model:

* ``naive``: a plain loop -- ``astropy.io.fits`` reads each file, the spectrum is
  preprocessed and predicted alone, and its row is written with one INSERT (and commit);
* ``workers_N``: ``lamost-vac infer`` with N Celery worker processes (``lamost-vac worker
  -c N``, Redis broker), batches of ``--batch-size`` spectra. Timed from dispatch until the
  last batch's rows are committed (workers already started and their model loaded).

Setup (not timed): a throw-away PostgreSQL database, db upgrade, ingest spectra + labels,
crossmatch, and ``train`` (or ``--artifact`` registers an existing model file).

    python bench/pipeline.py --sim /tmp/sim-ref            # 4,848 spectra from lamost_sim.py
    python bench/pipeline.py --sim DIR --workers 1,2 --naive-limit 400

Prints one JSON document on stdout (progress on stderr).
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.throwaway_db import throwaway_database  # noqa: E402


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def cli(*argv):
    from etl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:          # argparse errors
            code = exit_.code
    if code:
        raise SystemExit(f"lamost-vac {' '.join(map(str, argv))} failed:\n{err.getvalue()}")
    return out.getvalue(), err.getvalue()


def astropy_read(path):
    """A LAMOST DR8 spectrum with astropy.io.fits only (primary image or v2.0 table)."""
    import numpy as np
    from astropy.io import fits

    from models.readers import Spectrum

    with fits.open(path) as hdus:
        if hdus[0].data is not None and hdus[0].data.ndim == 2:
            rows = np.asarray(hdus[0].data, dtype=float)
            flux, ivar, wavelength, andmask, ormask = rows[:5]
            layout = "dr8-image"
        else:
            row = hdus[1].data[0]
            flux, ivar, wavelength = row["FLUX"], row["IVAR"], row["WAVELENGTH"]
            andmask, ormask = row["ANDMASK"], row["ORMASK"]
            layout = "dr8-v2-table"
    return Spectrum(path, np.asarray(wavelength, dtype=np.float64),
                    np.asarray(flux, dtype=np.float32), np.asarray(ivar, dtype=np.float32),
                    np.asarray(andmask, dtype=np.int32), np.asarray(ormask, dtype=np.int32),
                    {}, layout)


def naive_loop(engine, artifact, version, rows, root):
    """astropy.io.fits read + per-spectrum preprocess/predict + one INSERT per row."""
    import numpy as np
    from sqlalchemy import text

    from models.preprocess import preprocess_spectra

    model, config = artifact["model"], artifact["preprocess"]
    insert = text("INSERT INTO estimates (obsid, model_version, teff, teff_err_model, teff_err, "
                  "logg, logg_err_model, logg_err, feh, feh_err_model, feh_err, flags, "
                  "code_version, preprocessing_hash, run_id, created_at) VALUES (:obsid, :v, "
                  ":teff, :teff_e, :teff_i, :logg, :logg_e, :logg_i, :feh, :feh_e, :feh_i, "
                  ":flags, 'naive', :h, :run, now())")
    run = str(uuid.uuid4())
    started = time.perf_counter()
    written = 0
    for obsid, relative, z, snrg in rows:
        try:
            spectrum = astropy_read(os.path.join(root, relative))
        except Exception:  # noqa: BLE001 -- naive: skip what cannot be read
            continue
        features, _ = preprocess_spectra([spectrum], np.array([z or 0.0]), config)
        p = model.predict(features, np.array([snrg if snrg is not None else np.nan]))
        if not np.isfinite(p["teff"][0]):
            continue

        def f(key):
            value = float(p[key][0])
            return None if not np.isfinite(value) else value

        with engine.begin() as connection:
            connection.execute(insert, {
                "obsid": obsid, "v": version, "teff": f("teff"), "teff_e": f("teff_err_model"),
                "teff_i": f("teff_err"), "logg": f("logg"), "logg_e": f("logg_err_model"),
                "logg_i": f("logg_err"), "feh": f("feh"), "feh_e": f("feh_err_model"),
                "feh_i": f("feh_err"), "flags": int(p["flags"][0]),
                "h": artifact["preprocess_hash"], "run": run})
        written += 1
    seconds = time.perf_counter() - started
    return {"spectra": len(rows), "rows_written": written, "seconds": round(seconds, 2),
            "spectra_per_s": round(len(rows) / seconds, 1)}


def start_workers(n, env, tmp):
    log_file = open(tmp / f"worker-{n}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "worker", "--concurrency", str(n),
         "--hostname", f"bench{os.getpid()}-{n}@%h", "--loglevel", "WARNING"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    process.log_file = log_file
    return process


def stop(process):
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    process.log_file.close()


def measure(args, sim, tmp, name, url):
    """The naive loop and the Celery workers on database ``name`` at ``url``: a dict."""
    env = dict(os.environ, LAMOST_VAC_DATABASE_URL=url, LAMOST_VAC_BROKER_URL=args.redis,
               LAMOST_VAC_MODEL_DIR=str(tmp / "models"), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("LAMOST_VAC_RESULT_BACKEND", None)
    os.environ.update({k: env[k] for k in ("LAMOST_VAC_BROKER_URL",)})
    import redis

    redis.Redis.from_url(args.redis).flushdb()
    from etl import db, tasks
    from etl.settings import load_settings

    tasks.configure(tasks.app, load_settings(env))
    result = {"sim": str(sim), "database": name, "batch_size": args.batch_size,
              "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    engine = db.make_engine(url)
    try:
        t = time.perf_counter()
        cli("db", "upgrade", "--url", url)
        cli("ingest", "spectra", sim / "lamost_catalog.csv", "--spectra-root", sim, "--url", url)
        cli("ingest", "labels", sim / "apogee_payne.fits", "--url", url)
        cli("crossmatch", "--url", url)
        log(f"setup (ingest, crossmatch) {time.perf_counter() - t:.1f} s")
        if args.artifact:
            from etl.registry import register_model
            from models.artifact import file_sha256, load_model, sidecar_path

            # workers load artifacts only from their LAMOST_VAC_MODEL_DIR: register a copy
            path = tmp / "models" / os.path.basename(args.artifact)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(args.artifact, path)
            shutil.copy2(sidecar_path(args.artifact), sidecar_path(path))
            artifact = load_model(path)
            version = artifact["version"]
            register_model(engine, version, path, file_sha256(path), artifact["training"],
                           artifact["metrics"])
        else:
            t = time.perf_counter()
            out, _ = cli("train", "--ensemble", args.ensemble, "--max-epochs", args.max_epochs,
                         "--wave-range", "3881,7400", "--model-dir", tmp / "models",
                         "--url", url)
            version = out.strip().splitlines()[-1]
            log(f"trained {version} in {time.perf_counter() - t:.1f} s")
        from etl.inference import model_row
        from models.artifact import load_model

        with engine.connect() as connection:
            model = model_row(connection, version)
            n_star = connection.exec_driver_sql(
                "SELECT count(*) FROM spectra WHERE class IS NULL OR upper(class) = 'STAR'"
            ).scalar()
            rows = connection.exec_driver_sql(
                "SELECT obsid, file_path, z, snrg FROM spectra ORDER BY obsid LIMIT %(n)s",
                {"n": args.naive_limit}).all()
        artifact = load_model(model["artifact_path"])
        result.update(model_version=version, spectra=n_star,
                      ensemble=len(artifact["model"].estimators_["teff"].members_))

        # -- naive loop
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            log(f"naive loop over {len(rows)} spectra ...")
            result["naive"] = naive_loop(engine, artifact, version, rows, str(sim))
        log(f"naive: {result['naive']}")

        # -- Celery workers (and, with --compare-cell-triggers, again without the
        # triggers of migration 0006 that keep estimate_cells counted)
        runs = [(int(v), triggers) for v in args.workers.split(",")
                for triggers in ((True, False) if args.compare_cell_triggers else (True,))]
        for n, triggers in runs:
            name = f"workers_{n}" + ("" if triggers else "_without_cell_triggers")
            with engine.begin() as connection:
                connection.exec_driver_sql("DELETE FROM estimates")
                connection.exec_driver_sql("DELETE FROM estimate_failures")
                connection.exec_driver_sql(
                    f"ALTER TABLE estimates {'ENABLE' if triggers else 'DISABLE'} TRIGGER USER")
            workers = start_workers(n, env, tmp)
            try:
                # warm-up: workers up, model loaded in every pool process
                cli("infer", "--all", "--limit", str(4 * n), "--batch-size", "1",
                    "--timeout", "300", "--url", url)
                with engine.begin() as connection:
                    connection.exec_driver_sql("DELETE FROM estimates")
                    connection.exec_driver_sql("DELETE FROM estimate_failures")
                t = time.perf_counter()
                out, err = cli("infer", "--stale", "--batch-size", args.batch_size, "--json",
                               "--timeout", "900", "--url", url)
                seconds = time.perf_counter() - t
            finally:
                stop(workers)
            summary = json.loads(out.strip().splitlines()[-1])
            with engine.connect() as connection:
                stored = connection.exec_driver_sql(
                    "SELECT count(*) FROM estimates").scalar()
            result[name] = {
                "spectra": summary["selected"], "done": summary["done"],
                "failed": summary["failed"], "rows_in_db": stored, "seconds": round(seconds, 2),
                "spectra_per_s": round(summary["selected"] / seconds, 1)}
            log(f"{name}: {result[name]}")
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE estimates ENABLE TRIGGER USER")
        counts = [int(v) for v in args.workers.split(",")]
        base = result["naive"]["spectra_per_s"]
        result["speedup_vs_naive"] = {f"workers_{n}": round(
            result[f"workers_{n}"]["spectra_per_s"] / base, 1) for n in counts}
        if 1 in counts and 2 in counts:
            result["scaling_2_vs_1"] = round(result["workers_2"]["spectra_per_s"]
                                             / result["workers_1"]["spectra_per_s"], 2)
        result["load_average_at_end"] = os.getloadavg()
    finally:
        engine.dispose()
        with contextlib.suppress(Exception):
            redis.Redis.from_url(args.redis).flushdb()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim", default="/tmp/sim-ref",
                        help="lamost_sim.py output (lamost_catalog.csv, apogee_payne.fits, spectra/)")
    parser.add_argument("--pg", default=os.environ.get(
        "LAMOST_VAC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of the PostgreSQL server (a bench database is created and dropped)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12",
                        help="broker (its database is flushed)")
    parser.add_argument("--workers", default="1,2", help="worker process counts to time")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--naive-limit", type=int, default=500,
                        help="spectra for the naive loop (it is slow; rate is per spectrum)")
    parser.add_argument("--artifact", default=None, help="use this model file instead of training")
    parser.add_argument("--ensemble", type=int, default=10)
    parser.add_argument("--max-epochs", type=int, default=30,
                        help="training epochs (inference cost does not depend on it)")
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument("--compare-cell-triggers", action="store_true",
                        help="time each worker count also with estimate_cells' triggers "
                             "disabled (their cost on inference)")
    args = parser.parse_args(argv)

    sim = Path(args.sim)
    if not (sim / "lamost_catalog.csv").is_file():
        raise SystemExit(f"{sim}: no lamost_catalog.csv (generate with lamost_sim.py)")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lamost-vac-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with throwaway_database(f"lamost_vac_bench_{os.getpid()}", keep=args.keep,
                                admin_url=args.pg) as database:
            result = measure(args, sim, tmp, database.name, database.url)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
