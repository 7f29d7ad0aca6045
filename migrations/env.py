"""Alembic environment: the target is etl.schema.metadata; the URL comes from the caller's
Config (``sqlalchemy.url``) or else from LAMOST_VAC_DATABASE_URL."""
from alembic import context

from etl import db, schema
from etl.settings import settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = schema.metadata


include_object = db.migration_include_object


def database_url():
    return db.normalise_url(config.get_main_option("sqlalchemy.url") or settings.database_url)


def run_migrations_offline():
    context.configure(url=database_url(), target_metadata=target_metadata,
                      literal_binds=True, include_object=include_object,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = db.make_engine(database_url())
    with engine.connect() as connection:
        _run_with(connection)
    engine.dispose()


def _run_with(connection):
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # SQLite cannot ALTER most things: a migration copies the table and drops the
        # original (batch mode), which the foreign keys to it refuse once it holds rows.
        # The pragma is ignored inside a transaction: off before it, the keys checked after.
        connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        connection.commit()
    context.configure(connection=connection, target_metadata=target_metadata,
                      include_object=include_object, compare_type=True, render_as_batch=sqlite)
    with context.begin_transaction():
        context.run_migrations()
    if sqlite:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        connection.exec_driver_sql("PRAGMA foreign_keys = ON")
        connection.commit()
        if broken:
            raise RuntimeError(f"the migration left rows that break a foreign key: {broken[:5]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
