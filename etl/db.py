"""Engines, sessions and the few places where PostgreSQL and SQLite differ.

* Positions: Q3C on PostgreSQL; declination zones (``zone`` column + (zone, ra) index) on
  SQLite. :func:`cone_condition` hides the difference for cone searches.
* Bulk loading: :func:`bulk_upsert` COPYs into a temporary staging table then runs one
  ``INSERT ... SELECT ... ON CONFLICT`` on PostgreSQL; on SQLite it stages with
  ``executemany``. Both report inserted / updated / unchanged counts, and both only touch
  a stored row when a value differs, so re-running an ingest changes nothing.
"""
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import sessionmaker

from etl import schema
from etl.settings import settings


DATABASE_URL_FORMS = "postgresql://USER@HOST:PORT/DATABASE or sqlite:///PATH"


def normalise_url(url: str) -> str:
    """Use the psycopg (3) driver for plain ``postgresql://`` URLs; ValueError for anything
    but a PostgreSQL or SQLite URL (the message never shows a password)."""
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL; expected {DATABASE_URL_FORMS}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ValueError(f"{parsed.render_as_string(hide_password=True)}: the catalogue lives "
                         f"in PostgreSQL or SQLite; expected {DATABASE_URL_FORMS}")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str = None, **kwargs) -> Engine:
    """An engine for ``url`` (default: the configured writer URL)."""
    url = normalise_url(url or settings.database_url)
    if url.startswith("sqlite"):
        _make_sqlite_folder(url)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _make_sqlite_folder(url):
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        folder = os.path.dirname(os.path.abspath(database))
        os.makedirs(folder, exist_ok=True)


def _configure_sqlite_connection(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    if not cursor.execute("PRAGMA query_only").fetchone()[0]:
        try:
            # WAL lets the read-only service read while an ingest writes.
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        except Exception:  # noqa: BLE001 -- a read-only (mode=ro) file keeps its mode
            pass
    cursor.close()
    dbapi_connection.create_function("ang_sep_deg", 4, angular_separation_deg, deterministic=True)


def reader_url_for(url: str, role: str = None) -> str:
    """A read-only URL for the database at ``url``.

    PostgreSQL: the same database as the ``lamost_vac_reader`` role (its password comes
    from the environment, e.g. PGPASSWORD or ~/.pgpass, never from the writer URL). SQLite: the same file opened
    read-only (``mode=ro``), so the embedded service cannot write either.
    """
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() == "postgresql":
        # The reader has its own password (PGPASSWORD / .pgpass), never the writer's.
        return parsed._replace(username=role or schema.READER_ROLE, password=None) \
            .render_as_string(hide_password=False)
    database = parsed.database
    if not database or database == ":memory:":
        raise ValueError("an in-memory SQLite database has no read-only view")
    return f"sqlite:///file:{os.path.abspath(database)}?mode=ro&uri=true"


def make_reader_engine(url: str = None, **kwargs) -> Engine:
    """Engine for read-only access: ``settings.reader_url`` unless ``url`` is given."""
    return make_engine(url or settings.reader_url, **kwargs)


def make_session_factory(engine: Engine = None):
    return sessionmaker(bind=engine or make_engine(), expire_on_commit=False)


def is_postgres(bind) -> bool:
    return bind.dialect.name == "postgresql"


# ---------------------------------------------------------------------------------------
# Positions
def zone_of(dec: float) -> int:
    """Declination zone of ``dec`` (degrees) for the SQLite cone index."""
    zone = int(math.floor((dec + 90.0) / schema.ZONE_HEIGHT_DEG))
    return min(zone, zone_count() - 1)


def zone_count() -> int:
    return int(math.ceil(180.0 / schema.ZONE_HEIGHT_DEG))


def angular_separation_deg(ra1, dec1, ra2, dec2):
    """Great-circle distance in degrees (Vincenty formula: exact at all separations)."""
    if None in (ra1, dec1, ra2, dec2):
        return None
    lon1, lat1, lon2, lat2 = map(math.radians, (ra1, dec1, ra2, dec2))
    dlon = lon2 - lon1
    sin_lat1, cos_lat1 = math.sin(lat1), math.cos(lat1)
    sin_lat2, cos_lat2 = math.sin(lat2), math.cos(lat2)
    num1 = cos_lat2 * math.sin(dlon)
    num2 = cos_lat1 * sin_lat2 - sin_lat1 * cos_lat2 * math.cos(dlon)
    denominator = sin_lat1 * sin_lat2 + cos_lat1 * cos_lat2 * math.cos(dlon)
    return math.degrees(math.atan2(math.hypot(num1, num2), denominator))


def ra_ranges(ra: float, dec: float, radius_deg: float):
    """RA intervals (degrees, within [0, 360]) that contain a cone, split at RA = 0/360."""
    top = min(abs(dec) + radius_deg, 90.0)
    if top >= 89.999999 or radius_deg >= 180:
        return [(0.0, 360.0)]
    half_width = math.degrees(math.asin(min(1.0, math.sin(math.radians(radius_deg))
                                            / math.cos(math.radians(top)))))
    # sin(r)/cos(top) bounds the RA half-width of the cone (exact bound of the small circle).
    low, high = ra - half_width, ra + half_width
    if high - low >= 360:
        return [(0.0, 360.0)]
    if low < 0:
        return [(0.0, high), (low + 360.0, 360.0)]
    if high > 360:
        return [(low, 360.0), (0.0, high - 360.0)]
    return [(low, high)]


def cone_condition(table, ra: float, dec: float, radius_deg: float, bind):
    """A WHERE condition selecting ``table`` rows within ``radius_deg`` of (ra, dec).

    PostgreSQL: ``q3c_radial_query`` (uses the Q3C index, exact). SQLite: zone and RA
    ranges (use the (zone, ra) index) plus the exact distance via ``ang_sep_deg``.
    """
    from sqlalchemy import and_, func, or_

    if is_postgres(bind):
        return func.q3c_radial_query(table.c.ra, table.c.dec, ra, dec, radius_deg)
    low_zone = zone_of(max(dec - radius_deg, -90.0))
    high_zone = zone_of(min(dec + radius_deg, 90.0))
    ra_clause = or_(*[table.c.ra.between(low, high) for low, high in ra_ranges(ra, dec, radius_deg)])
    return and_(
        table.c.zone.between(low_zone, high_zone),
        ra_clause,
        func.ang_sep_deg(table.c.ra, table.c.dec, ra, dec) <= radius_deg,
    )


def distance_deg(table, ra: float, dec: float, bind):
    """SQL expression: angular distance (degrees) of ``table`` rows from (ra, dec)."""
    from sqlalchemy import func

    if is_postgres(bind):
        return func.q3c_dist(table.c.ra, table.c.dec, ra, dec)
    return func.ang_sep_deg(table.c.ra, table.c.dec, ra, dec)


# ---------------------------------------------------------------------------------------
# Bulk upsert
def _refused_data_errors():
    """Exceptions meaning "the database refused these values" (a value out of range, too
    long, badly encoded, a constraint violated) -- as opposed to the database being
    unreachable or broken. SQLAlchemy wraps the driver's errors in statements it runs;
    COPY talks to psycopg directly, so its own classes are listed too."""
    import sqlite3

    from sqlalchemy import exc

    errors = [exc.DataError, exc.IntegrityError, sqlite3.DataError, sqlite3.IntegrityError]
    try:
        import psycopg

        errors += [psycopg.DataError, psycopg.IntegrityError]
    except ImportError:     # SQLite-only installation
        pass
    return tuple(errors)


REFUSED_DATA_ERRORS = _refused_data_errors()


def error_message(error) -> str:
    """One line saying why the database refused something (no traceback, no SQL)."""
    original = getattr(error, "orig", None) or error
    diag = getattr(original, "diag", None)
    if diag is not None and diag.message_primary:
        parts = [diag.message_primary]
        if diag.message_detail:
            parts.append(diag.message_detail)
        if diag.context:
            parts.append(diag.context.splitlines()[0])
        return "; ".join(parts)
    lines = str(original).strip().splitlines()
    return lines[0] if lines else type(original).__name__


@dataclass
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    def __iadd__(self, other):
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        return self


def bulk_upsert(connection, table, rows, key_columns, compare_columns=None, columns=None,
                keep_when_null=()):
    """Insert ``rows`` or update the stored rows whose key exists.

    ``rows``: tuples in the order of ``columns`` (default: every column of ``table``).
    ``key_columns``: the conflict target (a primary key or unique constraint).
    An existing row is updated only when one of ``compare_columns`` (default: every
    non-key column) differs, so bookkeeping columns left out of the comparison (a run id)
    keep the value of the run that really wrote the row. A NULL arriving for a column in
    ``keep_when_null`` keeps the stored value (partial input never erases data).
    Runs in the caller's transaction; returns :class:`UpsertCounts`.
    """
    if not rows:
        return UpsertCounts()
    columns = columns or [c.name for c in table.columns]
    staging = stage_rows(connection, table, rows, columns)
    return merge_staged(connection, table, staging, columns, key_columns, compare_columns,
                        keep_when_null, len(rows))


def stage_rows(connection, table, rows, columns) -> str:
    """Load ``rows`` (tuples in ``columns`` order) into an empty session-temporary copy of
    ``table`` (COPY on PostgreSQL) and return its name; :func:`merge_staged` upserts it.

    The two halves are separate so that a loader can stage the next batch (Python-bound)
    while the database merges the previous one.
    """
    staging = f"staging_{table.name}"
    create_staging(connection, table.name, staging, columns)
    if is_postgres(connection):
        copy_rows(connection, staging, columns, rows)
    elif rows:
        placeholders = ", ".join("?" for _ in columns)
        connection.exec_driver_sql(
            f"INSERT INTO {staging} ({_quoted(columns)}) VALUES ({placeholders})", rows)
    return staging


def merge_staged(connection, table, staging, columns, key_columns, compare_columns,
                 keep_when_null, total):
    """Upsert the ``total`` rows that :func:`stage_rows` put in ``staging`` into ``table``
    and drop ``staging``; see :func:`bulk_upsert`."""
    counts = merge_staging(connection, table.name, staging, columns, key_columns,
                           compare_columns, keep_when_null, total)
    connection.exec_driver_sql(f"DROP TABLE {staging}")
    return counts


def insert_ignore(connection, table, rows, conflict_columns):
    """Insert dict ``rows``, silently skipping those that hit the unique ``conflict_columns``."""
    if not rows:
        return
    if is_postgres(connection):
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    statement = dialect_insert(table).on_conflict_do_nothing(index_elements=conflict_columns)
    connection.execute(statement, rows)


def _quoted(names):
    return ", ".join(f'"{n}"' for n in names)


def create_staging(connection, table_name, staging, columns):
    """An empty session-temporary table ``staging`` with ``columns`` of ``table_name``."""
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {staging}")
    # Same column types, no constraints or indexes: COPY into it runs at full speed.
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {staging} AS SELECT {_quoted(columns)} FROM {table_name} "
        f"WHERE 1 = 0")


def copy_rows(connection, table_name, columns, rows):
    """COPY ``rows`` into ``table_name`` (PostgreSQL, psycopg 3)."""
    raw = connection.connection.driver_connection
    with raw.cursor() as cursor:
        with cursor.copy(f"COPY {table_name} ({_quoted(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def null_safe_differs(connection) -> str:
    """The dialect's "differs" operator that compares NULL as a value."""
    return "IS DISTINCT FROM" if is_postgres(connection) else "IS NOT"


def merge_staging(connection, table_name, staging, columns, key_columns, compare_columns,
                  keep_when_null, total):
    """Upsert the ``total`` rows of a staging table into ``table_name``: every non-key
    column is written; see :func:`bulk_upsert` for the rest."""
    compare_columns = compare_columns or [c for c in columns if c not in key_columns]
    update_columns = [c for c in columns if c not in key_columns]
    keep_when_null = set(keep_when_null)
    postgres = is_postgres(connection)
    distinct = null_safe_differs(connection)

    def incoming(column, new, old):
        return f'COALESCE({new}."{column}", {old}."{column}")' if column in keep_when_null \
            else f'{new}."{column}"'

    excluded_differs = " OR ".join(
        f'{incoming(c, "excluded", table_name)} {distinct} {table_name}."{c}"'
        for c in compare_columns)
    assignments = ", ".join(f'"{c}" = {incoming(c, "excluded", table_name)}'
                            for c in update_columns)
    order = insert_order(connection, columns)
    # "WHERE true" keeps SQLite's parser from reading ON CONFLICT as a join constraint.
    upsert = (f"INSERT INTO {table_name} ({_quoted(columns)}) "
              f"SELECT {_quoted(columns)} FROM {staging} WHERE true "
              f"{f'ORDER BY {order} ' if order else ''}"
              f"ON CONFLICT ({_quoted(key_columns)}) DO UPDATE SET {assignments} "
              f"WHERE {excluded_differs}")
    if postgres:
        # xmax = 0 marks a freshly inserted tuple; rows left unchanged are not returned.
        inserted, updated = connection.exec_driver_sql(
            f"WITH written AS ({upsert} RETURNING (xmax = 0) AS inserted) "
            f"SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
            f"FROM written").one()
        return UpsertCounts(inserted=inserted, updated=updated,
                            unchanged=total - inserted - updated)
    key_match = " AND ".join(f't."{k}" = s."{k}"' for k in key_columns)
    differs = " OR ".join(f'{incoming(c, "s", "t")} IS NOT t."{c}"' for c in compare_columns)
    existing, changed = connection.exec_driver_sql(
        f"SELECT count(*), coalesce(sum(CASE WHEN {differs} THEN 1 ELSE 0 END), 0) "
        f"FROM {staging} s JOIN {table_name} t ON {key_match}").one()
    connection.exec_driver_sql(upsert)
    return UpsertCounts(inserted=total - existing, updated=changed, unchanged=existing - changed)


def insert_order(connection, columns):
    """The order a merge inserts rows with ``columns`` in: rows with a position by sky
    position (Q3C pixel on PostgreSQL, zone and RA on SQLite), so that consecutive rows
    land on neighbouring pages of the position index instead of anywhere in it (100,000
    rows into 2 M spectra: 1.6 s instead of 2.0-2.5 s with the zone index gone, 1.9
    instead of 2.2 with it). None: the staging order."""
    if not {"ra", "dec"} <= set(columns):
        return None
    if is_postgres(connection):
        return "q3c_ang2ipix(ra, dec)"
    return '"zone", "ra"' if "zone" in columns else None


@contextmanager
def connect(engine: Engine = None):
    """A connection in a transaction (commit on success, rollback on error)."""
    engine = engine or make_engine()
    with engine.begin() as connection:
        yield connection


def analyze(connection, table_names):
    """Refresh planner statistics after a bulk load."""
    for name in table_names:
        connection.exec_driver_sql(f"ANALYZE {name}")


def cluster_on_position(connection):
    """Re-cluster the positional tables on their Q3C index (PostgreSQL; after big loads),
    then VACUUM them: CLUSTER writes a new table whose pages are not yet marked all-visible,
    so until a VACUUM every index-only scan (the WALK path's look ahead along an index of
    ``spectra``) still reads the table, and autovacuum has no reason to come soon after a
    rewrite. ``connection`` must be in AUTOCOMMIT: VACUUM cannot run in a transaction."""
    if is_postgres(connection):
        for name in ("spectra", "reference_labels"):
            connection.exec_driver_sql(f"CLUSTER {name}")
            connection.exec_driver_sql(f"VACUUM (ANALYZE) {name}")


# ---------------------------------------------------------------------------------------
# Migrations (Alembic; configuration in migrations/alembic.ini)
def _migrations_dir():
    """The Alembic scripts: ``etl/migrations`` in an installed wheel (pyproject.toml maps
    the repository's top-level ``migrations/`` there), else ``migrations/`` next to the
    ``etl`` folder of a source checkout or editable install."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package_dir, "migrations")
    if os.path.isfile(os.path.join(installed, "alembic.ini")):
        return installed
    return os.path.join(os.path.dirname(package_dir), "migrations")


MIGRATIONS_DIR = _migrations_dir()


def migration_include_object(obj, name, type_, reflected, compare_to):
    """Alembic filter: what autogenerate compares.

    Q3C functional indexes and the views are made by hand in the migrations; the schema
    cannot express them, so autogenerate must neither add nor drop them. Nor the zone
    indexes, which exist on SQLite only (``schema.zone_index``): autogenerate does not
    read ``ddl_if`` and would add them to PostgreSQL.
    """
    if type_ == "index" and name and name.endswith(("_q3c_idx", "_zone_ra")):
        return False
    if type_ == "table" and name and name in schema.VIEWS:
        return False
    return True


def alembic_config(url: str = None):
    from alembic.config import Config

    config = Config(os.path.join(MIGRATIONS_DIR, "alembic.ini"))
    config.set_main_option("script_location", MIGRATIONS_DIR)
    # alembic.ini puts the checkout's root on sys.path for plain "alembic -c"; here etl is
    # already imported, and in a wheel that root would be site-packages/etl, whose modules
    # would then shadow top-level ones (settings, schema, ...).
    config.remove_main_option("prepend_sys_path")
    # "%" would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", normalise_url(url or settings.database_url)
                           .replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def upgrade(url: str = None, revision: str = "head"):
    """Migrate the database at ``url`` to ``revision`` (creates q3c on PostgreSQL)."""
    from alembic import command

    with _named_revision(revision):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str = None, revision: str = "-1"):
    from alembic import command

    with _named_revision(revision):
        command.downgrade(alembic_config(url), revision)


@contextmanager
def _named_revision(revision):
    """Alembic's refusal of a revision (unknown, or not reachable) as a ValueError naming it."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as error:
        raise ValueError(f"revision {revision!r}: {error}") from None


def current_revision(url: str = None):
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
