"""The Alembic migrations build exactly etl.schema (plus Q3C, views, read-only role),
on SQLite and on PostgreSQL."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from etl import db, schema

EXPECTED_TABLES = {"ingest_runs", "spectra", "reference_labels", "crossmatch", "models",
                   "estimates", "estimate_failures", "quarantine"}


def test_migrations_create_every_table_view_and_index(catalogue_engine):
    inspector = inspect(catalogue_engine)
    assert EXPECTED_TABLES <= set(inspector.get_table_names())
    assert set(schema.VIEWS) <= set(inspector.get_view_names())
    assert db.current_revision(str(catalogue_engine.url.render_as_string(False))) \
        == db.head_revision()
    index_names = {ix["name"] for ix in inspector.get_indexes("spectra")}
    assert "ix_spectra_zone_ra" in index_names
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


def test_read_only_access_cannot_write(catalogue_engine, catalogue_url):
    """The reader (PostgreSQL role lamost_vac_reader; SQLite opened mode=ro) can read
    every table and view but cannot write."""
    reader = db.make_engine(db.reader_url_for(catalogue_url))
    try:
        with reader.connect() as connection:
            for name in sorted(EXPECTED_TABLES | set(schema.VIEWS)):
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
