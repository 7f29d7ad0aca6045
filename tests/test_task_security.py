"""Forged task messages against a real ``lamost-vac worker`` through the real Redis broker.

Anyone who can write to the broker can queue a task. The worker under test has its own
PostgreSQL database, model directory and ``PGPASSWORD``; the attacker has
* a fake PostgreSQL server (a TCP listener that asks for a clear-text password and records
  every connection and password it gets),
* a second real PostgreSQL database whose ``models`` row names the attacker's artifact,
* artifacts whose unpickling creates a marker file (code execution, harmlessly).
Each forged message must be refused and logged by the worker, nothing may connect to the
fake server, and no marker may appear. A well-formed message with a trusted artifact is
the control: it is accepted, so the refusals are not a worker that refuses everything.
"""
import contextlib
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from etl import db, inference
from etl.registry import register_model
from models.artifact import ARTIFACT_FORMAT, file_sha256, library_versions, save_model, write_sidecar
from models.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("LAMOST_VAC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("LAMOST_VAC_TEST_REDIS_DB", "11"))
WORKER_PASSWORD = "worker-secret-71"
QUEUE = f"security-{os.getpid()}"


class FakePostgres(threading.Thread):
    """Speaks just enough of the PostgreSQL protocol to be sent a password."""

    def __init__(self):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.passwords = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except socket.timeout:
                continue
            self.connections += 1
            with connection, contextlib.suppress(OSError, ValueError, struct.error):
                connection.settimeout(5)
                self.serve(connection)

    def serve(self, connection):
        while True:
            length, code = struct.unpack("!ii", self.read(connection, 8))
            if code in (80877103, 80877104):         # SSLRequest, GSSENCRequest: no
                connection.sendall(b"N")
                continue
            self.read(connection, length - 8)         # rest of the StartupMessage
            break
        connection.sendall(b"R" + struct.pack("!ii", 8, 3))    # AuthenticationCleartextPassword
        kind = self.read(connection, 1)
        length = struct.unpack("!i", self.read(connection, 4))[0]
        body = self.read(connection, length - 4)
        if kind == b"p":
            self.passwords.append(body.rstrip(b"\0").decode(errors="replace"))

    @staticmethod
    def read(connection, n):
        data = b""
        while len(data) < n:
            chunk = connection.recv(n - len(data))
            if not chunk:
                raise ValueError("closed")
            data += chunk
        return data

    def close(self):
        self.stopping.set()
        self.join(timeout=5)
        self.server.close()


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_evil_artifact(path, marker, sidecar=True):
    """An attacker's artifact: a pickle that creates ``marker``, with a sidecar that
    vouches for it (its SHA-256 and today's library versions). Returns its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(CreatesFile(marker)))
    if sidecar:
        write_sidecar(path, {"format": ARTIFACT_FORMAT, "version": path.stem,
                             "preprocess_hash": "0" * 16, "libraries": library_versions()})
    return file_sha256(path)


def _redis():
    import redis

    return redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")


class Setup:
    pass


@pytest.fixture(scope="module")
def worker(make_database, tmp_path_factory):
    try:
        _redis().ping()
    except Exception as error:  # noqa: BLE001
        from conftest import service_unavailable

        service_unavailable(f"Redis not reachable at {REDIS_URL}: {error}")
    s = Setup()
    s.tmp = tmp_path_factory.mktemp("security")
    s.markers = s.tmp / "markers"
    s.markers.mkdir()
    s.model_dir = s.tmp / "models"
    s.attacker_dir = s.tmp / "attacker"
    s.own_url, s.attacker_url = make_database("postgresql"), make_database("postgresql")
    for url in (s.own_url, s.attacker_url):
        db.upgrade(url)
    s.own, s.attacker = db.make_engine(s.own_url), db.make_engine(s.attacker_url)

    # The attacker's database registers an artifact of theirs, hash and all.
    path = s.attacker_dir / "lmn-attacker.joblib"
    register_model(s.attacker, "lmn-attacker", path,
                   write_evil_artifact(path, s.markers / "attacker-db"), {}, {})
    s.attacker_run = inference.start_inference_run(s.attacker, "lmn-attacker", {})

    # The worker's own registry: a trusted model (the control) and rows that must not load.
    trusted = s.model_dir / "lmn-trusted.joblib"
    _, sha = save_model(trusted, {"stand-in": "model"}, PreprocessConfig(),
                        {"n_spectra": 0, "obsid_sha256": "0" * 64}, version="lmn-trusted")
    register_model(s.own, "lmn-trusted", trusted, sha, {}, {})
    outside = s.attacker_dir / "lmn-outside.joblib"
    register_model(s.own, "lmn-outside", outside,
                   write_evil_artifact(outside, s.markers / "outside"), {}, {})
    tampered = s.model_dir / "lmn-tampered.joblib"
    recorded = write_evil_artifact(tampered, s.markers / "never")
    write_evil_artifact(tampered, s.markers / "tampered")     # replaced after registration
    register_model(s.own, "lmn-tampered", tampered, recorded, {}, {})
    bare = s.model_dir / "lmn-bare.joblib"
    register_model(s.own, "lmn-bare", bare,
                   write_evil_artifact(bare, s.markers / "bare", sidecar=False), {}, {})
    s.own_run = inference.start_inference_run(s.own, "lmn-trusted", {})

    s.fake = FakePostgres()
    s.fake.start()
    _redis().flushdb()
    env = dict(os.environ, LAMOST_VAC_DATABASE_URL=s.own_url,
               LAMOST_VAC_BROKER_URL=f"{REDIS_URL}/{REDIS_DB}",
               LAMOST_VAC_MODEL_DIR=str(s.model_dir), PGPASSWORD=WORKER_PASSWORD,
               PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("LAMOST_VAC_RESULT_BACKEND", "LAMOST_VAC_SPECTRA_ROOT"):
        env.pop(name, None)
    s.log_path = s.tmp / "worker.log"
    log = open(s.log_path, "w")
    s.process = subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "worker", "--concurrency", "1", "--queues", QUEUE,
         "--hostname", f"security{os.getpid()}@%h", "--loglevel", "INFO"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=s.tmp, start_new_session=True)
    from celery import Celery

    s.client = Celery("forger", broker=f"{REDIS_URL}/{REDIS_DB}",
                      backend=f"{REDIS_URL}/{REDIS_DB}")
    s.client.conf.update(task_serializer="json", result_serializer="json",
                         accept_content=["json"])
    try:
        yield s
    finally:
        if s.process.poll() is None:
            os.killpg(s.process.pid, 15)
            try:
                s.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(s.process.pid, 9)
                s.process.wait(timeout=10)
        log.close()
        s.fake.close()
        s.own.dispose()
        s.attacker.dispose()
        with contextlib.suppress(Exception):
            _redis().flushdb()


def send(s, args, kwargs=None, timeout=120):
    """Queue an infer_batch message as anyone with broker access could; wait until the
    worker answered it (or, on a worker that obeys it, until the fake server was hit)."""
    s.connections_before = s.fake.connections
    result = s.client.send_task("etl.tasks.infer_batch", args=args, kwargs=kwargs or {},
                                queue=QUEUE, task_id=str(uuid.uuid4()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not result.ready() \
            and s.fake.connections == s.connections_before:
        assert s.process.poll() is None, s.log_path.read_text()[-3000:]
        time.sleep(0.1)
    return result


def assert_refused(s, result, reason):
    assert s.fake.connections == s.connections_before, \
        f"the worker connected to the fake server (passwords sent: {s.fake.passwords})"
    assert result.ready(), "the worker did not answer"
    assert result.state == "FAILURE"
    assert "TaskRefused" in type(result.result).__name__ + repr(result.result)
    assert reason in str(result.result)
    log = s.log_path.read_text()
    assert f"refused task etl.tasks.infer_batch[{result.id}]" in log
    assert [m.name for m in s.markers.iterdir()] == [], "an attacker's artifact was unpickled"


def test_well_formed_message_with_a_trusted_artifact_is_run(worker):
    s = worker
    result = send(s, ["lmn-trusted", [424242], s.own_run])
    assert result.get(timeout=5) == {"selected": 1, "done": 0, "flagged": 0, "failed": 0,
                                     "missing": 1, "reasons": {}}
    assert s.fake.connections == 0


def test_message_naming_a_fake_server_is_refused_and_nothing_connects(worker):
    s = worker
    fake_url = f"postgresql+psycopg://lamost_vac@127.0.0.1:{s.fake.port}/lamost_vac"
    result = send(s, ["lmn-trusted", [1], s.own_run], {"database_url": fake_url})
    assert s.fake.passwords == [] and s.fake.connections == 0
    assert_refused(s, result, "unexpected argument(s) database_url")


def test_message_naming_the_attackers_database_is_refused(worker):
    s = worker
    result = send(s, ["lmn-attacker", [1], s.attacker_run],
                  {"database_url": s.attacker_url, "spectra_root": "/"})
    assert_refused(s, result, "database_url, spectra_root")


def test_message_for_a_run_of_another_database_is_refused(worker):
    s = worker
    result = send(s, ["lmn-attacker", [1], s.attacker_run])
    assert_refused(s, result, "is not an infer run of this worker's database")


def test_registered_artifact_outside_the_model_dir_is_refused(worker):
    s = worker
    result = send(s, ["lmn-outside", [1], s.own_run])
    assert_refused(s, result, "not under the model directory")


def test_tampered_artifact_is_refused_by_the_worker_before_unpickling(worker):
    s = worker
    result = send(s, ["lmn-tampered", [1], s.own_run])
    assert_refused(s, result, "differs from the")


def test_artifact_without_sidecar_is_refused_by_the_worker(worker):
    s = worker
    result = send(s, ["lmn-bare", [1], s.own_run])
    assert_refused(s, result, "no sidecar")


def test_ids_of_the_wrong_type_are_refused(worker):
    s = worker
    result = send(s, ["lmn-trusted", ["1; DROP TABLE"], s.own_run])
    assert_refused(s, result, "obsids must be a list")
    # beyond 64 bits the database driver failed with an OverflowError (found by review)
    for obsids in ([2 ** 70], [0], [-5]):
        result = send(s, ["lmn-trusted", obsids, s.own_run])
        assert_refused(s, result, "positive 64-bit integers")


# ------------------------------------------------------------------------- the broker itself

def test_compose_broker_requires_a_password():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert "ports" not in redis                              # not published on the host
    for name in ("worker", "beat"):
        broker = compose["services"][name]["environment"]["LAMOST_VAC_BROKER_URL"]
        assert broker.startswith("redis://:${LAMOST_VAC_REDIS_PASSWORD") and "@redis:" in broker
    # the API reads the catalogue only: it gets neither the broker nor its password
    api = compose["services"]["api"]["environment"]
    assert not any("REDIS" in key or "BROKER" in key or "REDIS" in str(value)
                   for key, value in api.items())


def test_documented_broker_url_with_password_reaches_an_authenticated_redis(tmp_path):
    """``redis://:password@host`` (README) against a real redis-server with requirepass."""
    import shutil

    from celery import Celery

    from etl import tasks
    from etl.settings import load_settings

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--requirepass", "br0ker-pw", "--save", "", "--appendonly", "no",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        def ping(url):
            """None when the broker answered, else the error."""
            app = tasks.configure(Celery("probe"), load_settings({"LAMOST_VAC_BROKER_URL": url}))
            try:
                with app.connection_for_write() as connection:
                    connection.ensure_connection(max_retries=20, interval_start=0.1,
                                                 interval_step=0.1, interval_max=0.2)
                    connection.default_channel.client.ping()
            except Exception as error:  # noqa: BLE001 -- returned for the assertion
                return error
            return None

        assert ping(f"redis://:br0ker-pw@127.0.0.1:{port}/0") is None
        refused = ping(f"redis://127.0.0.1:{port}/0")
        assert refused is not None and "auth" in str(refused).lower(), refused
    finally:
        server.terminate()
        server.wait(timeout=10)
