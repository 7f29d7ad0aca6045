"""/tap (TAP 1.1 sync, ADQL) on a real PostgreSQL catalogue with Q3C, through the real
clients: pyvo's TAPService, STILTS tapquery and taplint, against a live werkzeug server;
ADQL refusals (service/adql.py) without a database; the embedded SQLite default."""
import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from etl import db, schema
from service import adql, tap_schema
from conftest import (CURRENT, expected_cone, load_catalogue, make_catalogue, needs_stilts,
                      parse_votable, service_settings, serving, stilts, tap_error_message)

pyvo = pytest.importorskip("pyvo", reason="pyvo not installed (pip install pyvo)")

TAP_TIMEOUT_MS = 3000
LABEL_SET = "apogee-payne"


# ---------------------------------------------------------------------------------------
# Fixtures: a PostgreSQL catalogue with reference labels matched to some spectra.
def load_reference_labels(url, cat, every=10):
    """A reference star 0.5 arcsec north of every ``every``-th spectrum, matched to it
    (match_rank 1); returns {obsid: reference Teff}."""
    engine = db.make_engine(url)
    labels, matches, teff = [], [], {}
    for i in range(0, len(cat["obsid"]), every):
        obsid = int(cat["obsid"][i])
        dec = min(float(cat["dec"][i]) + 0.5 / 3600, 90.0)
        teff[obsid] = 4000.0 + i
        labels.append(dict(label_id=i + 1, label_set=LABEL_SET, apogee_id=f"2M{i:08d}",
                           ra=float(cat["ra"][i]), dec=dec, zone=db.zone_of(dec),
                           teff=teff[obsid], logg=2.5, feh=-0.3, good_flag=1))
        matches.append(dict(obsid=obsid, label_id=i + 1, label_set=LABEL_SET,
                            apogee_id=f"2M{i:08d}", separation_arcsec=0.5, match_rank=1,
                            radius_arcsec=3.0))
    with engine.begin() as connection:
        connection.execute(insert(schema.reference_labels), labels)
        connection.execute(insert(schema.crossmatch), matches)
        db.analyze(connection, ["reference_labels", "crossmatch"])
    engine.dispose()
    return teff


@pytest.fixture(scope="module")
def tap_db(make_database):
    url = make_database("postgresql")
    db.upgrade(url)
    cat = make_catalogue()
    load_catalogue(url, cat)
    reference_teff = load_reference_labels(url, cat)
    return url, db.reader_url_for(url), cat, reference_teff


def tap_settings(url, reader_url, **changes):
    return dataclasses.replace(service_settings(url, reader_url),
                               tap_sync_timeout_ms=TAP_TIMEOUT_MS, **changes)


@pytest.fixture(scope="module")
def tap_app(tap_db, tmp_path_factory):
    from service.app import create_app

    application = create_app(tap_settings(
        tap_db[0], tap_db[1], tap_job_dir=str(tmp_path_factory.mktemp("tap-jobs"))))
    application.config["TESTING"] = True
    yield application
    application.extensions["lamost_vac"].dispose()


@pytest.fixture
def client(tap_app):
    return tap_app.test_client()


@pytest.fixture(scope="module")
def tap_url(tap_app):
    with serving(tap_app) as base:
        yield base + "/tap"


def cone_adql(table, ra, dec, radius, columns="obsid"):
    return (f"SELECT {columns} FROM {table} WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
            f"CIRCLE('ICRS', {ra!r}, {dec!r}, {radius!r}))")


def sync(client, query, **params):
    return client.post("/tap/sync", data={"LANG": "ADQL", "QUERY": query, **params})




# ---------------------------------------------------------------------------------------
# Refusals on the parsed tree: nothing reaches the database.
HOSTILE = [
    ("SELECT pg_sleep(10)", "function pg_sleep is not available"),
    ("SELECT * FROM spectra WHERE pg_read_file('/etc/passwd') IS NOT NULL",
     "function pg_read_file"),
    ("SELECT set_config('statement_timeout', '0', false) FROM spectra", "set_config"),
    ("SELECT lo_from_bytea(0, 'x') FROM spectra", "lo_from_bytea"),
    ("SELECT * FROM dblink('dbname=postgres', 'SELECT 1') AS t(a int)", "not accepted"),
    ("SELECT usename FROM pg_catalog.pg_user", "table pg_catalog.pg_user is not published"),
    ("SELECT * FROM pg_user", "table pg_user is not published"),
    ("SELECT table_name FROM information_schema.tables", "information_schema.tables"),
    ("SELECT * FROM quarantine", "table quarantine is not published"),
    ("SELECT * FROM alembic_version", "table alembic_version is not published"),
    ("SELECT ctid, xmin FROM spectra", "column ctid is not published"),
    ("SELECT obsid FROM spectra; DROP TABLE spectra", "2 statements"),
    ("DROP TABLE spectra", "only SELECT queries"),
    ("DELETE FROM spectra", "only SELECT queries"),
    ("INSERT INTO models (version) VALUES ('x')", "only SELECT queries"),
    ("SELECT obsid FROM spectra FOR UPDATE", "syntax error at line 1, column"),
    ("SELECT CAST('pg_sleep' AS regproc) FROM spectra", "CAST to"),
    ("SELECT current_user FROM spectra", "CURRENT_USER is not available"),
    ("SELECT " + "(" * 300 + "1" + ")" * 300 + " FROM spectra", "nested"),
    ("SELECT 1 FROM spectra WHERE " + " AND ".join(["(obsid > 1"] * 70) + ")" * 70,
     "nested"),
    ("SELECT obsid FROM spectra WHERE CONTAINS(POINT('GALACTIC', ra, dec), "
     "CIRCLE('GALACTIC', 1, 2, 3)) = 1", "coordinate system 'GALACTIC'"),
    ("SELECT POINT('ICRS', ra, dec) FROM spectra", "POINT is supported only inside"),
    ("SELEC obsid FROM spectra", "ADQL syntax error at line 1, column 16"),
    ("SELECT obsid FROM spectra WHERE ra >", "ADQL syntax error at line 1, column"),
]


@pytest.mark.parametrize("query, message", HOSTILE)
def test_hostile_adql_is_refused_before_the_database(query, message):
    with pytest.raises(adql.AdqlError, match=None) as raised:
        adql.translate(query, maxrows=10)
    assert message in str(raised.value), str(raised.value)


def test_adql_translation_to_q3c():
    cone = adql.translate(cone_adql("v_spectra", 150.0, 30.0, 0.1) + " ORDER BY obsid",
                          maxrows=None)
    assert cone.sql == ("SELECT obsid FROM v_spectra WHERE Q3C_RADIAL_QUERY(ra, dec, "
                        "%(q3c_0)s, %(q3c_1)s, %(q3c_2)s) ORDER BY obsid")
    assert cone.parameters == {"q3c_0": 150.0, "q3c_1": 30.0, "q3c_2": 0.1}
    polygon = adql.translate("SELECT obsid FROM spectra WHERE CONTAINS(POINT(ra, dec), "
                             "POLYGON('ICRS', 1, -2, 3, 2, 2, 4)) = 0", maxrows=5)
    assert polygon.sql == ("SELECT obsid FROM spectra WHERE NOT Q3C_POLY_QUERY(ra, dec, "
                           "CAST(ARRAY[%(q3c_0)s, %(q3c_1)s, %(q3c_2)s, %(q3c_3)s, "
                           "%(q3c_4)s, %(q3c_5)s] AS DOUBLE PRECISION[])) LIMIT 5")
    assert list(polygon.parameters.values()) == [1, -2, 3, 2, 2, 4]
    distance = adql.translate("SELECT TOP 50 DISTANCE(POINT('ICRS', ra, dec), "
                              "POINT('ICRS', 1, 2)) AS d FROM spectra", maxrows=11)
    assert distance.sql == ("SELECT Q3C_DIST(ra, dec, %(q3c_0)s, %(q3c_1)s) AS d FROM spectra "
                            "LIMIT 11")


def test_cones_of_one_shape_are_one_statement():
    """The numbers of the Q3C functions are parameters, so that every cone of a query
    shape is one statement (its translation reused, prepared once per connection);
    numbers elsewhere, a sub-query's positional ORDER BY 1 included, stay in the text."""
    first, second = (adql.translate(cone_adql("v_current_estimates", ra, dec, 1 / 60,
                                              columns="obsid, teff")
                                    + " AND teff > 5000", maxrows=101)
                     for ra, dec in ((150.0, 30.0), (10.5, -2.25)))
    assert first.sql == second.sql and "5000" in first.sql
    assert second.parameters == {"q3c_0": 10.5, "q3c_1": -2.25, "q3c_2": 1 / 60}
    nested = adql.translate("SELECT obsid FROM spectra WHERE 1 = CONTAINS(POINT(ra, dec), "
                            "CIRCLE((SELECT TOP 1 ra FROM spectra ORDER BY 1), 0, 1/60.))",
                            maxrows=5)
    assert "ORDER BY 1 LIMIT 1" in nested.sql
    assert nested.parameters == {"q3c_0": 0, "q3c_1": 1, "q3c_2": 60.0}


def test_a_reused_query_shape_translates_as_a_fresh_translation():
    """adql.translate reuses the translation of a query of the same shape; every query
    below, translated after the one before it, gets what a first translation gives,
    including where a number outside the Q3C functions changes the translation."""
    cone = "SELECT TOP {} obsid FROM v_spectra WHERE {} = CONTAINS(POINT(ra, dec), " \
           "CIRCLE('ICRS', {}, {}, {}))"
    queries = [cone.format(10, 1, 150.0, 30.0, 0.1), cone.format(10, 1, 10.5, -2.0, 0.2),
               cone.format(10, 1, 10.5, 2, "1e999"), cone.format(3, 1, 1, 2, 3),
               cone.format(3, 0, 1, 2, 3), cone.format(3, 0, -1, 2.5, 0.01),
               cone.format(3, 0, -1, 2.5, 0.01) + " -- a comment",
               cone.format(3, 0, 1, 2, 3) + " AND designation LIKE 'J 1%'",
               cone.format(3, 0, 1, 2, 3) + " AND designation LIKE 'J 2%'",
               cone.format(3, 0, 1, 2, 3) + " AND designation LIKE 'J2%'",
               cone.format(3, 0, "1.5e-3", "2.", "3E+1")]
    for query in queries:
        reused = adql.translate(query, maxrows=5)
        fresh = adql.QueryShapes().translate(query, maxrows=5)
        assert (reused.sql, reused.parameters) == (fresh.sql, fresh.parameters), query
    assert adql.translate(queries[1], maxrows=5).parameters == {
        "q3c_0": 10.5, "q3c_1": -2.0, "q3c_2": 0.2}
    assert "NOT Q3C_RADIAL_QUERY" in adql.translate(queries[4], maxrows=5).sql


# ---------------------------------------------------------------------------------------
# sync through the Flask client
def test_sync_cone_matches_an_independent_computation(client, tap_db):
    cat = tap_db[2]
    expected_ids, _ = expected_cone(cat, 150.0, 30.0, 0.05)
    for method in ("get", "post"):
        query = cone_adql("v_current_estimates", 150.0, 30.0, 0.05, "obsid, ra, teff")
        params = {"LANG": "ADQL", "QUERY": query, "MAXREC": "100000"}
        response = (client.get("/tap/sync", query_string=params) if method == "get"
                    else client.post("/tap/sync", data=params))
        assert response.status_code == 200
        table = parse_votable(response.data).get_first_table()
        assert sorted(int(x) for x in table.array["obsid"]) == sorted(expected_ids)
        assert table.get_field_by_id("teff").unit == "K"
        assert table.get_field_by_id("ra").ucd == "pos.eq.ra;meta.main"


def test_maxrec_overflow_and_metadata_only(client, tap_db):
    response = sync(client, "SELECT obsid FROM spectra ORDER BY obsid", MAXREC="7")
    votable = parse_votable(response.data)
    assert [int(x) for x in votable.get_first_table().array["obsid"]] == list(
        tap_db[2]["obsid"][:7])
    infos = [(i.name, i.value) for i in votable.resources[0].infos]
    assert infos[0] == ("QUERY_STATUS", "OK") and infos[-1] == ("QUERY_STATUS", "OVERFLOW")
    exact = parse_votable(sync(client, "SELECT TOP 7 obsid FROM spectra", MAXREC="7").data)
    assert [i.value for i in exact.resources[0].infos if i.name == "QUERY_STATUS"] == ["OK"]
    empty = parse_votable(sync(client, "SELECT obsid, teff FROM estimates", MAXREC="0").data)
    table = empty.get_first_table()
    assert len(table.array) == 0 and table.get_field_by_id("teff").unit == "K"


@pytest.mark.parametrize("fmt", ["csv", "fits", "binary2", "votable",
                                 "application/x-votable+xml;serialization=BINARY2"])
def test_response_formats(client, tap_db, fmt):
    from astropy.table import Table

    query = ("SELECT TOP 20 obsid, teff, model_version, created_at FROM v_estimates "
             "ORDER BY obsid")
    response = sync(client, query, RESPONSEFORMAT=fmt, MAXREC="20")
    assert response.status_code == 200
    if fmt == "csv":
        table = Table.read(response.get_data(as_text=True), format="ascii.csv")
    elif fmt == "fits":
        table = Table.read(io.BytesIO(response.data), format="fits")
    else:
        if "binary2" in fmt.lower():
            assert b"<BINARY2>" in response.data
        table = parse_votable(response.data).get_first_table().to_table()
    assert len(table) == 20
    obsids = [int(x) for x in tap_db[2]["obsid"]]
    expected = sorted(obsids + obsids[::2])[:20]   # every estimate of both model versions
    assert sorted(int(x) for x in table["obsid"]) == expected
    if fmt != "csv":                                # CSV carries names only
        assert str(table["teff"].unit) == "K"


def test_binary2_nulls_round_trip(client):
    text = parse_votable(sync(client, "SELECT obsid, teff FROM v_current_estimates "
                                      "WHERE teff IS NULL", RESPONSEFORMAT="votable").data)
    binary = parse_votable(sync(client, "SELECT obsid, teff FROM v_current_estimates "
                                        "WHERE teff IS NULL", RESPONSEFORMAT="binary2").data)
    a, b = text.get_first_table().array, binary.get_first_table().array
    assert len(a) > 0 and list(a["obsid"]) == list(b["obsid"])
    assert a["teff"].mask.all() and b["teff"].mask.all()


def test_tap_schema_is_generated_from_the_schema_and_queryable(client):
    response = sync(client, "SELECT column_name, unit, ucd, description, datatype, indexed, "
                            "principal FROM TAP_SCHEMA.columns WHERE table_name = 'spectra'",
                    MAXREC="1000")
    table = parse_votable(response.data).get_first_table().to_table()
    rows = {str(r["column_name"]): r for r in table}
    assert set(rows) == {tap_schema.adql_name(c.name) for c in schema.spectra.columns}
    for column in schema.spectra.columns:
        row = rows[tap_schema.adql_name(column.name)]
        assert (row["unit"] or None) == column.info.get("unit")
        assert (row["ucd"] or None) == column.info.get("ucd")
        assert str(row["description"]) == column.info["description"]
    assert rows["ra"]["indexed"] == 1 and rows['"zone"']["indexed"] == 1
    assert rows["designation"]["indexed"] == 0
    assert rows["obsid"]["datatype"] == "long" and rows["ra"]["datatype"] == "double"
    keys = parse_votable(sync(client, "SELECT k.from_table, k.target_table, c.from_column "
                                      "FROM TAP_SCHEMA.keys AS k JOIN TAP_SCHEMA.key_columns "
                                      "AS c ON c.key_id = k.key_id",
                              MAXREC="1000").data).get_first_table().to_table()
    pairs = {(str(r["from_table"]), str(r["target_table"]), str(r["from_column"]))
             for r in keys}
    assert ("estimates", "spectra", "obsid") in pairs
    assert ("v_best_match", "spectra", "obsid") in pairs
    tables = parse_votable(sync(client, "SELECT table_name FROM TAP_SCHEMA.tables",
                                MAXREC="1000").data).get_first_table().array
    published = set(str(t) for t in tables["table_name"])
    assert set(schema.VIEWS) <= published and "quarantine" not in published
    vosi = client.get("/tap/tables").get_data(as_text=True)
    for name in published:
        assert f"<name>{name}</name>" in vosi


def test_cone_uses_the_q3c_index(tap_app):
    """EXPLAIN of the translated 1-arcmin cone: the Q3C index serves it, also through a
    view joining the estimates."""
    engine = tap_app.extensions["lamost_vac"].tap_engine
    for table in ("v_spectra", "v_current_estimates"):
        cone = adql.translate(cone_adql(table, 150.1, 30.1, 1 / 60), maxrows=101)
        with engine.connect() as connection:
            plan = "\n".join(r[0] for r in connection.exec_driver_sql(
                "EXPLAIN " + cone.sql, cone.parameters))
        assert "spectra_q3c_idx" in plan, plan


def test_percent_signs_in_literals_are_text(client):
    response = sync(client, "SELECT TOP 3 designation || '%s%%(x)s' AS d FROM spectra "
                            "WHERE designation LIKE 'J00%' ORDER BY designation", MAXREC="3")
    values = [str(v) for v in parse_votable(response.data).get_first_table().array["d"]]
    assert values == ["J000000%s%%(x)s", "J000001%s%%(x)s", "J000002%s%%(x)s"]


def test_errors_are_votables_naming_the_problem(client):
    for params, status, fragment in [
            ({"QUERY": "SELECT obsid FROM spectra"}, 400, "LANG is required"),
            ({"LANG": "SQL", "QUERY": "SELECT 1"}, 400, "LANG='SQL' is not supported"),
            ({"LANG": "ADQL"}, 400, "QUERY is required"),
            ({"LANG": "ADQL", "QUERY": "SELECT obsid FROM spectra", "MAXREC": "-1"}, 400,
             "MAXREC must be a whole number"),
            ({"LANG": "ADQL", "QUERY": "SELECT obsid FROM spectra",
              "RESPONSEFORMAT": "xls"}, 400, "RESPONSEFORMAT='xls' is not supported"),
            ({"LANG": "ADQL", "QUERY": "SELECT obsid FROM spectra WHERE"}, 400,
             "ADQL syntax error at line 1"),
            ({"LANG": "ADQL", "QUERY": "SELECT 1 / 0 FROM spectra"}, 400,
             "division by zero"),
            ({"LANG": "ADQL", "QUERY": "SELECT obsid FROM spectra JOIN estimates "
              "ON estimates.obsid = spectra.obsid"}, 400, "ambiguous"),
    ]:
        response = client.post("/tap/sync", data=params)
        assert response.status_code == status, response.data
        assert fragment in tap_error_message(response)


def test_a_runaway_query_hits_the_timeout_and_others_are_still_answered(tap_url, tap_db):
    """A huge cross join runs until the TAP statement timeout (503, VOTable error) while
    other clients' queries keep being answered."""
    import requests

    huge = ("SELECT COUNT(*) FROM spectra AS a, spectra AS b, spectra AS c "
            "WHERE a.snrg + b.snrg > c.snrg")
    outcome = {}

    def run_huge():
        outcome["huge"] = requests.post(f"{tap_url}/sync",
                                        data={"LANG": "ADQL", "QUERY": huge}, timeout=60)

    thread = threading.Thread(target=run_huge)
    thread.start()
    answered = 0
    while thread.is_alive():
        small = requests.post(f"{tap_url}/sync", timeout=30, data={
            "LANG": "ADQL", "QUERY": "SELECT TOP 1 obsid FROM spectra"})
        assert small.status_code == 200
        answered += 1
    thread.join()
    assert answered >= 1
    assert outcome["huge"].status_code == 503
    assert f"TAP timeout of {TAP_TIMEOUT_MS} ms" in tap_error_message(outcome["huge"])


def test_tap_needs_postgresql_on_sqlite(make_database):
    from service.app import create_app

    url = make_database("sqlite")
    db.upgrade(url)
    app = create_app(service_settings(url, db.reader_url_for(url)))
    try:
        response = app.test_client().get("/tap/sync", query_string={
            "LANG": "ADQL", "QUERY": "SELECT TOP 1 obsid FROM spectra"})
        assert "TAP needs PostgreSQL" in tap_error_message(response)
    finally:
        app.extensions["lamost_vac"].dispose()


# ---------------------------------------------------------------------------------------
# Real clients
def test_pyvo_tap_cone_join_top_and_overflow(tap_url, tap_db):
    url, _, cat, reference_teff = tap_db
    service = pyvo.dal.TAPService(tap_url)
    expected_ids, _ = expected_cone(cat, 0.0, 60.0, 0.3)
    cone = service.run_sync(cone_adql("v_current_estimates", 0.0, 60.0, 0.3,
                                      "obsid, model_version"), maxrec=100000).to_table()
    assert sorted(int(x) for x in cone["obsid"]) == sorted(expected_ids)
    assert set(cone["model_version"]) == {CURRENT}

    joined = service.run_sync(
        "SELECT e.obsid, e.teff, b.teff AS teff_ref FROM v_current_estimates AS e "
        f"JOIN v_best_match AS b ON b.obsid = e.obsid WHERE b.label_set = '{LABEL_SET}'",
        maxrec=100000).to_table()
    assert {int(o): float(t) for o, t in zip(joined["obsid"], joined["teff_ref"])} == \
        reference_teff
    assert str(joined["teff_ref"].unit) == "K"

    top = service.run_sync("SELECT TOP 5 obsid FROM spectra ORDER BY obsid DESC")
    assert [int(x) for x in top["obsid"]] == sorted(int(x) for x in cat["obsid"])[-5:][::-1]

    truncated = service.run_sync("SELECT obsid FROM spectra", maxrec=9)
    assert len(truncated) == 9 and truncated.query_status == "OVERFLOW"

    with pytest.raises(pyvo.dal.DALQueryError, match="function pg_sleep is not available"):
        service.run_sync("SELECT pg_sleep(1) FROM spectra")
    table_names = {t.name for t in service.tables}
    assert {"v_current_estimates", "TAP_SCHEMA.columns"} <= table_names


@needs_stilts
def test_stilts_tapquery(tap_url, tap_db):
    cat = tap_db[2]
    expected_ids, _ = expected_cone(cat, 150.0, 30.0, 0.02)
    out = stilts("tapquery", f"tapurl={tap_url}", "sync=true",
                 "adql=" + cone_adql("v_current_estimates", 150.0, 30.0, 0.02,
                                     "obsid, teff"), "ofmt=csv")
    rows = out.strip().splitlines()
    assert rows[0].split(",") == ["obsid", "teff"]
    assert sorted(int(r.split(",")[0]) for r in rows[1:]) == sorted(expected_ids)


@needs_stilts
def test_stilts_taplint_reports_no_errors_and_no_warnings(tap_url):
    """Every stage: metadata, sync, async (UWS), uploads, examples. taplint's one
    "failure" is a stage it skips: there is no ObsLocTAP table."""
    out = stilts("taplint", f"tapurl={tap_url}")
    errors = [line for line in out.splitlines() if line.startswith(("E-", "W-"))]
    assert not errors, out
    assert "Errors: 0; Warnings: 0" in out
    skipped = {line.split()[0] for line in out.splitlines() if line.startswith("F-")}
    assert skipped <= {"F-LOC-NOTP-1"}, out


# ---------------------------------------------------------------------------------------
# async (UWS 1.1): without a broker the job runs in the API process when started.
def test_pyvo_async_job_runs_and_returns_the_result(tap_url, tap_db):
    cat = tap_db[2]
    service = pyvo.dal.TAPService(tap_url)
    expected_ids, _ = expected_cone(cat, 150.0, 30.0, 0.05)
    job = service.submit_job(cone_adql("v_current_estimates", 150.0, 30.0, 0.05,
                                       "obsid, teff"), maxrec=100000)
    assert job.phase == "PENDING"
    job.run().wait(timeout=60)
    assert job.phase == "COMPLETED"
    table = job.fetch_result().to_table()
    assert sorted(int(x) for x in table["obsid"]) == sorted(expected_ids)
    assert str(table["teff"].unit) == "K"
    job.delete()
    with pytest.raises(pyvo.dal.DALServiceError):
        job.phase       # noqa: B018 -- deleted: 404


def test_async_jobs_aborted_deleted_and_failed(tap_url):
    import requests

    service = pyvo.dal.TAPService(tap_url)
    aborted = service.submit_job("SELECT TOP 3 obsid FROM spectra")
    aborted.abort()
    assert aborted.phase == "ABORTED"
    with pytest.raises(requests.HTTPError):     # an aborted job cannot be run any more
        requests.post(f"{aborted.url}/phase", data={"PHASE": "RUN"},
                      timeout=30).raise_for_status()

    deleted = service.submit_job("SELECT TOP 3 obsid FROM spectra")
    listed = requests.get(f"{tap_url}/async", timeout=30).text
    assert deleted.job_id in listed
    deleted.delete()
    assert deleted.job_id not in requests.get(f"{tap_url}/async", timeout=30).text

    failed = service.submit_job("SELECT pg_sleep(100) FROM spectra")
    failed.run().wait(timeout=60)
    assert failed.phase == "ERROR"
    with pytest.raises(pyvo.dal.DALQueryError, match="function pg_sleep is not available"):
        failed.raise_if_error()
    error = requests.get(f"{failed.url}/error", timeout=30)
    assert "function pg_sleep is not available" in tap_error_message(error)

    for path in ("../../etc/passwd", "0" * 31 + "g"):
        assert requests.get(f"{tap_url}/async/{path}", timeout=30).status_code == 404


# ---------------------------------------------------------------------------------------
# async with a broker: a real Celery worker (``celery -A service.tap_worker worker -Q tap``)
REDIS_URL = os.environ.get("LAMOST_VAC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("LAMOST_VAC_TEST_REDIS_DB", "11"))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker_tap_url(tap_db, tmp_path_factory):
    """A live /tap whose async jobs go to a Celery worker subprocess through Redis."""
    import redis
    from service.app import create_app

    broker = f"{REDIS_URL}/{REDIS_DB}"
    try:
        redis.Redis.from_url(broker).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis not reachable at {broker}: {error}")
    jobs = tmp_path_factory.mktemp("tap-worker-jobs")
    env = dict(os.environ, LAMOST_VAC_DATABASE_URL=tap_db[0],
               LAMOST_VAC_READER_DATABASE_URL=tap_db[1], LAMOST_VAC_BROKER_URL=broker,
               LAMOST_VAC_TAP_JOB_DIR=str(jobs), LAMOST_VAC_TAP_ASYNC_TIMEOUT_MS="4000",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(jobs.parent / "tap-worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "service.tap_worker", "worker", "-Q", "tap",
         "--pool", "solo", "--hostname", f"tap{os.getpid()}@%h", "--loglevel", "INFO"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = create_app(tap_settings(tap_db[0], tap_db[1], broker_url=broker,
                                  tap_job_dir=str(jobs), tap_async_timeout_ms=4000,
                                  tap_async_jobs_per_client=1))
    with serving(app) as base:
        yield base + "/tap"
    app.extensions["lamost_vac"].dispose()
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=20)
    log.close()


def test_celery_worker_runs_async_jobs_and_an_abort_holds(worker_tap_url, tap_db):
    service = pyvo.dal.TAPService(worker_tap_url)
    expected_ids, _ = expected_cone(tap_db[2], 0.0, 0.0, 0.3)
    job = service.submit_job(cone_adql("v_spectra", 0.0, 0.0, 0.3), maxrec=100000)
    job.run().wait(timeout=120)
    assert job.phase == "COMPLETED"
    result = job.fetch_result()
    assert sorted(int(x) for x in result.to_table()["obsid"]) == sorted(expected_ids)
    # the worker wrote the result as the service would: its rows' DataLink descriptor
    # leads to the service's URL, where the job was created
    links = result.get_adhocservice_by_ivoid("ivo://ivoa.net/std/DataLink")
    assert {p.name: p.value for p in links.params}["accessURL"] == \
        worker_tap_url.removesuffix("/tap") + "/datalink/links"

    # A runaway query: aborted while the worker runs it, it stays ABORTED when the
    # worker's statement is cancelled by the async timeout.
    slow = service.submit_job("SELECT COUNT(*) FROM spectra AS a, spectra AS b, "
                              "spectra AS c WHERE a.snrg + b.snrg > c.snrg")
    slow.run().wait(phases={"EXECUTING", "COMPLETED", "ERROR"}, timeout=120)
    assert slow.phase == "EXECUTING"
    # One job at a time per client here: a second one stays PENDING, with a message.
    import requests

    waiting = service.submit_job("SELECT TOP 1 obsid FROM spectra")
    refused = requests.post(f"{waiting.url}/phase", data={"PHASE": "RUN"}, timeout=30,
                            allow_redirects=False)
    assert refused.status_code == 429
    assert "already has 1 jobs queued or executing" in tap_error_message(refused)
    assert waiting.phase == "PENDING"
    slow.abort()
    assert slow.phase == "ABORTED"
    follow = service.submit_job("SELECT TOP 1 obsid FROM spectra")
    follow.run().wait(timeout=120)      # the worker has finished the aborted query too
    assert follow.phase == "COMPLETED"
    assert slow.phase == "ABORTED"


# ---------------------------------------------------------------------------------------
# UPLOAD: a target list cross-matched against the catalogue through the Q3C index
def target_list(cat, every=100, offset_arcsec=1.0):
    """Targets 1 arcsec east of every ``every``-th spectrum (cos dec folded in), plus
    one far from any spectrum."""
    from astropy.table import Table

    index = np.arange(0, len(cat["obsid"]), every)
    dec = cat["dec"][index]
    keep = np.abs(dec) < 89.0         # RA offsets blow up at the poles
    index, dec = index[keep], dec[keep]
    ra = (cat["ra"][index] + offset_arcsec / 3600 / np.cos(np.radians(dec))) % 360.0
    table = Table({"target": [f"t{i}" for i in index] + ["nowhere"],
                   "RA": np.append(ra, 123.0), "Dec": np.append(dec, -45.0)})
    return table, {f"t{i}": int(cat["obsid"][i]) for i in index}


CROSSMATCH = ("SELECT u.target, s.obsid, DISTANCE(POINT('ICRS', s.ra, s.dec), "
              "POINT('ICRS', u.ra, u.dec)) AS dist FROM TAP_UPLOAD.targets AS u "
              "JOIN spectra AS s ON 1 = CONTAINS(POINT('ICRS', s.ra, s.dec), "
              "CIRCLE('ICRS', u.ra, u.dec, 2.0 / 3600))")


def nearest_matches(table):
    """{target: obsid of its nearest spectrum}."""
    best = {}
    for row in table:
        target, obsid, dist = str(row["target"]), int(row["obsid"]), float(row["dist"])
        if target not in best or dist < best[target][1]:
            best[target] = (obsid, dist)
    return {target: obsid for target, (obsid, _) in best.items()}


def test_pyvo_upload_crossmatch_sync_and_async(tap_url, tap_db):
    targets, expected = target_list(tap_db[2])
    service = pyvo.dal.TAPService(tap_url)
    synced = service.run_sync(CROSSMATCH, uploads={"targets": targets}, maxrec=100000)
    matched = synced.to_table()
    assert nearest_matches(matched) == expected          # "nowhere" matches nothing
    assert np.allclose(np.asarray(matched["dist"], dtype=float) * 3600 >= 0, True)
    job = service.submit_job(CROSSMATCH, uploads={"targets": targets}, maxrec=100000)
    job.run().wait(timeout=60)
    assert job.phase == "COMPLETED"
    assert nearest_matches(job.fetch_result().to_table()) == expected

    # The result of a job of this service may be uploaded by URL; other URLs are not.
    again = service.run_sync("SELECT COUNT(*) AS n FROM TAP_UPLOAD.previous",
                             uploads={"previous": job.result_uri})
    assert int(again.to_table()["n"][0]) == len(matched)
    with pytest.raises(pyvo.dal.DALQueryError, match="a URL upload must be the result"):
        service.run_sync("SELECT * FROM TAP_UPLOAD.x",
                         uploads={"x": "http://169.254.169.254/latest/meta-data"})
    job.delete()


def test_upload_crossmatch_uses_the_q3c_index(tap_app, tap_db):
    from service import tap_upload

    targets, _ = target_list(tap_db[2], every=1000)
    buffer = io.BytesIO()
    targets.write(buffer, format="votable")
    uploaded = tap_upload.read_votable("targets", buffer.getvalue(), 1000, 5_000_000)
    crossmatch = adql.translate(CROSSMATCH, maxrows=100, uploads={"targets": uploaded})
    engine = tap_app.extensions["lamost_vac"].tap_engine
    with engine.connect() as connection:
        # 3,000 spectra are few enough for the planner to prefer a scan; what is shown
        # is that the translated join condition is one the Q3C index can serve (on a
        # real catalogue the planner then chooses it, as for the cone above).
        connection.exec_driver_sql("SET enable_seqscan = off")
        try:
            plan = "\n".join(r[0] for r in connection.exec_driver_sql(
                "EXPLAIN " + crossmatch.sql, crossmatch.parameters))
        finally:
            connection.exec_driver_sql("RESET enable_seqscan")
    assert "spectra_q3c_idx" in plan, plan[:500]


def test_upload_limits_and_bad_uploads_are_errors(client, tap_app):
    from astropy.table import Table

    limits = tap_app.extensions["lamost_vac"].limits
    big = Table({"ra": np.zeros(limits.tap_upload_max_rows + 1),
                 "dec": np.zeros(limits.tap_upload_max_rows + 1)})
    buffer = io.BytesIO()
    big.write(buffer, format="votable")
    for upload, files, fragment in [
            ("t,param:t", {"t": (io.BytesIO(buffer.getvalue()), "t.vot")},
             f"at most {limits.tap_upload_max_rows} are accepted"),
            ("t,param:t", {"t": (io.BytesIO(b"not xml"), "t.vot")},
             "UPLOAD t: not a readable VOTable"),
            ("t,param:missing", {"t": (io.BytesIO(b"x"), "t.vot")},
             "no part named 'missing'"),
            ("1t,param:t", {"t": (io.BytesIO(b"x"), "t.vot")}, "is not a table name"),
            ("t,file:///etc/passwd", {}, "neither param:part nor an http(s) URL"),
    ]:
        response = client.post("/tap/sync", content_type="multipart/form-data", data={
            "LANG": "ADQL", "QUERY": "SELECT * FROM TAP_UPLOAD.t", "UPLOAD": upload,
            **files})
        assert response.status_code == 400
        assert fragment in tap_error_message(response)
    response = sync(client, "SELECT * FROM TAP_UPLOAD.nothing")
    assert "no table nothing was uploaded" in tap_error_message(response)
