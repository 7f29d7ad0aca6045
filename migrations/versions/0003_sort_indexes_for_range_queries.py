"""sort indexes for range queries

Generated with ``alembic revision --autogenerate`` from etl/schema.py
(``SORT_INDEX_COLUMNS``), then reordered by hand. ``/api/v1/estimates`` orders a page by
a column and then by obsid; these btree indexes return the rows of one model version in
that order, so a page is read from the index and the scan stops when it is full (before:
every row of the version was read and sorted, ~10 s on 10 M estimates):

* estimates (model_version, teff | logg | feh, obsid) -- replaces (model_version, teff);
* spectra (snrg, obsid).

The uncertainties, ra and dec get none: each index costs estimate or ingest throughput
(bench/query_indexes.py), and ordering by them is answered only for selections small
enough to sort.

The new indexes are built first and the old one dropped last: CREATE INDEX blocks writes
to the table while it runs but not reads, DROP INDEX blocks reads until the migration
commits, which it does right after.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Frozen copies (a migration must not change when etl/schema.py does later).
ESTIMATE_SORT_COLUMNS = ("teff", "logg", "feh")
SPECTRA_SORT_COLUMNS = ("snrg",)


def upgrade():
    for name in ESTIMATE_SORT_COLUMNS:
        op.create_index(op.f(f"ix_estimates_model_version_{name}_obsid"), "estimates",
                        ["model_version", name, "obsid"])
    for name in SPECTRA_SORT_COLUMNS:
        op.create_index(op.f(f"ix_spectra_{name}_obsid"), "spectra", [name, "obsid"])
    op.drop_index(op.f("ix_estimates_model_version_teff"), table_name="estimates")


def downgrade():
    op.create_index(op.f("ix_estimates_model_version_teff"), "estimates",
                    ["model_version", "teff"])
    for name in SPECTRA_SORT_COLUMNS:
        op.drop_index(op.f(f"ix_spectra_{name}_obsid"), table_name="spectra")
    for name in ESTIMATE_SORT_COLUMNS:
        op.drop_index(op.f(f"ix_estimates_model_version_{name}_obsid"), table_name="estimates")
