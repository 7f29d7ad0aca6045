"""a pending model status: a new version is served only once it has estimated everything

Registering a model made it current at once, so the API, TAP and ``export`` served only
the spectra it had estimated so far until the beat had re-estimated the whole catalogue
(about 11 hours at DR8 size). A version registered while another is current is now
``pending``; ``infer`` and the beat estimate with it and make it current once it has an
estimate of every spectrum the current version serves (``etl.registry.promote_pending``).
At most one version is pending.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# Frozen copies (a migration must not change when etl/schema.py does later).
STATUS_COMMENT = ("current (the catalogue's), pending (being estimated; current once every "
                  "spectrum has its estimate) or retired")


def _status(values, comment, existing_comment):
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # SQLite changes a CHECK by copying the table and renaming the copy to "models";
        # the rename is refused while views name "models" unless in the legacy mode, which
        # leaves the views as they are (they name "models", which exists again after it)
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table('models') as batch:
        batch.drop_constraint(op.f('ck_models_status'), type_='check')
        batch.create_check_constraint('status', f"status IN ({values})")
        batch.alter_column('status', existing_type=sa.String(length=16), existing_nullable=False,
                           existing_server_default=sa.text("'current'"), comment=comment,
                           existing_comment=existing_comment)
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")


def upgrade():
    _status("'current', 'pending', 'retired'", STATUS_COMMENT, "current or retired")
    op.create_index('uq_models_one_pending', 'models', ['status'], unique=True,
                    postgresql_where=sa.text("status = 'pending'"),
                    sqlite_where=sa.text("status = 'pending'"))


def downgrade():
    op.drop_index('uq_models_one_pending', table_name='models')
    # a pending version never served the catalogue: it goes back as retired
    op.execute("UPDATE models SET status = 'retired' WHERE status = 'pending'")
    _status("'current', 'retired'", "current or retired", STATUS_COMMENT)
