"""The one-command demo (issue 6) and the production compose file."""
import csv
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from sqlalchemy.engine import make_url

from etl import schema
from etl.cli import build_parser
from etl.settings import load_settings
from conftest import run_demo, serving

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def printed_queries(result):
    """(browser URL line, {description: (rows, URL)}) of the demo's printed queries."""
    lines = [line.strip() for line in result.stdout.splitlines() if "http://127.0.0.1" in line]
    queries = {}
    for line in lines[1:]:
        found = re.fullmatch(r"(.+) \((\d+) rows\): (http://\S+)", line)
        assert found, line
        queries[found.group(1)] = (int(found.group(2)), found.group(3))
    return lines[0], queries


def test_demo_exports_a_sensible_catalogue(sqlite_demo):
    out, _ = sqlite_demo
    truth = {int(r["obsid"]): r for r in csv.DictReader(open(out / "truth.csv"))}
    rows = list(csv.DictReader(open(out / "catalogue.csv")))
    assert sorted(int(r["obsid"]) for r in rows) == sorted(truth)        # every spectrum, once
    teff = np.array([float(r["teff"]) for r in rows])
    true_teff = np.array([float(truth[int(r["obsid"])]["teff"]) for r in rows])
    feh = np.array([float(r["feh"]) for r in rows])
    true_feh = np.array([float(truth[int(r["obsid"])]["feh"]) for r in rows])
    assert np.isfinite(teff).all() and np.isfinite(feh).all()
    # the analytic stars span 3800-6800 K and [Fe/H] -2..0.4: estimates must track them far
    # better than a constant would
    assert np.mean(np.abs(teff - true_teff)) < 0.5 * np.mean(np.abs(true_teff - true_teff.mean()))
    assert np.mean(np.abs(feh - true_feh)) < 0.5 * np.mean(np.abs(true_feh - true_feh.mean()))
    assert all(float(r["teff_err_model"]) > 0 for r in rows)
    # the calibrated uncertainty is left empty only in SNRg bins with fewer than 30
    # cross-fitted spectra (the sample's few spectra below SNRg 10)
    with_err = [r for r in rows if r["teff_err"] not in ("", "nan", "--")]
    assert all(float(r["teff_err"]) > 0 for r in with_err)
    assert len(with_err) > 0.8 * len(rows)
    assert all(float(r["snrg"]) <= 10 for r in rows if r not in with_err)
    assert (out / "catalogue.vot").read_text().lstrip().startswith("<?xml")


def test_demo_writes_the_report_and_plots(sqlite_demo):
    out, _ = sqlite_demo
    for name in ("predicted_vs_reference", "accuracy_vs_snr", "uncertainty_vs_snr", "kiel_diagram"):
        data = (out / "report" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert "MAE" in (out / "report" / "report.md").read_text()


def test_demo_prints_queries_that_return_rows(sqlite_demo):
    _, result = sqlite_demo
    browser, queries = printed_queries(result)          # the browser URL comes first
    assert browser.startswith("browse the catalogue:") and browser.endswith("/")
    paths = sorted(url.split("/", 3)[3].split("?")[0] for _, url in queries.values())
    assert paths == ["api/v1/estimates", "datalink/links", "scs"]     # no TAP on SQLite
    for description, (rows, _) in queries.items():
        assert rows > 0, description


def test_demo_runs_on_postgresql_and_serves_tap_and_datalink(installed_postgresql_demo, tmp_path):
    import pyvo
    import requests

    from etl.settings import Settings
    from service.app import create_app

    url, out, steps = installed_postgresql_demo
    result = steps["demo"]
    # the demo checked its queries against its own 'lamost-vac serve': the ADQL cone
    # through TAP returns the rows of the same cone through /scs
    _, queries = printed_queries(result)
    by_path = {u.split("/", 3)[3].split("?")[0]: rows for rows, u in queries.values()}
    assert by_path["tap/sync"] == by_path["scs"] > 0 and by_path["datalink/links"] == 3

    # the catalogue it built, through pyvo: the exported estimates, and each row's files
    exported = {int(r["obsid"]): float(r["teff"])
                for r in csv.DictReader(open(out / "catalogue.csv"))}
    settings = Settings(database_url=url, model_dir=str(out / "models"),
                        tap_job_dir=str(tmp_path / "tap-jobs"))
    app = create_app(settings)
    try:
        with serving(app) as base:
            tap = pyvo.dal.TAPService(f"{base}/tap")
            table = tap.run_sync("SELECT obsid, teff FROM v_current_estimates",
                                 maxrec=100000)
            assert {int(o): float(t) for o, t in zip(table["obsid"], table["teff"])} == \
                pytest.approx(exported)
            first = tap.run_sync("SELECT TOP 1 s.obsid, s.file_path FROM spectra AS s "
                                 "ORDER BY s.obsid")
            links = first[0].getdatalink()
            this = next(links.bysemantics("#this", include_narrower=False))
            fits = requests.get(this.access_url, timeout=60).content
            assert fits == (out / str(first[0]["file_path"])).read_bytes()
            preview = next(links.bysemantics("#preview", include_narrower=False))
            assert requests.get(preview.access_url, timeout=60).content.startswith(PNG_MAGIC)
    finally:
        app.extensions["lamost_vac"].dispose()


def test_demo_refuses_a_database_that_holds_a_catalogue(installed_postgresql_demo, tmp_path):
    url, _, _ = installed_postgresql_demo
    again = run_demo(tmp_path, "--database-url", url, check=False)
    assert again.returncode != 0
    assert "already holds a catalogue" in again.stderr and "new one" in again.stderr


def test_compose_file_runs_every_part_with_the_same_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"db", "redis", "migrate", "worker", "beat", "api"} <= set(services)
    assert "q3c" in " ".join(services["db"]["command"].split())
    for name in ("worker", "beat"):
        keys = set(services[name]["environment"])
        assert {"LAMOST_VAC_DATABASE_URL", "LAMOST_VAC_BROKER_URL", "LAMOST_VAC_MODEL_DIR"} <= keys
    assert "LAMOST_VAC_READER_DATABASE_URL" in services["api"]["environment"]
    parser = build_parser()
    for name in ("worker", "beat", "migrate"):
        command = services[name]["command"]
        assert command[0] == "lamost-vac"
        parser.parse_args(command[1:])                 # a real subcommand with valid options
    assert services["migrate"]["command"][1:3] == ["db", "upgrade"]
    assert "service.app:create_app()" in services["api"]["command"]
    assert (REPO / "Dockerfile").is_file()


PASSWORD_VARIABLE = re.compile(r"\$\{(\w+)(:\?|:-|-|\?)?[^}]*\}")


def test_compose_file_gives_each_service_the_credentials_of_one_role():
    """Issue 11: the API gets the reader's credentials only, worker and beat the writer's
    (not a superuser), and only db and the one-shot migration the superuser's; every
    password comes from the environment, none has a default."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    superuser = services["db"]["environment"]["POSTGRES_USER"]
    password_of = {superuser: "LAMOST_VAC_ADMIN_PASSWORD",
                   schema.WRITER_ROLE: "LAMOST_VAC_WRITER_PASSWORD",
                   schema.READER_ROLE: "LAMOST_VAC_READER_PASSWORD",
                   schema.ANALYST_ROLE: "LAMOST_VAC_ANALYST_PASSWORD"}
    assert superuser not in (schema.WRITER_ROLE, schema.READER_ROLE)

    def credentials(name):
        """(roles of the service's database URLs, password variables it is given)"""
        environment = services[name].get("environment", {})
        roles = {make_url(value).username for key, value in environment.items()
                 if key.endswith("DATABASE_URL")}
        variables = {m.group(1) for value in environment.values()
                     for m in PASSWORD_VARIABLE.finditer(str(value))
                     if m.group(1) in password_of.values()}
        return roles, variables

    assert credentials("api") == ({schema.READER_ROLE}, {password_of[schema.READER_ROLE]})
    for name in ("worker", "beat"):
        assert credentials(name) == ({schema.WRITER_ROLE}, {password_of[schema.WRITER_ROLE]})
    assert credentials("migrate") == ({superuser}, set(password_of.values()))
    assert credentials("db") == (set(), {password_of[superuser]})
    assert services["db"]["environment"]["POSTGRES_DB"] == \
        make_url(services["migrate"]["environment"]["LAMOST_VAC_DATABASE_URL"]).database
    # the client password (libpq's PGPASSWORD) is the one of the service's own role
    for name in ("api", "worker", "beat", "migrate"):
        (role,), _ = credentials(name)
        assert password_of[role] in services[name]["environment"]["PGPASSWORD"], name
    # the migration sets the roles' passwords from the variables 'db upgrade' reads
    migrate_settings = load_settings({key: "x" for key in services["migrate"]["environment"]})
    assert migrate_settings.writer_password and migrate_settings.reader_password and \
        migrate_settings.analyst_password
    # no password has a default value: a missing one stops docker compose
    for name, service in services.items():
        for value in service.get("environment", {}).values():
            for match in PASSWORD_VARIABLE.finditer(str(value)):
                if "PASSWORD" in match.group(1):
                    assert match.group(2) == ":?", (name, value)
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
    assert "volumes" not in services["api"] or services["api"]["volumes"] == []
