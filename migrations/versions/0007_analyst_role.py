"""a role of its own for SQL collaborators; the API's role no longer reads the quarantine

Until now the API and the collaborators' SQL sessions shared ``lamost_vac_reader``: a
collaborator could read the API's statements in ``pg_stat_activity`` and end its
connections (``pg_terminate_backend`` works on sessions of one's own role), and both
could read ``quarantine`` (file paths of the server). Found by review.

* ``lamost_vac_analyst`` (new): SQL collaborators. SELECT on the published tables and
  views only (what TAP publishes: not ``quarantine``, ``ingest_runs``,
  ``estimate_failures``, ``estimate_cells``, nor ``models.artifact_path``, the artifact's
  path on the server), the reader's statement and idle timeouts and a connection limit,
  no TEMP (0002 revoked it from PUBLIC). No default privileges: a later migration that
  publishes a table grants it here itself.
* ``lamost_vac_reader``: the API. Loses SELECT on ``quarantine``, which it never reads.

Its password is set by ``lamost-vac db upgrade`` from LAMOST_VAC_ANALYST_PASSWORD (or
``_FILE``). The role is cluster-wide and stays on downgrade (as 0002's do); its grants and
settings in this database are undone.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Frozen copies (a migration must not change when etl/schema.py does later).
ANALYST_ROLE = "lamost_vac_analyst"
READER_ROLE = "lamost_vac_reader"
SESSION_SETTINGS = {"statement_timeout": "1min", "idle_in_transaction_session_timeout": "1min"}
CONNECTION_LIMIT = 50
PUBLISHED = ("spectra", "estimates", "reference_labels", "crossmatch",
             "v_spectra", "v_best_match", "v_estimates", "v_current_estimates")
MODELS_PUBLISHED_COLUMNS = ("version", "created_at", "artifact_sha256", "training_set",
                            "metrics", "status", "code_version", "notes")
ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"


def _postgres():
    return op.get_bind().dialect.name == "postgresql"


def _on_this_database(statement):
    """As in 0002: ``%I`` is this database's quoted name."""
    quoted = statement.replace("'", "''")
    op.execute(f"DO $$ BEGIN EXECUTE format('{quoted}', current_database()); END $$")


def upgrade():
    if not _postgres():
        return
    # as 0002's _ensure_role: created if absent, attributes corrected only when they differ
    op.execute(f"DO $$ BEGIN CREATE ROLE {ANALYST_ROLE}; "
               "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")
    op.execute(f"""DO $$ BEGIN
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ANALYST_ROLE}' AND (NOT rolcanlogin
                   OR rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication
                   OR rolbypassrls OR rolconnlimit <> {CONNECTION_LIMIT})) THEN
            ALTER ROLE {ANALYST_ROLE} {ROLE_ATTRIBUTES} CONNECTION LIMIT {CONNECTION_LIMIT};
        END IF; END $$""")
    _on_this_database(f"GRANT CONNECT ON DATABASE %I TO {ANALYST_ROLE}")
    op.execute(f"GRANT USAGE ON SCHEMA public TO {ANALYST_ROLE}")
    op.execute(f"GRANT SELECT ON {', '.join(PUBLISHED)} TO {ANALYST_ROLE}")
    op.execute(f"GRANT SELECT ({', '.join(MODELS_PUBLISHED_COLUMNS)}) ON models TO {ANALYST_ROLE}")
    for name, value in SESSION_SETTINGS.items():
        _on_this_database(f"ALTER ROLE {ANALYST_ROLE} IN DATABASE %I SET {name} = '{value}'")
    op.execute(f"REVOKE SELECT ON quarantine FROM {READER_ROLE}")


def downgrade():
    if not _postgres():
        return
    op.execute(f"GRANT SELECT ON quarantine TO {READER_ROLE}")
    for name in SESSION_SETTINGS:
        _on_this_database(f"ALTER ROLE {ANALYST_ROLE} IN DATABASE %I RESET {name}")
    op.execute(f"REVOKE SELECT ({', '.join(MODELS_PUBLISHED_COLUMNS)}) ON models FROM {ANALYST_ROLE}")
    op.execute(f"REVOKE SELECT ON {', '.join(PUBLISHED)} FROM {ANALYST_ROLE}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ANALYST_ROLE}")
    _on_this_database(f"REVOKE CONNECT ON DATABASE %I FROM {ANALYST_ROLE}")
