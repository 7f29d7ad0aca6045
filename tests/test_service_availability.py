"""Availability of the API under gunicorn (issue 11): a real gunicorn with the shipped
configuration (service/gunicorn_conf.py) on a real PostgreSQL catalogue.

* Large queries are limited per client and on the whole service (429 + Retry-After, in
  the endpoint's error format), while small queries, /health and /availability are still
  answered; the slots are held until the answer has been sent and are freed then.
* /health and /availability answer within their own short timeout when the catalogue's
  tables are locked, whatever the statement timeout of queries.
* Over-long request lines and headers get the service's error format (414 / 431), not
  gunicorn's HTML, up to gunicorn's own maxima.
* The slots hold across processes, and a killed process's slots are freed.

A large query is kept in flight without any timing: its client does not read the answer
(20,000 rows of a dense cluster, ~20 MB, far more than the socket buffers hold), so the
worker cannot finish sending it; that it is still in flight is checked by the 429 its
client keeps getting.
"""
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
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from etl import db
from conftest import CURRENT, load_catalogue, make_catalogue

REPO = Path(__file__).resolve().parent.parent
VOTABLE_NS = {"v": "http://www.ivoa.net/xml/VOTable/v1.3"}
CLUSTER = (210.0, -20.0)           # the dense cluster: CLUSTER_ROWS within 0.5 deg
CLUSTER_ROWS = 25000
# The largest cone answer the service gives, over the cluster: 20,000 rows, ~20 MB.
LARGE_CONE = "/scs?" + urlencode({"RA": CLUSTER[0], "DEC": CLUSTER[1], "SR": 1,
                                  "MAXREC": 20000, "VERB": 3})
LARGE_RANGE = "/api/v1/estimates?" + urlencode({"order": "-feh", "limit": 10})
SMALL_CONE = "/scs?" + urlencode({"RA": 150, "DEC": 30, "SR": 0.05})
SMALL_RANGE = "/api/v1/estimates?" + urlencode({"ra": 150, "dec": 30, "radius": 0.05})


# ---------------------------------------------------------------------------------------
# A gunicorn with the shipped configuration
@pytest.fixture(scope="module")
def catalogue(make_database):
    """The test catalogue of test_service.py plus a dense cluster of CLUSTER_ROWS."""
    url = make_database("postgresql")
    db.upgrade(url)
    load_catalogue(url, make_catalogue())
    rng = np.random.default_rng(11)
    dec = CLUSTER[1] + rng.uniform(-0.35, 0.35, CLUSTER_ROWS)
    ra = CLUSTER[0] + rng.uniform(-0.35, 0.35, CLUSTER_ROWS)
    obsids = range(900_000_001, 900_000_001 + CLUSTER_ROWS)
    engine = db.make_engine(url)
    with engine.begin() as connection:
        db.copy_rows(connection, "spectra", ["obsid", "ra", "dec", "zone", "snrg", "class"],
                     ((o, r, d, db.zone_of(d), 30.0, "STAR")
                      for o, r, d in zip(obsids, ra.tolist(), dec.tolist())))
        db.copy_rows(connection, "estimates", [
            "obsid", "model_version", "teff", "teff_err", "logg", "logg_err", "feh",
            "feh_err", "flags", "code_version", "preprocessing_hash", "run_id",
            "created_at"], ((o, CURRENT, 5000.0 + o % 1000, 90.0, 4.0, 0.1, -0.2, 0.07, 0,
                             "0.1.0", "p" * 64, "run-cluster", "2026-11-01T00:00:00Z")
                            for o in obsids))
        db.analyze(connection, ["spectra", "estimates"])
    engine.dispose()
    return url


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(url, **environ):
    port = free_port()
    env = dict(os.environ, LAMOST_VAC_DATABASE_URL=url,
               LAMOST_VAC_READER_DATABASE_URL=db.reader_url_for(url),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               **environ)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf",
         "-b", f"127.0.0.1:{port}", "service.app:create_app()"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("gunicorn exited:\n" + process.stdout.read().decode())
        try:
            if get(port, "/health")[0] == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    stop(process)
    raise RuntimeError("gunicorn did not answer /health")


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(catalogue):
    """gunicorn with 2 large queries on the service and 1 per client."""
    process, port = start_gunicorn(catalogue, LAMOST_VAC_LARGE_QUERIES_MAX="2",
                                   LAMOST_VAC_LARGE_QUERIES_PER_CLIENT="1")
    yield port
    stop(process)


def get(port, path, source="127.0.0.1", headers=None, timeout=60):
    """(status, headers, body) of one GET from the address ``source``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0))
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in (headers or []):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def loopback(last_octet):
    """127.0.0.<n>, a client address of its own (Linux routes all of 127/8 to lo)."""
    address = f"127.0.0.{last_octet}"
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
    except OSError:
        pytest.skip(f"cannot bind {address}")
    return address


class HeldRequest:
    """A GET whose answer is not read: the worker stays blocked sending it."""

    def __init__(self, port, path, source="127.0.0.1"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n"
                          "Connection: close\r\n\r\n".encode())
        self.received = self.sock.recv(1024)

    @property
    def status(self):
        return int(self.received.split(b" ", 2)[1])

    def read_all(self):
        self.sock.settimeout(120)
        chunks = [self.received]
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        self.sock.close()
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        return head, body


def error_message(status, headers, body):
    """The message of an error answer in the service's format (JSON or VOTable)."""
    if headers["Content-Type"].startswith("application/json"):
        document = json.loads(body)
        assert document["status"] == status
        return document["error"]
    assert headers["Content-Type"].startswith("application/x-votable+xml")
    root = ET.fromstring(body)
    info = root.find("v:RESOURCE/v:INFO[@name='QUERY_STATUS']", VOTABLE_NS)
    assert info.get("value") == "ERROR"
    return info.text


# ---------------------------------------------------------------------------------------
def test_large_queries_are_limited_while_small_ones_and_health_are_answered(server):
    port = server
    other, third = loopback(2), loopback(3)
    first = HeldRequest(port, LARGE_CONE)
    second = None
    assert first.status == 200
    try:
        # the same client again: its limit is 1 large query at a time
        status, headers, body = get(port, LARGE_RANGE)
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "at most 1 at a time per client" in error_message(status, headers, body)
        status, headers, body = get(port, LARGE_CONE)      # /scs: a VOTable error
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "per client" in error_message(status, headers, body)
        # another client takes the service's second slot; a third finds none
        second = HeldRequest(port, LARGE_CONE, source=other)
        assert second.status == 200
        status, headers, body = get(port, LARGE_RANGE, source=third)
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "maximum of 2 large queries" in error_message(status, headers, body)

        # small queries, /health and /availability are answered meanwhile
        status, _, body = get(port, SMALL_CONE)
        assert status == 200 and b'value="OK"' in body
        status, _, body = get(port, SMALL_RANGE)
        assert status == 200 and json.loads(body)["rows"]
        status, _, body = get(port, "/health")
        assert status == 200 and json.loads(body)["database"]["current_model"] == CURRENT
        status, _, body = get(port, "/availability")
        assert status == 200 and b"<vosi:available>true</vosi:available>" in body
        # ... while both large queries were still in flight: they still hold their slots
        assert get(port, LARGE_RANGE)[0] == 429
        assert get(port, LARGE_RANGE, source=third)[0] == 429
    finally:
        answers = [held.read_all() for held in (first, second) if held is not None]
    for head, body in answers:
        assert head.startswith(b"HTTP/1.1 200")
        resource = ET.fromstring(body).find("v:RESOURCE", VOTABLE_NS)
        rows = resource.find("v:TABLE/v:DATA/v:TABLEDATA", VOTABLE_NS)
        assert len(rows) == 20000                   # the answers arrive whole
        assert resource.findall("v:INFO", VOTABLE_NS)[-1].get("value") == "OVERFLOW"
    # sent: the slots are free again
    assert get(port, LARGE_RANGE)[0] == 200
    assert get(port, LARGE_RANGE, source=third)[0] == 200


def test_one_client_sending_large_queries_one_after_another_is_never_refused(catalogue):
    """A script that waits for each answer before sending its next large query must not
    find its own previous query's slot still taken. The thread that sent an answer frees
    the slot a moment after the client has it all; on the development server (the
    demo's) the next request often came first (8-24 of 40 refused under load)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "serve", "--url", db.reader_url_for(catalogue),
         "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])),
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.2)
        statuses = [get(port, "/api/v1/estimates?teff_min=5000&limit=50&format=csv")[0]
                    for _ in range(40)]
    finally:
        stop(server)
    assert statuses == [200] * 40


def test_health_has_its_own_short_timeout(catalogue):
    """With the models table locked, /health and /availability give up after their own
    timeout (1 s) while queries may wait up to their much longer statement timeout."""
    process, port = start_gunicorn(catalogue, LAMOST_VAC_STATEMENT_TIMEOUT_MS="600000",
                                   LAMOST_VAC_HEALTH_TIMEOUT_MS="1000")
    engine = db.make_engine(catalogue)
    try:
        with engine.connect() as connection:
            transaction = connection.begin()
            connection.exec_driver_sql("LOCK TABLE models IN ACCESS EXCLUSIVE MODE")
            status, _, body = get(port, "/health", timeout=60)
            assert status == 503
            document = json.loads(body)
            assert document["status"] == "unavailable"
            assert document["database"]["error"] == "QueryCanceled"
            status, _, body = get(port, "/availability", timeout=60)
            assert status == 200 and b"<vosi:available>false</vosi:available>" in body
            transaction.rollback()
        assert get(port, "/health")[0] == 200
    finally:
        engine.dispose()
        stop(process)


@pytest.mark.parametrize("path, headers, status", [
    ("/api/v1/estimates?columns=" + "x" * 6000, [], 414),
    ("/scs?RA=1&DEC=1&SR=0.1&PAD=" + "x" * 6000, [], 414),
    ("/nowhere/" + "x" * 6000, [], 414),
    ("/api/v1/models", [("X-Big", "x" * 12000)], 431),
    ("/api/v1/models", [(f"X-Field-{i}", "1") for i in range(150)], 431),
    ("/scs?RA=1&DEC=1&SR=0.1", [("X-Big", "x" * 12000)], 431),
])
def test_oversize_requests_get_the_service_error_format(server, path, headers, status):
    answer_status, answer_headers, body = get(server, path, headers=headers)
    assert answer_status == status
    message = error_message(status, answer_headers, body)
    assert "at most" in message
    expected_type = "application/x-votable+xml" if path.startswith("/scs") \
        else "application/json"
    assert answer_headers["Content-Type"].startswith(expected_type)


def test_beyond_gunicorn_maxima_gunicorn_answers_itself(server):
    """The boundary the README documents: past 8190 bytes of request line gunicorn
    refuses the request before the app sees it, with its own HTML page."""
    status, headers, _ = get(server, "/api/v1/models?x=" + "x" * 9000)
    assert status == 414 and headers["Content-Type"].startswith("text/html")
    status, _, body = get(server, "/api/v1/models?x=" + "x" * 7000)
    assert status == 414 and json.loads(body)["status"] == 414


# ---------------------------------------------------------------------------------------
# The limiter itself, across processes
def _hold_slot(directory, ready, client):
    from service.limiter import LargeQueryLimiter

    grant = LargeQueryLimiter(directory, per_client=1, total=1,
                              retry_after_s=1).acquire(client)
    ready.set()
    time.sleep(600)
    grant.release()


def test_slots_hold_across_processes_and_a_killed_process_frees_them(tmp_path):
    from service.limiter import LargeQueryLimiter, LargeQueryRefused

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_slot, args=(str(tmp_path), ready, "10.0.0.1"))
    holder.start()
    try:
        assert ready.wait(60)
        limiter = LargeQueryLimiter(str(tmp_path), per_client=1, total=1, retry_after_s=1)
        with pytest.raises(LargeQueryRefused, match="per client"):
            limiter.acquire("10.0.0.1")
        with pytest.raises(LargeQueryRefused, match="maximum of 1"):
            limiter.acquire("10.0.0.2")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
    grant = limiter.acquire("10.0.0.1")         # the kernel freed the killed holder's locks
    with pytest.raises(LargeQueryRefused):      # and this grant is exclusive in-process too
        limiter.acquire("10.0.0.2")
    grant.release()
    limiter.acquire("10.0.0.2").release()


def test_a_slot_freed_within_the_grace_is_taken_and_one_held_longer_is_refused(tmp_path):
    from service.limiter import LargeQueryLimiter, LargeQueryRefused

    limiter = LargeQueryLimiter(str(tmp_path), per_client=1, total=1, retry_after_s=1,
                                grace_s=5.0)
    held = limiter.acquire("10.0.0.1")
    releaser = threading.Timer(0.2, held.release)
    releaser.start()
    limiter.acquire("10.0.0.1").release()       # waited for the slot instead of refusing
    releaser.join()
    impatient = LargeQueryLimiter(str(tmp_path), per_client=1, total=1, retry_after_s=1,
                                  grace_s=0.05)
    held = impatient.acquire("10.0.0.1")
    with pytest.raises(LargeQueryRefused, match="per client"):
        impatient.acquire("10.0.0.1")
    held.release()
