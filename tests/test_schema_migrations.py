"""The Alembic migrations build exactly etl.schema (plus Q3C, views, read-only role),
on SQLite and on PostgreSQL; on PostgreSQL the reader role can read and nothing else,
checked with the real psql client logged in as that role."""
import os

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from etl import db, schema
from etl.settings import Settings
from service.db import make_service_engine
from conftest import assert_refused, psql

EXPECTED_TABLES = {"ingest_runs", "spectra", "reference_labels", "crossmatch", "models",
                   "estimates", "estimate_failures", "quarantine"}


def test_migrations_create_every_table_view_and_index(catalogue_engine):
    inspector = inspect(catalogue_engine)
    assert EXPECTED_TABLES <= set(inspector.get_table_names())
    assert set(schema.VIEWS) <= set(inspector.get_view_names())
    assert db.current_revision(str(catalogue_engine.url.render_as_string(False))) \
        == db.head_revision()
    for table in ("spectra", "reference_labels"):
        # the zone index is SQLite's cone index; PostgreSQL has Q3C (migration 0004)
        index_names = {ix["name"] for ix in inspector.get_indexes(table)}
        assert (f"ix_{table}_zone_ra" in index_names) == (not db.is_postgres(catalogue_engine))
    unique_sets = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("estimates")}
    assert ("obsid", "model_version") in unique_sets
    if db.is_postgres(catalogue_engine):
        with catalogue_engine.connect() as connection:
            assert connection.exec_driver_sql(
                "SELECT extversion FROM pg_extension WHERE extname = 'q3c'").scalar()
            q3c_indexes = dict(connection.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE '%%q3c_idx'"
            ).all())
            assert set(q3c_indexes) == {"spectra_q3c_idx", "reference_labels_q3c_idx"}
            assert all("q3c_ang2ipix" in d for d in q3c_indexes.values())
            clustered = connection.exec_driver_sql(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                "WHERE i.indisclustered").scalars().all()
            assert {"spectra", "reference_labels"} <= set(clustered)
            # the planner's statistics of etl.inference.star_condition (migration 0005)
            assert connection.exec_driver_sql(
                "SELECT 1 FROM pg_statistic_ext WHERE stxname = 'spectra_star_class'").scalar()


def test_migrated_database_matches_the_schema(catalogue_engine):
    """No drift: autogenerate finds nothing to change after the migration."""
    with catalogue_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "include_object": db.migration_include_object, "compare_type": True})
        assert compare_metadata(context, schema.metadata) == []


def test_downgrade_to_empty_and_upgrade_again(make_database, catalogue_url):
    url = make_database(catalogue_url.split(":", 1)[0].split("+")[0])
    db.upgrade(url)
    db.downgrade(url, "base")
    engine = db.make_engine(url)
    try:
        assert not (EXPECTED_TABLES & set(inspect(engine).get_table_names()))
        engine.dispose()
        db.upgrade(url)
        assert EXPECTED_TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrating_the_models_table_keeps_the_estimates(make_database, catalogue_url):
    """Migration 0008 (the pending status) copies ``models`` on SQLite; with the foreign
    keys of the estimates on, dropping the original failed on any catalogue holding an
    estimate, and left the copy behind (found by review)."""
    url = make_database(catalogue_url.split(":", 1)[0].split("+")[0])
    db.upgrade(url, "0007")
    engine = db.make_engine(url)
    now = "2026-12-01 00:00:00"
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO spectra (obsid, ra, dec, zone) VALUES (1, 10, 20, 0)"))
            for version, status in (("m-old", "retired"), ("m-now", "current")):
                connection.execute(text(
                    "INSERT INTO models (version, created_at, artifact_path, artifact_sha256, "
                    "training_set, status) VALUES (:v, :t, '/m.joblib', :h, '{}', :s)"),
                    {"v": version, "t": now, "h": "0" * 64, "s": status})
                connection.execute(text(
                    "INSERT INTO estimates (obsid, model_version, teff, code_version, "
                    "preprocessing_hash, run_id, created_at) VALUES (1, :v, 5800, '0', '0', 'r', :t)"),
                    {"v": version, "t": now})
            connection.execute(text(
                "INSERT INTO estimate_failures (obsid, model_version, stage, reason, created_at) "
                "VALUES (1, 'm-old', 'read', 'unreadable', :t)"), {"t": now})
        engine.dispose()
        db.upgrade(url)

        def rows():
            with engine.connect() as connection:
                return [connection.execute(text(query)).all() for query in (
                    "SELECT version, status FROM models ORDER BY version",
                    "SELECT model_version, teff FROM estimates ORDER BY model_version",
                    "SELECT model_version FROM estimate_failures",
                    "SELECT model_version FROM v_current_estimates")]

        assert rows() == [[("m-now", "current"), ("m-old", "retired")],
                          [("m-now", 5800.0), ("m-old", 5800.0)], [("m-old",)], [("m-now",)]]
        with engine.begin() as connection:
            connection.execute(text("UPDATE models SET status = 'pending' WHERE version = 'm-old'"))
        assert "_alembic_tmp_models" not in inspect(engine).get_table_names()
        engine.dispose()
        db.downgrade(url, "0007")           # a pending version goes back as retired
        assert rows()[0] == [("m-now", "current"), ("m-old", "retired")]
        assert rows()[1:] == [[("m-now", 5800.0), ("m-old", 5800.0)], [("m-old",)], [("m-now",)]]
    finally:
        engine.dispose()


def test_read_only_access_cannot_write(catalogue_engine, catalogue_url):
    """The reader (PostgreSQL role lamost_vac_reader, the API's; SQLite opened mode=ro)
    can read every table and view but the quarantine (PostgreSQL) and cannot write."""
    reader = db.make_engine(db.reader_url_for(catalogue_url))
    postgres = db.is_postgres(reader)
    try:
        with reader.connect() as connection:
            for name in sorted(EXPECTED_TABLES | set(schema.VIEWS)):
                if postgres and name == "quarantine":
                    continue
                connection.execute(text(f"SELECT count(*) FROM {name}")).scalar()
        with pytest.raises(Exception) as caught:
            with reader.begin() as connection:
                connection.execute(text(
                    "INSERT INTO ingest_runs (run_id, kind, status, started_at) "
                    "VALUES ('x', 'test', 'running', CURRENT_TIMESTAMP)"))
        assert any(word in str(caught.value).lower()
                   for word in ("permission denied", "readonly", "read-only"))
    finally:
        reader.dispose()


def test_column_metadata_is_declared_once_and_described(catalogue_engine):
    ra = schema.column_info("spectra", "ra")
    assert (ra.unit, ra.ucd, ra.kind) == ("deg", "pos.eq.ra;meta.main", "float")
    assert ra.votable_datatype == "double"
    described = schema.describe_columns("spectra", ["obsid", "class", "estimates.teff_err"])
    assert [d.name for d in described] == ["obsid", "class", "teff_err"]
    assert described[2].unit == "K" and described[2].ucd.startswith("stat.error")
    for table in schema.metadata.sorted_tables:
        for column in table.columns:
            assert column.info.get("description"), f"{table.name}.{column.name} undocumented"


# ---------------------------------------------------------------------------------------
# PostgreSQL roles (migration 0002), tried with psql as the role itself.
@pytest.fixture(scope="module")
def pg_catalogue(make_database):
    """A migrated PostgreSQL catalogue of this module (roles exist on PostgreSQL only)."""
    url = make_database("postgresql")
    db.upgrade(url)
    return url


@pytest.fixture
def pg_engine(pg_catalogue):
    """Superuser engine on ``pg_catalogue``."""
    engine = db.make_engine(pg_catalogue)
    yield engine
    engine.dispose()


def as_reader(url, sql):
    return psql(url, sql, schema.READER_ROLE)


def test_reader_cannot_store_large_objects(pg_catalogue, pg_engine, tmp_path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"persistent bytes")
    os.chmod(tmp_path, 0o755)                      # readable by the server for lo_import
    for statement in ("SELECT lo_from_bytea(0, 'abc'::bytea)", "SELECT lo_create(0)",
                      "SELECT lo_creat(-1)", f"SELECT lo_import('{payload}')",
                      f"\\lo_import {payload}"):     # psql's client-side import
        assert_refused(as_reader(pg_catalogue, statement), "permission denied for function lo_")
    with pg_engine.connect() as connection:
        assert connection.exec_driver_sql(
            "SELECT count(*) FROM pg_largeobject_metadata").scalar() == 0


def test_reader_cannot_create_temporary_tables_or_functions(pg_catalogue):
    no_temp = "permission denied to create temporary tables"
    for statement, message in [
            ("CREATE TEMP TABLE scratch (x int)", no_temp),
            ("CREATE TABLE pg_temp.scratch (x int)", no_temp),
            ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", no_temp),
            ("CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
             "permission denied for schema public"),
            ("CREATE VIEW public.scratch AS SELECT 1", "permission denied for schema public"),
            ("CREATE SCHEMA scratch", "permission denied for database")]:
        assert_refused(as_reader(pg_catalogue, statement), message)


def test_reader_cannot_write_any_table(pg_catalogue, pg_engine):
    tables = [table.name for table in schema.metadata.sorted_tables] + ["alembic_version"]
    with pg_engine.connect() as connection:
        first_columns = dict(connection.exec_driver_sql(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND ordinal_position = 1").all())
        sequences = connection.exec_driver_sql(
            "SELECT sequence_name FROM information_schema.sequences "
            "WHERE sequence_schema = 'public'").scalars().all()
    for table in tables:
        column = first_columns[table]
        for statement in (f"INSERT INTO {table} DEFAULT VALUES",
                          f"UPDATE {table} SET {column} = {column}",
                          f"DELETE FROM {table}", f"TRUNCATE {table} CASCADE"):
            assert_refused(as_reader(pg_catalogue, statement),
                           f"permission denied for table {table}")
    for view in schema.VIEWS:               # a view of joins is not updatable for anyone
        result = as_reader(pg_catalogue, f"DELETE FROM {view}")
        assert result.returncode != 0 and (f"permission denied for view {view}" in result.stderr
                                           or "cannot delete from view" in result.stderr), result
    assert_refused(as_reader(pg_catalogue, "DELETE FROM v_spectra"),   # one table: updatable
                   "permission denied for view v_spectra")
    assert len(sequences) == 3
    for sequence in sequences:
        assert_refused(as_reader(pg_catalogue, f"SELECT nextval('{sequence}')"),
                       f"permission denied for sequence {sequence}")


def test_reader_reads_every_table_but_the_quarantine_and_every_view(pg_catalogue, pg_engine):
    with pg_engine.begin() as connection:
        connection.execute(schema.spectra.insert().values(obsid=101, ra=10.5, dec=-5.0, zone=0))
    result = as_reader(pg_catalogue, "SELECT obsid, ra, dec FROM v_spectra")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["101|10.5|-5"]
    for name in [t.name for t in schema.metadata.sorted_tables] + list(schema.VIEWS):
        result = as_reader(pg_catalogue, f"SELECT count(*) FROM {name}")
        if name == "quarantine":            # migration 0007: the API never reads it
            assert_refused(result, "permission denied for table quarantine")
        else:
            assert result.returncode == 0, result.stderr


def test_reader_sessions_are_limited(pg_catalogue):
    """The role's defaults hold for SQL users (psql, SQLAlchemy); the API still sets its own
    statement timeout per session; the role has a connection limit."""
    for name, value in schema.READER_SESSION_SETTINGS.items():
        result = as_reader(pg_catalogue, f"SHOW {name}")
        assert result.returncode == 0 and result.stdout.strip() == value, result
    reader_url = db.reader_url_for(pg_catalogue)
    engine = db.make_engine(reader_url)
    service_engine = make_service_engine(Settings(
        database_url=pg_catalogue, reader_database_url=reader_url, statement_timeout_ms=2500))
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == \
                schema.READER_SESSION_SETTINGS["statement_timeout"]
            limit, superuser = connection.exec_driver_sql(
                "SELECT rolconnlimit, rolsuper FROM pg_roles WHERE rolname = current_user").one()
        assert (limit, superuser) == (schema.READER_CONNECTION_LIMIT, False)
        with service_engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "2500ms"
    finally:
        engine.dispose()
        service_engine.dispose()


def test_writer_owns_every_table_and_view(pg_engine):
    """Later migrations must hand what they create to the writer (it ANALYZEs and CLUSTERs
    its tables); only Alembic's own table stays with the role that migrates."""
    with pg_engine.connect() as connection:
        owners = dict(connection.exec_driver_sql(
            "SELECT relname, pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S') "
            "AND relname <> 'alembic_version'").all())
    assert {t.name for t in schema.metadata.sorted_tables} | set(schema.VIEWS) <= set(owners)
    assert set(owners.values()) == {schema.WRITER_ROLE}


def test_downgrading_the_roles_migration_changes_only_its_database(make_database):
    kept, downgraded = make_database("postgresql"), make_database("postgresql")
    db.upgrade(kept)
    db.upgrade(downgraded)
    db.downgrade(downgraded, "0001")
    timeout = schema.READER_SESSION_SETTINGS["statement_timeout"]
    assert as_reader(downgraded, "SHOW statement_timeout").stdout.strip() != timeout
    result = as_reader(downgraded, "CREATE TEMP TABLE scratch (x int)")
    assert result.returncode == 0, result.stderr          # what 0002 takes away
    assert as_reader(kept, "SHOW statement_timeout").stdout.strip() == timeout
    assert_refused(as_reader(kept, "CREATE TEMP TABLE scratch (x int)"),
                   "permission denied to create temporary tables")
    db.upgrade(downgraded)                                  # again, with the roles existing
    assert_refused(as_reader(downgraded, "CREATE TEMP TABLE scratch (x int)"),
                   "permission denied to create temporary tables")


def test_planner_knows_how_many_spectra_are_stars(pg_catalogue, pg_engine):
    """The stale set's STAR condition is an expression the planner has statistics of
    (migration 0005): without them it guessed 0.5% of the rows and probed the estimates
    once per spectrum (22 s for an empty stale set of 11 M spectra)."""
    import json

    from sqlalchemy import func, select

    from etl.inference import star_condition

    spectra = schema.spectra
    first = 10 ** 12                                  # clear of the module's other rows
    with pg_engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO spectra (obsid, ra, dec, zone, class) "
            "SELECT i, i %% 360, 0, 0, CASE WHEN i %% 10 = 0 THEN 'GALAXY' ELSE ' star ' END "
            "FROM generate_series(%(first)s, %(first)s + 19999) AS i", {"first": first})
        connection.exec_driver_sql("ANALYZE spectra")
        query = select(func.count()).select_from(spectra).where(star_condition())
        stars = connection.execute(query).scalar_one()
        statement = query.compile(connection)
        plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement.string}",
                                          statement.params).scalar()
        connection.execute(spectra.delete().where(spectra.c.obsid >= first))
    plan = json.loads(plan) if isinstance(plan, str) else plan
    scan = plan[0]["Plan"]
    while "Plans" in scan:
        scan = scan["Plans"][0]
    assert stars >= 18000 and 0.8 * stars <= scan["Plan Rows"] <= 1.2 * stars, (stars, scan)
