"""histogram counts of the estimates per cell, kept by triggers

The histograms of a selection (``/api/v1/estimates/histograms``, the search page's
plots) took 7.4 s to count by scanning a model version of 10 M estimates (bench/scale.py,
issue 15's goal: 2 s). ``estimate_cells`` keeps them counted per model version, flags
value and cell of labels; triggers on ``estimates`` keep it exact (see
``etl/histogram_cells.py``), and the counts of the estimates already there are made here
(writers wait: 50 s for 4 M estimates, 279 s for 20 M).

The trigger SQL comes from ``etl.histogram_cells`` as it is when this migration runs: a
later change of the bins or cells needs a migration that drops the triggers, installs
them again and recounts (``etl.histogram_cells.recount``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

from etl import histogram_cells

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

WRITER_ROLE = "lamost_vac_writer"   # frozen copy, as in 0002


def _key(name, comment):
    return sa.Column(name, sa.SmallInteger(), nullable=False, comment=comment)


def upgrade():
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        'estimate_cells',
        sa.Column('model_version', sa.String(length=64), nullable=False,
                  comment='model version of the counted estimates'),
        _key('histogram', '0 Kiel diagram (bin1 Teff, bin2 log g), 1 [Fe/H], 2-4 Teff, '
                          'log g, [Fe/H] uncertainty'),
        sa.Column('flags', sa.Integer(), nullable=False,
                  comment='quality flags of the counted estimates'),
        _key('teff_cell', 'cell of Teff bins (-1 below, -2 NULL, the last above the range)'),
        _key('logg_cell', 'cell of log g bins (-1 below, -2 NULL, the last above the range)'),
        _key('feh_cell', 'cell of [Fe/H] bins (-1 below, -2 NULL, the last above the range)'),
        _key('bin1', "bin of the histogram's first column (-1 below, -2 NULL)"),
        _key('bin2', 'bin of log g in the Kiel diagram, otherwise 0'),
        sa.Column('n', sa.BigInteger(), nullable=False, comment='estimates counted'),
        sa.Column('feh_n', sa.BigInteger(), nullable=False,
                  comment='Kiel diagram: estimates with an [Fe/H]'),
        sa.Column('feh_sum', sa.Float(), nullable=False,
                  comment='Kiel diagram: sum of their [Fe/H]'),
        sa.PrimaryKeyConstraint('model_version', 'histogram', 'flags', 'teff_cell',
                                'logg_cell', 'feh_cell', 'bin1', 'bin2',
                                name=op.f('pk_estimate_cells')),
    )
    if postgres:
        op.execute(f"ALTER TABLE estimate_cells OWNER TO {WRITER_ROLE}")
    for statement in histogram_cells.install_triggers_sql(postgres):
        op.execute(statement)
    if postgres:
        # the writer owns estimates and must be able to replace the function later
        op.execute(f"ALTER FUNCTION {histogram_cells.TRIGGER_FUNCTION}() OWNER TO {WRITER_ROLE}")
    histogram_cells.recount(op.get_bind())


def downgrade():
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in histogram_cells.drop_triggers_sql(postgres):
        op.execute(statement)
    op.drop_table('estimate_cells')
