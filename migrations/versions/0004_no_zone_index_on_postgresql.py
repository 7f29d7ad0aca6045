"""no (zone, ra) index on PostgreSQL

The (zone, ra) indexes of spectra and reference_labels are SQLite's cone index
(``etl.schema.zone_index``); PostgreSQL answers every cone and cross-match with Q3C, so on
PostgreSQL they were only written, never read: each cost about a quarter of the time to
merge a batch of 100,000 catalogue rows into 2 M spectra (issue 15's ingest goal). SQLite
keeps them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

TABLES = ("spectra", "reference_labels")


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.drop_index(op.f(f"ix_{table}_zone_ra"), table_name=table)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.create_index(op.f(f"ix_{table}_zone_ra"), table, ["zone", "ra"])
