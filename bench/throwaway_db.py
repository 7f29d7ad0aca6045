"""A throw-away PostgreSQL database for a bench script (not itself a benchmark).

The bench scripts that load a catalogue into PostgreSQL each work in a database of their
own, created on the server of ``LAMOST_VAC_TEST_PG_URL`` (the tests' server) and dropped
when the script ends, even on an error, so that runs never see each other's rows::

    with throwaway_database(f"lamost_vac_bench_{os.getpid()}") as database:
        db.upgrade(database.url)
        ...

``keep=True`` leaves the database in place for inspection; ``reuse`` lets the next run
take up a kept database instead of loading it again.

Usage (shows this text):
    python bench/throwaway_db.py --help
"""
import argparse
import contextlib
import os
from dataclasses import dataclass

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("LAMOST_VAC_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@dataclass
class ThrowawayDatabase:
    name: str
    url: str        # writer (the admin URL's user) on database ``name``
    reused: bool    # True: an existing database that ``reuse`` accepted, left as it was


def database_url(name, admin_url=PG_URL):
    """The URL of database ``name`` on the server (and as the user) of ``admin_url``."""
    from etl.db import normalise_url

    return make_url(normalise_url(admin_url)).set(database=name) \
        .render_as_string(hide_password=False)


@contextlib.contextmanager
def throwaway_database(name, keep=False, reuse=None, admin_url=PG_URL):
    """Yield a :class:`ThrowawayDatabase` named ``name``, empty (not migrated).

    A database of that name left by an earlier run is dropped first, unless ``reuse`` (a
    function of its URL) says it can serve as it is: then it is yielded untouched with
    ``reused=True``. On exit the database is dropped (``WITH (FORCE)``: a server or
    connection the script left open does not block it) unless ``keep``.
    """
    from etl.db import normalise_url

    admin = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    url = database_url(name, admin_url)
    try:
        with admin.connect() as connection:
            exists = connection.exec_driver_sql(
                "SELECT 1 FROM pg_database WHERE datname = %(name)s", {"name": name}).scalar()
        reused = bool(exists) and reuse is not None and reuse(url)
        if not reused:
            with admin.connect() as connection:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                connection.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield ThrowawayDatabase(name, url, reused)
        finally:
            if not keep:
                with admin.connect() as connection:
                    connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.dispose()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
