"""The database roles as docker-compose sets them up, on a private PostgreSQL server that
authenticates like the official image: scram-sha-256 passwords over TCP.

The shared test server trusts every local connection, so a password there proves nothing;
each test here starts its own server (initdb, as the ``postgres`` system user when run by
root), runs ``lamost-vac db upgrade`` as its superuser with the role passwords in the
environment or in secret files, and logs in as each role with psql.
"""
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, assert_refused, psql, service_unavailable
from etl import schema
from etl.settings import load_settings

ADMIN_PASSWORD = "admin-secret-1"
WRITER_PASSWORD = "writer-secret-2"
READER_PASSWORD = "reader-secret-3"
ANALYST_PASSWORD = "analyst-secret-4"
CATALOGUE = "lamost_vac"


def postgres_bin():
    try:
        folder = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        folder = ""
    if not (Path(folder) / "initdb").is_file():
        service_unavailable("PostgreSQL server programs (initdb, pg_ctl) not found")
    return Path(folder)


class PasswordServer:
    """A private PostgreSQL server: trust on its own Unix socket (set-up only),
    scram-sha-256 on 127.0.0.1, every statement logged (to look for passwords)."""

    def __init__(self):
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="lamost-vac-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.run_as = []
        if os.geteuid() == 0:               # initdb refuses to run as root
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                service_unavailable("running as root and there is no 'postgres' user for initdb")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server(["initdb", "-D", str(self.data), "-U", "postgres", "-N", "-E", "UTF8",
                      "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"])
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.root} -c fsync=off "
                   # no autovacuum: statistics only change when lamost-vac runs ANALYZE
                   "-c autovacuum=off -c log_statement=all")
        self._server(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", options,
                      "start"])
        self.local_sql(f"ALTER ROLE postgres PASSWORD '{ADMIN_PASSWORD}'")
        self.local_sql(f"CREATE DATABASE {CATALOGUE}")

    def _server(self, command):
        result = subprocess.run(self.run_as + [str(self.bin / command[0])] + command[1:],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    def local_sql(self, sql):
        """As the superuser over the server's own socket (trusted): set-up only."""
        result = subprocess.run(
            ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.root),
             "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def url(self, role):
        return f"postgresql+psycopg://{role}@127.0.0.1:{self.port}/{CATALOGUE}"

    def sql(self, role, password, sql):
        """psql as ``role`` with ``password`` over TCP (password authentication)."""
        return psql(self.url(role), sql, role, password)

    def admin(self, sql):
        result = self.sql("postgres", ADMIN_PASSWORD, sql)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def lamost_vac(self, *args, **environment):
        """``python -m etl.cli ARGS`` with only ``environment`` set (and the code path)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "LAMOST_VAC_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        env.update(environment)
        return subprocess.run([sys.executable, "-m", "etl.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    def stop(self):
        subprocess.run(self.run_as + [str(self.bin / "pg_ctl"), "-D", str(self.data),
                                      "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def server():
    instance = PasswordServer()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def set_up_server():
    """A private server set up as docker-compose's migrate service does it."""
    instance = PasswordServer()
    result = instance.lamost_vac("db", "upgrade", "--url", instance.url("postgres"),
                                 PGPASSWORD=ADMIN_PASSWORD,
                                 LAMOST_VAC_WRITER_PASSWORD=WRITER_PASSWORD,
                                 LAMOST_VAC_READER_PASSWORD=READER_PASSWORD,
                                 LAMOST_VAC_ANALYST_PASSWORD=ANALYST_PASSWORD)
    assert result.returncode == 0, result.stderr
    yield instance
    instance.stop()


def test_db_upgrade_gives_each_role_its_own_password(server, tmp_path):
    # roles left by an older deployment or made by hand: the migration corrects them
    server.local_sql("CREATE ROLE lamost_vac_writer SUPERUSER CREATEROLE")
    server.local_sql("CREATE ROLE lamost_vac_reader LOGIN CREATEDB")
    admin_url = server.url("postgres")
    result = server.lamost_vac("db", "upgrade", "--url", admin_url, PGPASSWORD=ADMIN_PASSWORD)
    assert result.returncode == 0, result.stderr
    assert "password set" not in result.stdout
    # no password yet: under password authentication nobody can log in as the roles
    for role in (schema.READER_ROLE, schema.WRITER_ROLE, schema.ANALYST_ROLE):
        assert_refused(server.sql(role, "guess", "SELECT 1"), "password authentication failed")

    secret = tmp_path / "reader_password"
    secret.write_text(READER_PASSWORD + "\n")            # as secret files usually end
    result = server.lamost_vac("db", "upgrade", "--url", admin_url, PGPASSWORD=ADMIN_PASSWORD,
                               LAMOST_VAC_WRITER_PASSWORD=WRITER_PASSWORD,
                               LAMOST_VAC_READER_PASSWORD_FILE=str(secret),
                               LAMOST_VAC_ANALYST_PASSWORD=ANALYST_PASSWORD)
    assert result.returncode == 0, result.stderr
    assert (f"password set for {schema.WRITER_ROLE}, {schema.READER_ROLE}, "
            f"{schema.ANALYST_ROLE}") in result.stdout

    passwords = {schema.WRITER_ROLE: WRITER_PASSWORD, schema.READER_ROLE: READER_PASSWORD,
                 schema.ANALYST_ROLE: ANALYST_PASSWORD}
    for role, password in passwords.items():
        result = server.sql(role, password, "SELECT current_user, count(*) FROM v_estimates")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{role}|0"
        for other in set(passwords.values()) - {password}:
            assert_refused(server.sql(role, other, "SELECT 1"), "password authentication failed")
        assert_refused(server.sql(role, None, "SELECT 1"), "no password supplied")
    attributes = server.admin(
        "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolpassword LIKE 'SCRAM-SHA-256$%' "
        "FROM pg_authid WHERE rolname LIKE 'lamost_vac_%' ORDER BY rolname")
    assert attributes.splitlines() == [f"{schema.ANALYST_ROLE}|f|f|f|t",
                                       f"{schema.READER_ROLE}|f|f|f|t",
                                       f"{schema.WRITER_ROLE}|f|f|f|t"]
    # only SCRAM verifiers went to the server: its statement log has no password
    log = server.log.read_text()
    assert "ALTER ROLE" in log
    assert not any(password in log for password in passwords.values())

    # the writer cannot change passwords: one line, exit status 2
    result = server.lamost_vac("db", "upgrade", "--url", server.url(schema.WRITER_ROLE),
                               PGPASSWORD=WRITER_PASSWORD, LAMOST_VAC_READER_PASSWORD="x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "cannot set role passwords: permission denied")
    assert "Traceback" not in result.stderr


def test_password_settings_name_what_is_wrong(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"LAMOST_VAC_READER_PASSWORD_FILE: cannot read {missing}"):
        load_settings({"LAMOST_VAC_READER_PASSWORD_FILE": str(missing)})
    with pytest.raises(ValueError, match="LAMOST_VAC_WRITER_PASSWORD or .*_FILE, not both"):
        load_settings({"LAMOST_VAC_WRITER_PASSWORD": "a",
                       "LAMOST_VAC_WRITER_PASSWORD_FILE": str(missing)})
    assert "secret" not in repr(load_settings({"LAMOST_VAC_WRITER_PASSWORD": "secret"}))


def test_writer_runs_the_etl_but_has_no_superuser_powers(set_up_server, tmp_path):
    writer = dict(PGPASSWORD=WRITER_PASSWORD)
    labels = tmp_path / "labels.csv"
    labels.write_text("apogee_id,ra,dec,teff,logg,feh\n"
                      "2M00000001+0000001,10.0,1.0,5000,4.5,-0.2\n"
                      "2M00000002+0000002,20.0,2.0,4500,2.5,-1.0\n")
    url = set_up_server.url(schema.WRITER_ROLE)
    # ingest: staging (temporary) tables, upsert, ANALYZE; maintain: CLUSTER
    for command in (["ingest", "labels", str(labels)], ["db", "maintain"]):
        result = set_up_server.lamost_vac(*command, "--url", url, **writer)
        assert result.returncode == 0, (command, result.stderr)
    # its own ANALYZE (autovacuum is off), CLUSTER and the VACUUM after it took effect: the
    # rewritten table's pages are all-visible, so index-only scans need not read it
    assert set_up_server.admin(
        "SELECT reltuples FROM pg_class WHERE relname = 'reference_labels'") == "2"
    assert set_up_server.admin(
        "SELECT relallvisible = relpages AND relpages > 0 FROM pg_class "
        "WHERE relname = 'reference_labels'") == "t"
    assert set_up_server.admin(
        "SELECT indisclustered FROM pg_index WHERE indexrelid = "
        "'reference_labels_q3c_idx'::regclass") == "t"

    for statement, message in [
            ("CREATE EXTENSION dblink", "permission denied to create extension"),
            ("CREATE ROLE intruder LOGIN", "permission denied to create role"),
            (f"ALTER ROLE {schema.READER_ROLE} PASSWORD 'x'", "permission denied"),
            ("SET ROLE postgres", "permission denied to set role"),
            ("CREATE DATABASE other", "permission denied to create database"),
            ("COPY spectra FROM PROGRAM 'id'", "pg_execute_server_program"),
            ("SELECT pg_read_file('PG_VERSION')", "permission denied for function pg_read_file"),
            ("CREATE TABLE public.extra (x int)", "permission denied for schema public"),
            ("SELECT lo_from_bytea(0, 'abc'::bytea)", "permission denied for function")]:
        assert_refused(set_up_server.sql(schema.WRITER_ROLE, WRITER_PASSWORD, statement), message)


def test_reader_reads_with_its_password_and_cannot_write(set_up_server):
    reader = schema.READER_ROLE
    for name in schema.VIEWS:
        result = set_up_server.sql(reader, READER_PASSWORD, f"SELECT count(*) FROM {name}")
        assert result.returncode == 0, result.stderr
    assert_refused(set_up_server.sql(reader, READER_PASSWORD, "DELETE FROM spectra"),
                   "permission denied for table spectra")
    assert_refused(set_up_server.sql(reader, READER_PASSWORD, "CREATE TEMP TABLE t (x int)"),
                   "permission denied to create temporary tables")
    for name, value in schema.READER_SESSION_SETTINGS.items():
        assert set_up_server.sql(reader, READER_PASSWORD, f"SHOW {name}").stdout.strip() == value


def test_the_api_role_does_not_read_the_quarantine(set_up_server):
    """Quarantine reasons hold the server's file paths; the API never reads them."""
    assert_refused(set_up_server.sql(schema.READER_ROLE, READER_PASSWORD,
                                     "SELECT count(*) FROM quarantine"),
                   "permission denied for table quarantine")


def test_analyst_reads_only_the_published_tables(set_up_server):
    from service import tap_schema

    analyst = schema.ANALYST_ROLE

    def as_analyst(sql):
        return set_up_server.sql(analyst, ANALYST_PASSWORD, sql)

    for name in (*tap_schema.PUBLISHED_TABLES, *schema.VIEWS):
        columns = ", ".join(c.name for c in schema.published_columns(schema.metadata.tables[name])) \
            if name in schema.metadata.tables else "*"
        result = as_analyst(f"SELECT {columns} FROM {name} LIMIT 1")
        assert result.returncode == 0, (name, result.stderr)
    published = set(tap_schema.PUBLISHED_TABLES) | set(schema.VIEWS)
    for name in sorted(set(schema.metadata.tables) - published):
        assert_refused(as_analyst(f"SELECT count(*) FROM {name}"),
                       f"permission denied for table {name}")
    assert_refused(as_analyst("SELECT artifact_path FROM models"),
                   "permission denied for table models")
    assert_refused(as_analyst("DELETE FROM spectra"), "permission denied for table spectra")
    assert_refused(as_analyst("CREATE TEMP TABLE t (x int)"),
                   "permission denied to create temporary tables")
    for name, value in schema.READER_SESSION_SETTINGS.items():
        assert as_analyst(f"SHOW {name}").stdout.strip() == value


def test_analyst_can_neither_see_nor_end_the_api_sessions(set_up_server):
    """They shared one role: a collaborator read the API's SQL in pg_stat_activity and
    ended its connections with pg_terminate_backend (found by review)."""
    import time

    api = subprocess.Popen(
        ["psql", "-X", "-w", "-h", "127.0.0.1", "-p", str(set_up_server.port), "-U",
         schema.READER_ROLE, "-d", CATALOGUE, "-c", "SELECT /* api-session */ pg_sleep(20)"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PG")},
             "PGPASSWORD": READER_PASSWORD},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = ""
        for _ in range(100):
            pid = set_up_server.admin("SELECT pid FROM pg_stat_activity "
                                      "WHERE query LIKE '%api-session%' AND state = 'active' "
                                      "AND pid <> pg_backend_pid()")
            if pid:
                break
            time.sleep(0.1)
        assert pid, "the API-like session did not start"
        seen = set_up_server.sql(schema.ANALYST_ROLE, ANALYST_PASSWORD,
                                 f"SELECT query FROM pg_stat_activity WHERE pid = {pid}")
        assert seen.returncode == 0 and "api-session" not in seen.stdout, seen.stdout
        assert_refused(set_up_server.sql(schema.ANALYST_ROLE, ANALYST_PASSWORD,
                                         f"SELECT pg_terminate_backend({pid})"),
                       "must be a member of the role whose process is being terminated")
        assert api.poll() is None, "the API session was ended"
    finally:
        api.kill()
        api.communicate()


def test_upgrade_to_an_older_revision_sets_the_passwords_of_the_roles_it_has(server):
    """With the analyst's password in the environment, 'db upgrade 0006' (no analyst yet)
    failed on the missing role and set no password at all (found by review)."""
    result = server.lamost_vac("db", "upgrade", "0006", "--url", server.url("postgres"),
                               PGPASSWORD=ADMIN_PASSWORD,
                               LAMOST_VAC_WRITER_PASSWORD=WRITER_PASSWORD,
                               LAMOST_VAC_READER_PASSWORD=READER_PASSWORD,
                               LAMOST_VAC_ANALYST_PASSWORD=ANALYST_PASSWORD)
    assert result.returncode == 0, result.stderr
    assert f"password set for {schema.WRITER_ROLE}, {schema.READER_ROLE}" in result.stdout
    assert f"{schema.ANALYST_ROLE}: no such role at this revision" in result.stderr
    assert server.sql(schema.READER_ROLE, READER_PASSWORD, "SELECT 1").returncode == 0
