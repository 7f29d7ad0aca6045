"""planner statistics of the STAR condition

``infer --stale`` and the hourly ``reprocess_stale`` select STAR spectra with
``upper(trim(class)) = 'STAR'`` (``etl.inference.star_condition``). PostgreSQL keeps no
statistics of that expression and guessed 0.5% of the rows where ~91% match, so it probed
the estimates index once per spectrum: counting an empty stale set took 22.2 s on 11 M
spectra (bench/scale.py). With these statistics (filled by the ANALYZE after every
ingest and by ``db maintain``) it hash-joins instead: 4.5 s.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE STATISTICS spectra_star_class ON (upper(trim(class))) FROM spectra")
        op.execute("ANALYZE spectra")


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP STATISTICS spectra_star_class")
