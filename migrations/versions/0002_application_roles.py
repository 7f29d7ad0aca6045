"""application roles: a writer that is not a superuser, a reader that can only read

PostgreSQL only (SQLite has no roles; the service opens its file read-only).

* ``lamost_vac_writer`` (new): the role the workers, beat and the ETL commands write with.
  It owns the catalogue's tables and views -- so its own ANALYZE after a load, the
  staging tables of an upsert and ``lamost-vac db maintain`` (CLUSTER) work -- but it is
  not a superuser and cannot create roles, databases or extensions. The migrations
  themselves run as a superuser: q3c is not a trusted extension, and 0001 creates the
  reader role. A later migration that creates a table or view hands it to the writer
  the same way (tests/test_schema_migrations.py checks that the writer owns them all).
* ``lamost_vac_reader`` (0001): TEMP on the database and EXECUTE on the large-object
  functions are revoked from PUBLIC (the reader could store persistent large objects with
  ``lo_from_bytea`` and create temporary tables and functions); CREATE on schema public
  is revoked from PUBLIC (PostgreSQL 15 does it for new clusters, not for upgraded ones);
  in this database its sessions get a statement timeout and an idle-in-transaction
  timeout, and the role a connection limit.

Passwords are not part of the schema: ``lamost-vac db upgrade`` sets them from
LAMOST_VAC_WRITER_PASSWORD / LAMOST_VAC_READER_PASSWORD (or their ``_FILE`` variants).

Roles are cluster-wide and other databases of the cluster may use them: creation is
guarded, attributes are (re)asserted, and everything else (ownership, grants, session
settings) is per database, so the downgrade undoes it for this database only. The
connection limit is an attribute of the role and stays.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Frozen copies (a migration must not change when etl/schema.py does later).
WRITER_ROLE = "lamost_vac_writer"
READER_ROLE = "lamost_vac_reader"
READER_SESSION_SETTINGS = {"statement_timeout": "1min",
                           "idle_in_transaction_session_timeout": "1min"}
READER_CONNECTION_LIMIT = 50
OWNED_TABLES = ("ingest_runs", "models", "quarantine", "reference_labels", "spectra",
                "crossmatch", "estimate_failures", "estimates")
OWNED_VIEWS = ("v_spectra", "v_best_match", "v_estimates", "v_current_estimates")
# Every large-object function PUBLIC may execute by default (the server-side lo_import
# and lo_export are superuser-only already). Nothing in lamost-vac uses large objects.
LARGE_OBJECT_FUNCTIONS = (
    "lo_creat(integer)", "lo_create(oid)", "lo_from_bytea(oid, bytea)", "lo_open(oid, integer)",
    "lo_close(integer)", "loread(integer, integer)", "lowrite(integer, bytea)",
    "lo_lseek(integer, integer, integer)", "lo_lseek64(integer, bigint, integer)",
    "lo_tell(integer)", "lo_tell64(integer)", "lo_truncate(integer, integer)",
    "lo_truncate64(integer, bigint)", "lo_unlink(oid)", "lo_get(oid)",
    "lo_get(oid, bigint, integer)", "lo_put(oid, bigint, bytea)",
)
ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"


def _postgres():
    return op.get_bind().dialect.name == "postgresql"


def _on_this_database(statement):
    """Run ``statement`` with ``%I`` replaced by this database's quoted name (roles and
    privileges on a database name it; the name differs between deployments and tests)."""
    quoted = statement.replace("'", "''")
    op.execute(f"DO $$ BEGIN EXECUTE format('{quoted}', current_database()); END $$")


def _ensure_role(role, connection_limit):
    """Create ``role`` if absent and bring it to ROLE_ATTRIBUTES and ``connection_limit``
    (also a role made by hand or by an older deployment). A role that has them already is
    left alone: two databases of one cluster migrating at the same time would otherwise
    update the same pg_authid row and one would fail ("tuple concurrently updated")."""
    op.execute(f"DO $$ BEGIN CREATE ROLE {role}; "
               "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")
    op.execute(f"""DO $$ BEGIN
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}' AND (NOT rolcanlogin
                   OR rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication
                   OR rolbypassrls OR rolconnlimit <> {connection_limit})) THEN
            ALTER ROLE {role} {ROLE_ATTRIBUTES} CONNECTION LIMIT {connection_limit};
        END IF; END $$""")


def upgrade():
    if not _postgres():
        return
    _ensure_role(WRITER_ROLE, -1)
    _ensure_role(READER_ROLE, READER_CONNECTION_LIMIT)

    for table in OWNED_TABLES:       # their serial sequences follow the table
        op.execute(f"ALTER TABLE {table} OWNER TO {WRITER_ROLE}")
    for view in OWNED_VIEWS:
        op.execute(f"ALTER VIEW {view} OWNER TO {WRITER_ROLE}")
    # Alembic's table stays with the migrating role; the writer may read the revision.
    op.execute(f"GRANT SELECT ON alembic_version TO {WRITER_ROLE}")

    # Only the owner, the writer (staging tables of upserts) and superusers get TEMP.
    _on_this_database("REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, " + READER_ROLE)
    _on_this_database(f"GRANT CONNECT, TEMPORARY ON DATABASE %I TO {WRITER_ROLE}")
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    op.execute("REVOKE EXECUTE ON FUNCTION " + ", ".join(LARGE_OBJECT_FUNCTIONS)
               + " FROM PUBLIC")

    for name, value in READER_SESSION_SETTINGS.items():
        _on_this_database(f"ALTER ROLE {READER_ROLE} IN DATABASE %I SET {name} = '{value}'")


def downgrade():
    if not _postgres():
        return
    for name in READER_SESSION_SETTINGS:
        _on_this_database(f"ALTER ROLE {READER_ROLE} IN DATABASE %I RESET {name}")
    op.execute("GRANT EXECUTE ON FUNCTION " + ", ".join(LARGE_OBJECT_FUNCTIONS) + " TO PUBLIC")
    op.execute(f"REVOKE SELECT ON alembic_version FROM {WRITER_ROLE}")
    _on_this_database(f"REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM {WRITER_ROLE}")
    _on_this_database("GRANT TEMPORARY ON DATABASE %I TO PUBLIC")
    # The tables go back to the role running the downgrade (the one that ran 0001's
    # upgrade, as a rule). CREATE on schema public stays revoked: PostgreSQL 15's default.
    for view in OWNED_VIEWS:
        op.execute(f"ALTER VIEW {view} OWNER TO CURRENT_USER")
    for table in OWNED_TABLES:
        op.execute(f"ALTER TABLE {table} OWNER TO CURRENT_USER")
