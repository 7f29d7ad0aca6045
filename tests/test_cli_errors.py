"""The CLI never prints the database password, and a database that is down is one line.

The environment cases run the entry point in a subprocess with the writer URL in the
environment, as an operator's shell has it; the unreachable database is a real closed TCP
port.
"""
import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from etl.cli import main

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pa55"

ALL_HELP = """
import argparse
from etl.cli import build_parser

def helps(parser):
    yield parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from helps(sub)

print("\\n".join(helps(build_parser())))
"""


def env(**extra):
    environment = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    environment.pop("LAMOST_VAC_DEBUG", None)
    environment.update(extra)
    return environment


def test_help_masks_the_database_password():
    url = f"postgresql+psycopg://lamost_vac:{PASSWORD}@db.example:5432/lamost_vac"
    done = subprocess.run([sys.executable, "-c", ALL_HELP], env=env(LAMOST_VAC_DATABASE_URL=url),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.count("usage: lamost-vac") > 10             # every command's help was made
    assert PASSWORD not in text and PASSWORD not in done.stderr
    # the default is still shown, masked as the worker log masks the broker's
    assert "lamost_vac:***@db.example:5432/lamost_vac" in " ".join(text.split())
    one = subprocess.run([sys.executable, "-m", "etl.cli", "infer", "--help"],
                         env=env(LAMOST_VAC_DATABASE_URL=url), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert one.returncode == 0 and "***" in one.stdout and PASSWORD not in one.stdout


@pytest.fixture()
def closed_port():
    """A local TCP port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("argv", [
    ["db", "upgrade"], ["db", "current"], ["crossmatch"], ["train"], ["infer"],
    ["export", "--format", "csv", "--out", "{tmp}/vac.csv"],
    ["ingest", "labels", "{tmp}/labels.csv"],
])
def test_database_down_is_one_line_naming_it_and_exit_2(argv, closed_port, tmp_path):
    (tmp_path / "labels.csv").write_text("apogee_id,ra,dec,teff,logg,feh\nA,1,2,5000,4,0\n")
    url = f"postgresql://lamost_vac:{PASSWORD}@127.0.0.1:{closed_port}/lamost_vac"
    argv = [a.format(tmp=tmp_path) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--url", url])
    assert code == 2, (out.getvalue(), err.getvalue())
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, err.getvalue()
    assert "Traceback" not in err.getvalue() and PASSWORD not in err.getvalue() + out.getvalue()
    assert f"database postgresql://lamost_vac:***@127.0.0.1:{closed_port}/lamost_vac" in lines[0]
    assert "Connection refused" in lines[0]


def test_database_from_the_environment_is_named_too(closed_port, tmp_path):
    # the console entry point in its own process: stderr holds that one line and nothing else
    url = f"postgresql://lamost_vac:{PASSWORD}@127.0.0.1:{closed_port}/catalogue"
    done = subprocess.run([sys.executable, "-m", "etl.cli", "db", "current"],
                          env=env(LAMOST_VAC_DATABASE_URL=url), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert f"127.0.0.1:{closed_port}/catalogue" in done.stderr and PASSWORD not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def run_main(argv):
    """(exit code, stdout, stderr) of the CLI; argparse's exit is caught."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as done:
            code = done.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("url, source, says", [
    ("foo", "--url", "not a database URL; expected postgresql://"),
    ("http://example.com/", "--url", "http://example.com/: the catalogue lives in PostgreSQL or SQLite"),
    (f"mysql://user:{PASSWORD}@host/db", "--url", "mysql://user:***@host/db: the catalogue lives"),
])
@pytest.mark.parametrize("argv", [["db", "current"], ["crossmatch"],
                                  ["export", "--format", "csv", "--out", "{tmp}/vac.csv"]])
def test_a_url_that_is_not_a_catalogue_database_is_one_line(argv, url, source, says, tmp_path):
    """A bad --url was a SQLAlchemy or import traceback (found by review)."""
    code, out, err = run_main([a.format(tmp=tmp_path) for a in argv] + ["--url", url])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lamost-vac {argv[0]}: error: {source}: {says}"), err
    assert PASSWORD not in out + err


def test_a_bad_url_in_the_environment_is_named_and_an_unknown_revision_too(tmp_path):
    done = subprocess.run([sys.executable, "-m", "etl.cli", "db", "current"],
                          env=env(LAMOST_VAC_DATABASE_URL="foo"), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lamost-vac db: error: LAMOST_VAC_DATABASE_URL: not a database URL; expected "
        "postgresql://USER@HOST:PORT/DATABASE or sqlite:///PATH"]
    code, _, err = run_main(["db", "upgrade", "nosuch", "--url", f"sqlite:///{tmp_path}/x.db"])
    assert code == 2
    assert err.strip() == ("lamost-vac db: error: revision 'nosuch': Can't locate revision "
                           "identified by 'nosuch'")


@pytest.mark.parametrize("argv, says", [
    (["infer", "--limit", "-5"], "argument --limit: must be at least 0, got -5"),
    (["infer", "--timeout", "0"], "argument --timeout: must be positive, got 0"),
    (["infer", "--batch-size", "x"], "argument --batch-size: expected a whole number, got 'x'"),
    (["ingest", "spectra", "c.csv", "--batch-rows", "0"], "argument --batch-rows: must be at least 1, got 0"),
    (["ingest", "spectra", "c.csv", "--workers", "-3"], "argument --workers: must be at least 1, got -3"),
    (["serve", "--port", "99999"], "argument --port: must be a TCP port, 1-65535, got 99999"),
    (["crossmatch", "--radius", "nan"], "argument --radius: expected a finite number, got 'nan'"),
    (["train-files", "--catalogue", "c", "--labels", "l", "--out", "o", "--holdout", "1"],
     "argument --holdout: must be at least 0 and below 1, got 1"),
    (["train-files", "--catalogue", "c", "--labels", "l", "--out", "o", "--jobs", "0"],
     "argument --jobs: must be positive, or -1 for every core, got 0"),
    (["train-files", "--catalogue", "c", "--labels", "l", "--out", "o", "--lasso-folds", "1"],
     "argument --lasso-folds: must be at least 2, got 1"),
])
def test_a_bad_number_is_refused_by_the_parser_naming_its_option(argv, says):
    """--limit -5 processed every spectrum on SQLite (LIMIT -5 is none) and was a traceback
    on PostgreSQL; --batch-rows 0 ingested nothing with exit 0; --port 99999 listened on
    34463 (found by review)."""
    code, _, err = run_main(argv)
    command = " ".join(argv[:2] if argv[0] == "ingest" else argv[:1])
    assert code == 2
    assert err.strip().splitlines()[-1] == f"lamost-vac {command}: error: {says}"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
@pytest.mark.parametrize("argv", [["models", "list"], ["export", "--format", "csv", "--out", "{tmp}/vac.csv"],
                                  ["crossmatch"]])
def test_a_database_without_the_catalogue_says_to_upgrade_it(make_database, dialect, argv, tmp_path):
    """An empty database (a new SQLite file, a PostgreSQL database nobody upgraded) was a
    SQLAlchemy traceback on PostgreSQL and 'no such table' on SQLite: one line naming the
    database and the command that makes the catalogue."""
    url = make_database(dialect)
    code, out, err = run_main([a.format(tmp=tmp_path) for a in argv] + ["--url", url])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lamost-vac {argv[0]}: error: database "), err
    assert lines[0].endswith(f"create or update its tables with 'lamost-vac db upgrade --url {url}'"), err


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_catalogue_missing_a_column_says_to_upgrade_it(make_database, dialect):
    """A table without a column the code reads (a catalogue altered by hand, or one a
    release ahead of its migrations) was a traceback on PostgreSQL (SQLSTATE 42703): the
    same one line as a missing table."""
    from sqlalchemy import create_engine

    from etl import db

    url = make_database(dialect)
    db.upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE models DROP COLUMN code_version")
    engine.dispose()
    code, _, err = run_main(["models", "list", "--url", url])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "code_version" in lines[0], err
    assert lines[0].endswith(f"create or update its tables with 'lamost-vac db upgrade --url {url}'"), err
