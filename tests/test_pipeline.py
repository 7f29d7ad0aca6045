"""Batch pipeline end to end: ingest -> crossmatch -> train -> infer -> export.

Two modes, same test code: ``sqlite-eager`` (no broker: tasks run inside the CLI) and
``postgresql-worker`` (real Redis broker, real ``lamost-vac worker`` processes, the CLI in a
subprocess; the first inference kills a worker with SIGKILL mid-run and starts another).
Data: 40 MILES stars (Teff 3800-6500 K) simulated by lamost_sim.py, 3 spectra at SNRg
10-20 and 1 at 20-80 each (160 spectra); one catalogue row is made a GALAXY and one
spectrum file is truncated after the ingest.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from etl import db, schema
from conftest import miles_ids
from release_validators import assert_valid_fits, assert_valid_votable
from etl.cli import main as cli_main

REDIS_URL = os.environ.get("LAMOST_VAC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("LAMOST_VAC_TEST_REDIS_DB", "11"))
TRAIN_ARGS = ["--ensemble", "2", "--wave-range", "3881,7400", "--jobs", "1",
              "--max-epochs", "50", "--lasso-folds", "3", "--calibration-folds", "3",
              "--degraded-copies", "2"]
BATCH = 8
REPO = Path(__file__).resolve().parent.parent
E = schema.estimates


@pytest.fixture(scope="session")
def sim40(make_simulated_set):
    return make_simulated_set("sim40", miles_ids(make_simulated_set.miles, 40), "3x10-20,1x20-80", seed=1)


def run_cli(*argv):
    """Run ``lamost-vac ARGV`` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class Pipeline:
    """One catalogue database with its data copy, and the way ``infer`` runs in the mode."""

    def __init__(self, mode, url, data, model_dir, tmp):
        self.mode, self.url, self.data, self.model_dir, self.tmp = mode, url, data, model_dir, tmp
        self.engine = db.make_engine(url)
        self.workers = []
        self.beat = None
        self.worker_count = 0

    # -- environment of the subprocesses (worker mode)
    def env(self, **extra):
        env = dict(os.environ)
        env.update(LAMOST_VAC_DATABASE_URL=self.url,
                   LAMOST_VAC_BROKER_URL=f"{REDIS_URL}/{REDIS_DB}",
                   LAMOST_VAC_MODEL_DIR=str(self.model_dir),
                   LAMOST_VAC_VISIBILITY_TIMEOUT_S="3", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        env.pop("LAMOST_VAC_RESULT_BACKEND", None)
        env.pop("LAMOST_VAC_SPECTRA_ROOT", None)
        env.update(extra)
        return env

    def start_worker(self):
        self.worker_count += 1
        log = open(self.tmp / f"worker{self.worker_count}.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "etl.cli", "worker", "--concurrency", "1",
             "--hostname", f"test{os.getpid()}-{self.worker_count}@%h", "--loglevel", "INFO"],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
            start_new_session=True)
        process.log = log
        self.workers.append(process)
        return process

    def ensure_worker(self):
        if self.mode == "postgresql-worker" and not any(w.poll() is None for w in self.workers):
            self.start_worker()

    @staticmethod
    def kill(process, sig=signal.SIGKILL):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)      # the worker and its pool children
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        if getattr(process, "log", None):
            process.log.close()

    def close(self):
        for process in self.workers + ([self.beat] if self.beat else []):
            self.kill(process, signal.SIGTERM if process.poll() is None else signal.SIGKILL)
            self.kill(process)
        self.engine.dispose()

    # -- infer in the mode: in-process (eager) or CLI subprocess against the workers
    def infer(self, *argv, timeout=120):
        argv = ["infer", "--batch-size", BATCH, *argv, "--url", self.url]
        if self.mode == "sqlite-eager":
            return run_cli(*argv)
        self.ensure_worker()
        done = subprocess.run([sys.executable, "-m", "etl.cli", *map(str, argv)],
                              env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.tmp)
        return done.returncode, done.stdout, done.stderr

    def infer_async(self, *argv):
        argv = ["infer", "--batch-size", BATCH, *argv, "--url", self.url]
        return subprocess.Popen([sys.executable, "-m", "etl.cli", *map(str, argv)],
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.tmp)

    @staticmethod
    def finish(infer, timeout=120):
        """(stdout, stderr) of an ``infer_async`` process; killed if it does not end."""
        try:
            return infer.communicate(timeout=timeout)
        finally:
            if infer.poll() is None:
                infer.kill()
                infer.wait(timeout=10)

    def without_workers(self):
        """Stop every worker and empty the task queue in Redis (waiting and unacknowledged
        messages); returns the Redis client of the broker database."""
        import redis

        for worker in self.workers:
            Pipeline.kill(worker, signal.SIGTERM)
        queue = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
        queue.delete("celery", "unacked", "unacked_index")
        return queue

    def scalar(self, query, **params):
        with self.engine.connect() as connection:
            return connection.execute(text(query) if isinstance(query, str) else query,
                                      params).scalar()

    def rows(self, query, **params):
        with self.engine.connect() as connection:
            return connection.execute(text(query) if isinstance(query, str) else query,
                                      params).all()


def wait_for(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def task_states(log_path):
    """task id -> last state ('received' / 'succeeded') of infer_batch in a worker log."""
    import re

    states = {}
    for match in re.finditer(r"Task etl\.tasks\.infer_batch\[([0-9a-f-]+)\] (received|succeeded)",
                             log_path.read_text()):
        states[match.group(1)] = match.group(2)
    return states


def _redis():
    import redis

    return redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")


@pytest.fixture(scope="module", params=["sqlite-eager", "postgresql-worker"])
def pipeline(request, sim40, make_database, tmp_path_factory):
    mode = request.param
    url = make_database(mode.split("-")[0])
    tmp = tmp_path_factory.mktemp(mode)
    data = tmp / "data"
    shutil.copytree(sim40, data)
    from etl import tasks
    from etl.settings import load_settings

    if mode == "sqlite-eager":
        # no broker: eager; this process is the worker, with the worker's configuration
        tasks.configure(tasks.app, load_settings({"LAMOST_VAC_DATABASE_URL": url,
                                                  "LAMOST_VAC_MODEL_DIR": str(tmp / "models")}))
    else:
        try:
            _redis().flushdb()
        except Exception as error:  # noqa: BLE001 -- no Redis: skip, do not fail
            pytest.skip(f"Redis not reachable at {REDIS_URL}: {error}")
    # One row becomes a galaxy: it must be neither trained on nor estimated.
    catalogue = data / "lamost_catalog.csv"
    lines = catalogue.read_text().splitlines()
    header = lines[0].split(",")
    klass = header.index("class")
    row = lines[-1].split(",")
    row[klass] = "GALAXY"
    lines[-1] = ",".join(row)
    catalogue.write_text("\n".join(lines) + "\n")
    galaxy = int(row[0])

    p = Pipeline(mode, url, data, tmp / "models", tmp)
    p.galaxy = galaxy
    try:
        for argv in (["db", "upgrade", "--url", url],
                     ["ingest", "spectra", catalogue, "--spectra-root", data, "--url", url],
                     ["ingest", "labels", data / "apogee_payne.fits", "--url", url],
                     ["crossmatch", "--url", url]):
            code, out, err = run_cli(*argv)
            assert code == 0, (argv, out, err)
        code, out, err = run_cli("train", *TRAIN_ARGS, "--model-dir", p.model_dir,
                                 "--url", url)
        assert code == 0, err
        p.v1 = out.strip().splitlines()[-1]
        # A file damaged after the ingest: a STAR spectrum with SNRg 20-80 (not trained on).
        p.broken, relative = p.rows(
            "SELECT obsid, file_path FROM spectra WHERE snrg > 20 AND obsid <> :g "
            "ORDER BY obsid LIMIT 1 OFFSET 3", g=galaxy)[0]
        path = data / relative
        path.write_bytes(path.read_bytes()[:3000])
        p.n_spectra = p.scalar("SELECT count(*) FROM spectra")
        p.n_star = p.scalar("SELECT count(*) FROM spectra WHERE upper(class) = 'STAR'")
        yield p
    finally:
        p.close()
        if mode == "sqlite-eager":
            tasks.configure(tasks.app)
        else:
            with contextlib.suppress(Exception):
                _redis().flushdb()


def counts(p, version):
    estimated = p.scalar("SELECT count(*) FROM estimates WHERE model_version = :v", v=version)
    failed = p.scalar("SELECT count(*) FROM estimate_failures WHERE model_version = :v",
                      v=version)
    return estimated, failed


def assert_no_duplicates(p):
    duplicates = p.rows("SELECT obsid, model_version, count(*) FROM estimates "
                        "GROUP BY obsid, model_version HAVING count(*) > 1")
    assert duplicates == []


# --------------------------------------------------------------------------------------
def test_infer_writes_every_star_spectrum_once(pipeline):
    p = pipeline
    assert p.n_spectra == 160 and p.n_star == 159
    if p.mode == "postgresql-worker":
        # Real worker, killed with SIGKILL after its first batch is committed.
        first = p.start_worker()
        infer = p.infer_async()
        try:
            wait_for(lambda: p.scalar("SELECT count(*) FROM estimates") > 0, 90,
                     "the first batch")
            Pipeline.kill(first)
            written_at_kill = p.scalar("SELECT count(*) FROM estimates")
            assert written_at_kill < p.n_star - 1, "the kill came after the run: not mid-run"
            p.start_worker()
        finally:
            out, err = Pipeline.finish(infer)
        code = infer.returncode
        # The batch the killed worker held was redelivered and finished by another one.
        first_log = task_states(p.tmp / "worker1.log")
        later = {}
        for n in range(2, p.worker_count + 1):
            later.update(task_states(p.tmp / f"worker{n}.log"))
        interrupted = {t for t, state in first_log.items() if state == "received"}
        assert all(later.get(t) == "succeeded" for t in interrupted), (interrupted, later)
        assert any(state == "succeeded" for state in later.values())
        print("interrupted batches redelivered:", sorted(interrupted))
    else:
        code, out, err = p.infer()
    assert code == 0, (out, err)
    estimated, failed = counts(p, p.v1)
    assert estimated + failed == p.n_star          # nothing lost
    assert failed == 1
    assert_no_duplicates(p)                        # nothing duplicated
    assert p.scalar("SELECT count(*) FROM estimates WHERE obsid = :g", g=p.galaxy) == 0
    # progress on stderr, summary (done, flagged, failed) on stdout
    assert "batches" in err and "spectra/s" in err
    assert f"done {estimated}" in out and "flagged" in out and "failed 1" in out
    assert p.rows("SELECT status, n_loaded, n_quarantined FROM ingest_runs "
                  "WHERE kind = 'infer'") == [("finished", estimated, 1)]


def test_unreadable_spectrum_is_a_failure_and_its_batch_is_written(pipeline):
    p = pipeline
    stage, reason, attempts = p.rows(
        "SELECT stage, reason, attempts FROM estimate_failures WHERE obsid = :o "
        "AND model_version = :v", o=p.broken, v=p.v1)[0]
    assert stage == "read" and reason and attempts >= 1
    stars = [r[0] for r in p.rows("SELECT obsid FROM spectra WHERE upper(class) = 'STAR' "
                                  "ORDER BY obsid")]
    k = stars.index(p.broken)
    batch = stars[k - k % BATCH:k - k % BATCH + BATCH]
    written = {r[0] for r in p.rows("SELECT obsid FROM estimates WHERE model_version = :v",
                                    v=p.v1)}
    assert set(batch) - {p.broken} <= written and p.broken not in written


def test_every_estimate_has_provenance(pipeline):
    p = pipeline
    from models.artifact import load_model

    artifact_path = p.scalar("SELECT artifact_path FROM models WHERE version = :v", v=p.v1)
    preprocess_hash = load_model(artifact_path)["preprocess_hash"]
    run_id = p.scalar("SELECT run_id FROM ingest_runs WHERE kind = 'infer'")
    rows = p.rows("SELECT model_version, code_version, preprocessing_hash, run_id, created_at "
                  "FROM estimates")
    assert rows and all(all(value is not None for value in row) for row in rows)
    assert {r[0] for r in rows} == {p.v1}
    assert {r[2] for r in rows} == {preprocess_hash}
    assert {r[3] for r in rows} == {run_id}
    # every estimate has its model uncertainty; the calibrated one exactly where the
    # model's calibration had >= 30 cross-fitted spectra in the SNRg bin (NULL elsewhere)
    assert p.scalar("SELECT count(*) FROM estimates WHERE teff_err_model IS NULL") == 0
    from models.calibration import snr_bin_index
    model = load_model(artifact_path)["model"]
    for snrg, teff_err in p.rows("SELECT s.snrg, e.teff_err FROM estimates e JOIN spectra s USING (obsid)"):
        which = snr_bin_index([snrg], model.snr_bins_)[0]
        assert (teff_err is not None) == bool(which >= 0 and model.calibration_counts_[which] >= 30)


def test_export_release_files(pipeline):
    p = pipeline
    from astropy.io import fits
    from astropy.io.votable import parse_single_table
    from astropy.table import Table

    code, out, err = p.infer("--stale")      # a no-op after the tests above; lets this run alone
    assert code == 0, err
    estimated, _ = counts(p, p.v1)
    assert estimated > 100
    files = {fmt: p.tmp / f"vac.{ext}" for fmt, ext in
             (("csv", "csv"), ("fits", "fits"), ("votable", "xml"))}
    for fmt, path in files.items():
        code, out, err = run_cli("export", "--format", fmt, "--out", path, "--url", p.url)
        assert code == 0, err
    assert_valid_votable(files["votable"])
    assert_valid_fits(files["fits"])
    expected = ["obsid", "ra", "dec", "snrg", "teff", "teff_err", "teff_err_model", "logg",
                "logg_err", "logg_err_model", "feh", "feh_err", "feh_err_model", "flags",
                "model_version"]
    csv_table = Table.read(files["csv"], format="ascii.csv")
    assert csv_table.colnames == expected and len(csv_table) == estimated
    assert set(csv_table["model_version"]) == {p.v1}
    with fits.open(files["fits"]) as hdus:
        header = hdus[1].header
        assert hdus[1].data.shape[0] == estimated
        assert header["MODELVER"] == p.v1
        index = expected.index("teff") + 1
        assert header[f"TUNIT{index}"] == "K"
        assert header[f"TUCD{index}"] == "phys.temperature.effective"
        assert "temperature" in header[f"TCOMM{index}"]
    # The FITS table is streamed chunk by chunk: the same rows and values as the CSV, also
    # when the chunks are small and do not divide the row count.
    from etl.export import export_catalogue

    export_catalogue(p.engine, p.tmp / "chunked.fits", "fits", chunk_rows=7)
    assert_valid_fits(p.tmp / "chunked.fits")
    with fits.open(p.tmp / "chunked.fits") as hdus:
        hdus.verify("exception")
        data = hdus[1].data
        assert list(data["obsid"]) == list(csv_table["obsid"])
        for name in ("ra", "teff", "logg_err", "feh_err_model"):
            np.testing.assert_allclose(data[name], np.ma.filled(csv_table[name], np.nan),
                                       rtol=1e-12, equal_nan=True)
        assert set(data["model_version"]) == {p.v1}
        assert list(data["flags"]) == list(csv_table["flags"])
    vot = parse_single_table(str(files["votable"]))
    teff = vot.get_field_by_id_or_name("teff")
    assert teff.ucd == "phys.temperature.effective" and str(teff.unit) == "K"
    assert "temperature" in teff.description
    assert len(vot.array) == estimated


def test_new_model_reprocesses_exactly_the_stale_spectra(pipeline):
    p = pipeline
    code, out, err = p.infer("--stale")      # a no-op after the tests above; lets this run alone
    assert code == 0, err
    before_v1 = counts(p, p.v1)
    assert before_v1[0] > 100
    # any new model makes every spectrum stale: a quick one (the later options win)
    code, out, err = run_cli("train", *TRAIN_ARGS, "--max-epochs", "10", "--calibration-folds", "2",
                             "--seed", "1", "--model-dir", p.model_dir, "--url", p.url)
    assert code == 0, err
    v2 = out.strip().splitlines()[-1]
    assert v2 != p.v1
    # v2 waits as pending: the catalogue keeps serving v1 whole until v2 has estimated
    # every spectrum (a partial run does not switch it)
    assert dict(p.rows("SELECT version, status FROM models")) == {p.v1: "current", v2: "pending"}
    code, out, err = p.infer("--stale", "--limit", "7")
    assert code == 0, (out, err)
    assert f"infer {v2}" in out and "7 spectra" in out and f"model {v2} is pending: " in err
    assert dict(p.rows("SELECT version, status FROM models")) == {p.v1: "current", v2: "pending"}
    assert p.scalar("SELECT count(*) FROM v_current_estimates") == before_v1[0]
    if p.mode == "sqlite-eager":            # the beat's tick estimates the rest and promotes
        from etl import tasks

        result = tasks.reprocess_stale.apply().get()
        assert (result["model_version"], result["spectra"], result["promoted"]) == (
            v2, p.n_star - 7, v2)
    else:                                   # a waiting infer estimates the rest and promotes
        code, out, err = p.infer("--stale")
        assert code == 0, (out, err)
        assert f"{p.n_star - 7} spectra" in out
        assert f"model {v2} now estimates every spectrum of the catalogue and is current" in err
    assert dict(p.rows("SELECT version, status FROM models")) == {p.v1: "retired", v2: "current"}
    assert sum(counts(p, v2)) == p.n_star
    assert counts(p, p.v1) == before_v1                      # old version stays queryable
    assert p.scalar("SELECT count(*) FROM v_estimates WHERE model_version = :v",
                    v=p.v1) == before_v1[0]
    assert_no_duplicates(p)

    # Five estimates of the current model go missing: the scheduled reprocessing (beat
    # entry reprocess_stale) re-runs exactly those five, and nothing else.
    victims = [r[0] for r in p.rows("SELECT obsid FROM estimates WHERE model_version = :v "
                                    "ORDER BY obsid LIMIT 5 OFFSET 20", v=v2)]
    kept_runs = dict(p.rows("SELECT obsid, run_id FROM estimates WHERE model_version = :v",
                            v=v2))
    with p.engine.begin() as connection:
        connection.execute(E.delete().where(E.c.model_version == v2, E.c.obsid.in_(victims)))
    if p.mode == "sqlite-eager":
        from etl import tasks

        result = tasks.reprocess_stale.apply().get()
        assert result["spectra"] == 5 and result["model_version"] == v2
    else:
        log = open(p.tmp / "beat.log", "w")
        p.beat = subprocess.Popen(
            [sys.executable, "-m", "etl.cli", "beat", "--schedule-file",
             str(p.tmp / "beat-schedule")],
            env=p.env(LAMOST_VAC_REPROCESS_INTERVAL_S="1"), stdout=log,
            stderr=subprocess.STDOUT, cwd=p.tmp, start_new_session=True)
        p.beat.log = log
        p.ensure_worker()
        wait_for(lambda: counts(p, v2)[0] == len(kept_runs), 90,
                 "the beat to re-estimate the five spectra", interval=0.2)
        Pipeline.kill(p.beat, signal.SIGTERM)
    after = dict(p.rows("SELECT obsid, run_id FROM estimates WHERE model_version = :v", v=v2))
    assert set(after) == set(kept_runs)
    changed = {o for o in after if after[o] != kept_runs[o]}
    assert changed == set(victims)
    assert_no_duplicates(p)
    code, out, err = p.infer("--stale")
    assert code == 0 and "0 spectra" in out


def test_the_summary_counts_the_spectra_dispatched_not_those_counted_before(pipeline,
                                                                          monkeypatch):
    """Another run estimating spectra between infer's count and its dispatch left the
    summary and the run's record claiming spectra that were never sent (found by review)."""
    if pipeline.mode != "sqlite-eager":
        pytest.skip("the count is replaced in this process")
    from etl import inference

    p = pipeline
    version = p.scalar("SELECT version FROM models WHERE status = 'current'")
    victims = [r[0] for r in p.rows("SELECT obsid FROM estimates WHERE model_version = :v "
                                    "ORDER BY obsid LIMIT 2", v=version)]
    with p.engine.begin() as connection:
        connection.execute(E.delete().where(E.c.model_version == version, E.c.obsid.in_(victims)))
    counted = inference.count_selected
    monkeypatch.setattr(inference, "count_selected", lambda *a, **k: counted(*a, **k) + 3)
    code, out, err = p.infer("--stale", "--json")
    assert code == 0, (out, err)
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["selected"], summary["done"] + summary["failed"]) == (2, 2)
    assert p.rows("SELECT n_read FROM ingest_runs WHERE kind = 'infer' AND run_id = :r",
                  r=summary["run_id"]) == [(2,)]


def test_batches_waiting_for_a_worker_are_not_sent_twice(pipeline):
    """No worker for longer than the stall time: the batches are still in Redis, so they
    are slow, not lost, and ``infer`` waits for them instead of sending them again."""
    p = pipeline
    if p.mode != "postgresql-worker":
        pytest.skip("needs the Redis broker")
    queue = p.without_workers()
    infer = p.infer_async("--all", "--limit", str(BATCH), "--timeout", "22")
    out, err = Pipeline.finish(infer)
    assert infer.returncode == 1 and "TIMED OUT" in out       # stall time 16 s passed
    assert "again" not in err and queue.llen("celery") == 1    # still queued, sent once
    p.start_worker()
    wait_for(lambda: queue.llen("celery") == 0, 60, "a worker to take the batch")


def test_a_batch_lost_in_the_broker_is_sent_again(pipeline):
    """A message lost between Redis and a worker (kombu takes a message off the queue
    before recording it as unacknowledged: a worker killed in between loses it) never
    comes back by itself; ``infer`` sends the unfinished batches again when no batch has
    finished for twice the visibility timeout (plus 10 s) and Redis holds none of the
    queue's messages."""
    p = pipeline
    if p.mode != "postgresql-worker":
        pytest.skip("needs the Redis broker")
    queue = p.without_workers()              # no worker: the messages wait in Redis
    infer = p.infer_async("--all", "--limit", str(2 * BATCH), "--json")
    try:
        wait_for(lambda: queue.llen("celery") == 2, 60, "two queued batches")
        queue.delete("celery")               # both messages are lost
        p.start_worker()
    finally:
        out, err = Pipeline.finish(infer)
    assert infer.returncode == 0, (out, err)
    assert "sending the 2 unfinished batches again" in err
    summary = json.loads(out.splitlines()[-1])
    assert summary["done"] + summary["failed"] == summary["selected"] == 2 * BATCH
    assert p.scalar("SELECT count(*) FROM estimates WHERE run_id = :r",
                    r=summary["run_id"]) == summary["done"]
    assert_no_duplicates(p)
