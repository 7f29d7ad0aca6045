"""initial catalogue schema

Generated with ``alembic revision --autogenerate`` from etl/schema.py, then completed by
hand with what the schema cannot express: the q3c extension, Q3C indexes on spectra and
reference_labels (tables clustered on them), the documented views and the read-only role
``lamost_vac_reader`` (PostgreSQL only; SQLite has no roles).

Revision ID: 0001
Revises: 
Create Date: 2026-11-25
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

READER_ROLE = "lamost_vac_reader"

# Frozen copies (a migration must not change when etl/schema.py does later).
VIEWS = {
    "v_spectra": (
        "LAMOST spectra with positions, S/N, LASP class and the file location.",
        """SELECT obsid, designation, ra, dec, lmjd, mjd, planid, spid, fiberid,
        snru, snrg, snrr, snri, snrz, class, subclass, z, z_err, data_version,
        file_path, layout
        FROM spectra""",
    ),
    "v_best_match": (
        "Each spectrum's best (nearest) reference star per label set within the radius.",
        """SELECT x.obsid, s.ra, s.dec, s.snrg, x.label_set, x.apogee_id, x.separation_arcsec,
        l.teff, l.logg, l.feh, l.good_flag
        FROM crossmatch x
        JOIN spectra s ON s.obsid = x.obsid
        JOIN reference_labels l ON l.label_id = x.label_id
        WHERE x.match_rank = 1""",
    ),
    "v_estimates": (
        "Every estimate of every model version, with the spectrum's position and S/N.",
        """SELECT e.obsid, s.ra, s.dec, s.snrg, e.model_version, m.status AS model_status,
        e.teff, e.teff_err_model, e.teff_err, e.logg, e.logg_err_model, e.logg_err,
        e.feh, e.feh_err_model, e.feh_err, e.flags, e.code_version,
        e.preprocessing_hash, e.run_id, e.created_at
        FROM estimates e
        JOIN spectra s ON s.obsid = e.obsid
        JOIN models m ON m.version = e.model_version""",
    ),
    "v_current_estimates": (
        "The value-added catalogue: estimates of the current model version only.",
        """SELECT e.obsid, s.ra, s.dec, s.snrg, e.model_version,
        e.teff, e.teff_err_model, e.teff_err, e.logg, e.logg_err_model, e.logg_err,
        e.feh, e.feh_err_model, e.feh_err, e.flags
        FROM estimates e
        JOIN spectra s ON s.obsid = e.obsid
        JOIN models m ON m.version = e.model_version
        WHERE m.status = 'current'""",
    ),
}

READER_GRANTS = [
    # The role is cluster-wide: another database (or a concurrent test) may have made it.
    "DO $$ BEGIN CREATE ROLE lamost_vac_reader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE; "
    "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    "DO $$ BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO lamost_vac_reader', current_database()); END $$",
    'GRANT USAGE ON SCHEMA public TO lamost_vac_reader',
    'GRANT SELECT ON ALL TABLES IN SCHEMA public TO lamost_vac_reader',
    'ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO lamost_vac_reader',
]


def _postgres():
    return op.get_bind().dialect.name == "postgresql"


def upgrade():
    if _postgres():
        op.execute("CREATE EXTENSION IF NOT EXISTS q3c")
    op.create_table('ingest_runs',
    sa.Column('run_id', sa.String(length=36), nullable=False, comment='run identifier (UUID)'),
    sa.Column('kind', sa.String(length=32), nullable=False, comment='what ran: ingest-spectra, ingest-labels, crossmatch, ...'),
    sa.Column('source', sa.Text(), nullable=True, comment='input file or folder the run read'),
    sa.Column('spectra_root', sa.Text(), nullable=True, comment='root folder that spectrum paths are relative to'),
    sa.Column('status', sa.String(length=16), server_default='running', nullable=False, comment="running, finished, or failed (a crashed run stays 'running')"),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False, comment='start (UTC)'),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True, comment='end (UTC)'),
    sa.Column('n_read', sa.Integer(), nullable=True, comment='input rows or files read'),
    sa.Column('n_loaded', sa.Integer(), nullable=True, comment='rows inserted'),
    sa.Column('n_updated', sa.Integer(), nullable=True, comment='rows whose stored values changed'),
    sa.Column('n_unchanged', sa.Integer(), nullable=True, comment='rows skipped because already stored unchanged'),
    sa.Column('n_quarantined', sa.Integer(), nullable=True, comment='rows or files rejected to quarantine'),
    sa.Column('code_version', sa.String(length=64), nullable=True, comment='lamost-vac version that ran'),
    sa.Column('options', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True, comment='command-line options of the run'),
    sa.Column('message', sa.Text(), nullable=True, comment='error message of a failed run'),
    sa.CheckConstraint("status IN ('running', 'finished', 'failed')", name=op.f('ck_ingest_runs_status')),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_ingest_runs'))
    )
    op.create_table('models',
    sa.Column('version', sa.String(length=64), nullable=False, comment='model version identifier'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='when the model was registered (UTC)'),
    sa.Column('artifact_path', sa.Text(), nullable=False, comment='where the trained artifact is stored'),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=False, comment='SHA-256 of the artifact'),
    sa.Column('training_set', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False, comment='description of the training set (selection, sizes, label source)'),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True, comment='validation metrics (bias, scatter per label, ...)'),
    sa.Column('status', sa.String(length=16), server_default='current', nullable=False, comment='current or retired'),
    sa.Column('code_version', sa.String(length=64), nullable=True, comment='lamost-vac version that trained it'),
    sa.Column('notes', sa.Text(), nullable=True, comment='free-text notes'),
    sa.CheckConstraint("status IN ('current', 'retired')", name=op.f('ck_models_status')),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_models'))
    )
    op.create_index('uq_models_one_current', 'models', ['status'], unique=True, postgresql_where=sa.text("status = 'current'"), sqlite_where=sa.text("status = 'current'"))

    op.create_table('quarantine',
    sa.Column('quarantine_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False, comment='internal row identifier'),
    sa.Column('kind', sa.String(length=32), nullable=False, comment='what was being ingested: spectra or labels'),
    sa.Column('source_file', sa.Text(), nullable=False, comment='rejected file, or the catalogue file the rejected row is in (absolute)'),
    sa.Column('source_row', sa.Integer(), server_default='0', nullable=False, comment='data row of the catalogue (1-based); 0 = the whole file'),
    sa.Column('obsid', sa.BigInteger(), nullable=True, comment='obsid of the row, when known'),
    sa.Column('reason', sa.Text(), nullable=False, comment='why it was rejected'),
    sa.Column('run_id', sa.String(length=36), nullable=True, comment='run that first rejected it'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='when it was first rejected (UTC)'),
    sa.ForeignKeyConstraint(['run_id'], ['ingest_runs.run_id'], name=op.f('fk_quarantine_run_id_ingest_runs')),
    sa.PrimaryKeyConstraint('quarantine_id', name=op.f('pk_quarantine')),
    sa.UniqueConstraint('kind', 'source_file', 'source_row', 'reason', name=op.f('uq_quarantine_kind_source_file_source_row_reason'))
    )
    op.create_table('reference_labels',
    sa.Column('label_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False, comment='internal row identifier'),
    sa.Column('label_set', sa.String(length=64), nullable=False, comment='which reference catalogue, e.g. apogee-payne'),
    sa.Column('apogee_id', sa.String(length=40), nullable=False, comment='APOGEE (2MASS-style) star identifier'),
    sa.Column('ra', sa.Float(precision=53), nullable=False, comment='right ascension (J2000)'),
    sa.Column('dec', sa.Float(precision=53), nullable=False, comment='declination (J2000)'),
    sa.Column('zone', sa.Integer(), nullable=False, comment='declination zone index, as for spectra'),
    sa.Column('teff', sa.Float(), nullable=True, comment='reference effective temperature'),
    sa.Column('logg', sa.Float(), nullable=True, comment='reference surface gravity'),
    sa.Column('feh', sa.Float(), nullable=True, comment='reference iron abundance [Fe/H]'),
    sa.Column('good_flag', sa.SmallInteger(), nullable=True, comment="1 = label usable for training (catalogue's own flag)"),
    sa.Column('source_file', sa.Text(), nullable=True, comment='file the labels were read from'),
    sa.Column('source_row', sa.Integer(), nullable=True, comment='row of that file (1-based)'),
    sa.Column('ingest_run_id', sa.String(length=36), nullable=True, comment='ingest run that last wrote this row'),
    sa.CheckConstraint('ra >= 0 AND ra < 360 AND dec >= -90 AND dec <= 90', name=op.f('ck_reference_labels_position')),
    sa.ForeignKeyConstraint(['ingest_run_id'], ['ingest_runs.run_id'], name=op.f('fk_reference_labels_ingest_run_id_ingest_runs')),
    sa.PrimaryKeyConstraint('label_id', name=op.f('pk_reference_labels')),
    sa.UniqueConstraint('label_set', 'apogee_id', name=op.f('uq_reference_labels_label_set_apogee_id'))
    )
    op.create_index(op.f('ix_reference_labels_zone_ra'), 'reference_labels', ['zone', 'ra'], unique=False)

    op.create_table('spectra',
    sa.Column('obsid', sa.BigInteger(), autoincrement=False, nullable=False, comment='LAMOST unique spectrum identifier'),
    sa.Column('designation', sa.String(length=32), nullable=True, comment='LAMOST designation, J hhmmss.ss+ddmmss.s'),
    sa.Column('ra', sa.Float(precision=53), nullable=False, comment='right ascension (J2000) of the fibre'),
    sa.Column('dec', sa.Float(precision=53), nullable=False, comment='declination (J2000) of the fibre'),
    sa.Column('zone', sa.Integer(), nullable=False, comment='declination zone index, floor((dec + 90) / zone height), for cones'),
    sa.Column('lmjd', sa.Integer(), nullable=True, comment='local modified Julian day of the observation'),
    sa.Column('mjd', sa.Integer(), nullable=True, comment='modified Julian day'),
    sa.Column('planid', sa.String(length=40), nullable=True, comment='LAMOST plan (plate) name'),
    sa.Column('spid', sa.SmallInteger(), nullable=True, comment='spectrograph id (1-16)'),
    sa.Column('fiberid', sa.SmallInteger(), nullable=True, comment='fibre id (1-250)'),
    sa.Column('snru', sa.Float(), nullable=True, comment='signal-to-noise ratio, u band'),
    sa.Column('snrg', sa.Float(), nullable=True, comment='signal-to-noise ratio, g band'),
    sa.Column('snrr', sa.Float(), nullable=True, comment='signal-to-noise ratio, r band'),
    sa.Column('snri', sa.Float(), nullable=True, comment='signal-to-noise ratio, i band'),
    sa.Column('snrz', sa.Float(), nullable=True, comment='signal-to-noise ratio, z band'),
    sa.Column('class', sa.String(length=16), nullable=True, comment='LASP spectral class (STAR, GALAXY, QSO, Unknown)'),
    sa.Column('subclass', sa.String(length=32), nullable=True, comment='LASP spectral subclass'),
    sa.Column('z', sa.Float(precision=53), nullable=True, comment='LASP redshift'),
    sa.Column('z_err', sa.Float(precision=53), nullable=True, comment='redshift uncertainty'),
    sa.Column('data_version', sa.String(length=32), nullable=True, comment='data release of the file, e.g. LAMOST DR8'),
    sa.Column('file_path', sa.Text(), nullable=True, comment='spectrum file path relative to the spectra root'),
    sa.Column('file_size', sa.BigInteger(), nullable=True, comment='spectrum file size'),
    sa.Column('file_sha256', sa.String(length=64), nullable=True, comment='SHA-256 of the file bytes'),
    sa.Column('layout', sa.String(length=16), nullable=True, comment='file layout: dr1-image, dr8-image or dr8-v2-table'),
    sa.Column('ingest_run_id', sa.String(length=36), nullable=True, comment='ingest run that last wrote this row'),
    sa.CheckConstraint('ra >= 0 AND ra < 360 AND dec >= -90 AND dec <= 90', name=op.f('ck_spectra_position')),
    sa.ForeignKeyConstraint(['ingest_run_id'], ['ingest_runs.run_id'], name=op.f('fk_spectra_ingest_run_id_ingest_runs')),
    sa.PrimaryKeyConstraint('obsid', name=op.f('pk_spectra'))
    )
    op.create_index(op.f('ix_spectra_zone_ra'), 'spectra', ['zone', 'ra'], unique=False)

    op.create_table('crossmatch',
    sa.Column('obsid', sa.BigInteger(), nullable=False, comment='LAMOST spectrum'),
    sa.Column('label_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False, comment='matched reference_labels row'),
    sa.Column('label_set', sa.String(length=64), nullable=False, comment='reference catalogue of the match'),
    sa.Column('apogee_id', sa.String(length=40), nullable=False, comment='matched APOGEE identifier'),
    sa.Column('separation_arcsec', sa.Float(precision=53), nullable=False, comment='angular separation spectrum - reference star'),
    sa.Column('match_rank', sa.SmallInteger(), nullable=False, comment='1 = nearest reference star of this set within the radius (best match)'),
    sa.Column('radius_arcsec', sa.Float(), nullable=False, comment='match radius used'),
    sa.Column('crossmatch_run_id', sa.String(length=36), nullable=True, comment='crossmatch run that wrote this row'),
    sa.ForeignKeyConstraint(['crossmatch_run_id'], ['ingest_runs.run_id'], name=op.f('fk_crossmatch_crossmatch_run_id_ingest_runs')),
    sa.ForeignKeyConstraint(['label_id'], ['reference_labels.label_id'], name=op.f('fk_crossmatch_label_id_reference_labels'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['obsid'], ['spectra.obsid'], name=op.f('fk_crossmatch_obsid_spectra'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('obsid', 'label_id', name=op.f('pk_crossmatch'))
    )
    op.create_index(op.f('ix_crossmatch_label_id'), 'crossmatch', ['label_id'], unique=False)
    op.create_index(op.f('ix_crossmatch_label_set_match_rank'), 'crossmatch', ['label_set', 'match_rank'], unique=False)

    op.create_table('estimate_failures',
    sa.Column('obsid', sa.BigInteger(), nullable=False, comment='LAMOST spectrum'),
    sa.Column('model_version', sa.String(length=64), nullable=False, comment='model version that failed on it'),
    sa.Column('stage', sa.String(length=32), nullable=False, comment='read, preprocess or predict'),
    sa.Column('reason', sa.Text(), nullable=False, comment='why it failed'),
    sa.Column('attempts', sa.Integer(), server_default='1', nullable=False, comment='how many times it failed'),
    sa.Column('code_version', sa.String(length=64), nullable=True, comment='lamost-vac version'),
    sa.Column('run_id', sa.String(length=64), nullable=True, comment='inference run identifier'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='time of the latest failure (UTC)'),
    sa.ForeignKeyConstraint(['model_version'], ['models.version'], name=op.f('fk_estimate_failures_model_version_models')),
    sa.ForeignKeyConstraint(['obsid'], ['spectra.obsid'], name=op.f('fk_estimate_failures_obsid_spectra'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('obsid', 'model_version', name=op.f('pk_estimate_failures'))
    )
    op.create_table('estimates',
    sa.Column('estimate_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False, comment='internal row identifier'),
    sa.Column('obsid', sa.BigInteger(), nullable=False, comment='LAMOST spectrum'),
    sa.Column('model_version', sa.String(length=64), nullable=False, comment='model version that produced the estimate'),
    sa.Column('teff', sa.Float(), nullable=True, comment='estimated effective temperature'),
    sa.Column('teff_err_model', sa.Float(), nullable=True, comment='model uncertainty of effective temperature: standard deviation of the ensemble'),
    sa.Column('teff_err', sa.Float(), nullable=True, comment='integrated uncertainty of effective temperature (model and noise combined)'),
    sa.Column('logg', sa.Float(), nullable=True, comment='estimated surface gravity'),
    sa.Column('logg_err_model', sa.Float(), nullable=True, comment='model uncertainty of surface gravity: standard deviation of the ensemble'),
    sa.Column('logg_err', sa.Float(), nullable=True, comment='integrated uncertainty of surface gravity (model and noise combined)'),
    sa.Column('feh', sa.Float(), nullable=True, comment='estimated [Fe/H]'),
    sa.Column('feh_err_model', sa.Float(), nullable=True, comment='model uncertainty of [Fe/H]: standard deviation of the ensemble'),
    sa.Column('feh_err', sa.Float(), nullable=True, comment='integrated uncertainty of [Fe/H] (model and noise combined)'),
    sa.Column('flags', sa.Integer(), server_default='0', nullable=False, comment='quality flag bitmask (0 = no warning); bits defined by the model code'),
    sa.Column('code_version', sa.String(length=64), nullable=False, comment='lamost-vac version that ran the inference'),
    sa.Column('preprocessing_hash', sa.String(length=64), nullable=False, comment='hash of the preprocessing configuration'),
    sa.Column('run_id', sa.String(length=64), nullable=False, comment='inference run identifier'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='when the estimate was written (UTC)'),
    sa.ForeignKeyConstraint(['model_version'], ['models.version'], name=op.f('fk_estimates_model_version_models')),
    sa.ForeignKeyConstraint(['obsid'], ['spectra.obsid'], name=op.f('fk_estimates_obsid_spectra'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('estimate_id', name=op.f('pk_estimates')),
    sa.UniqueConstraint('obsid', 'model_version', name=op.f('uq_estimates_obsid_model_version'))
    )
    op.create_index(op.f('ix_estimates_model_version_teff'), 'estimates', ['model_version', 'teff'], unique=False)


    _upgrade_positions_views_and_role()


def _upgrade_positions_views_and_role():
    if _postgres():
        for table in ("spectra", "reference_labels"):
            op.execute(f"CREATE INDEX {table}_q3c_idx ON {table} (q3c_ang2ipix(ra, dec))")
            # Rows of one sky area sit together on disk: cone searches read few pages.
            op.execute(f"CLUSTER {table} USING {table}_q3c_idx")
    for name, (description, sql) in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
        if _postgres():
            quoted = description.replace("'", "''")
            op.execute(f"COMMENT ON VIEW {name} IS '{quoted}'")
    if _postgres():
        for statement in READER_GRANTS:
            op.execute(statement)


def downgrade():
    if _postgres():
        # The role is cluster-wide (other databases may use it): only revoke here.
        role = READER_ROLE
        op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM {role}")
        op.execute(f"REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM {role}")
        op.execute(f"REVOKE USAGE ON SCHEMA public FROM {role}")
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    if _postgres():
        for table in ("spectra", "reference_labels"):
            op.execute(f"DROP INDEX IF EXISTS {table}_q3c_idx")
    op.drop_index(op.f('ix_estimates_model_version_teff'), table_name='estimates')

    op.drop_table('estimates')
    op.drop_table('estimate_failures')
    op.drop_index(op.f('ix_crossmatch_label_set_match_rank'), table_name='crossmatch')
    op.drop_index(op.f('ix_crossmatch_label_id'), table_name='crossmatch')

    op.drop_table('crossmatch')
    op.drop_index(op.f('ix_spectra_zone_ra'), table_name='spectra')

    op.drop_table('spectra')
    op.drop_index(op.f('ix_reference_labels_zone_ra'), table_name='reference_labels')

    op.drop_table('reference_labels')
    op.drop_table('quarantine')
    op.drop_index('uq_models_one_current', table_name='models', postgresql_where=sa.text("status = 'current'"), sqlite_where=sa.text("status = 'current'"))

    op.drop_table('models')
    op.drop_table('ingest_runs')
