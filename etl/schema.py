"""The one SQLAlchemy schema of the catalogue, for PostgreSQL (production) and SQLite.

Every column carries its science metadata once, in ``Column.info`` (unit, UCD,
description); :func:`describe_columns` turns it into the descriptions the API's VOTable,
FITS and CSV outputs and its documentation use, so they never drift from the database.
What a value of a column may be (:func:`value_limits`) also comes from here: the SQL
type's range or length, narrowed by a physical range (``valid_range``) where one is
declared; the ETL checks input rows against it before they reach the database.

Tables
------
``ingest_runs``        one row per ETL invocation (ingest spectra/labels, crossmatch, ...).
``spectra``            LAMOST LRS spectrum metadata, one row per obsid, plus the file
                       (path relative to a spectra root, size, sha256, layout).
``reference_labels``   reference (APOGEE Payne-like) labels, one row per (label_set, apogee_id).
``crossmatch``         every reference star within the match radius of a spectrum, ranked by
                       separation; ``match_rank = 1`` is the TOPCAT-style best match.
``models``             registry of trained model versions (one ``current``).
``estimates``          Teff/logg/[Fe/H] per (obsid, model_version); earlier versions stay.
``estimate_failures``  spectra a model version could not process, with the reason.
                       A separate table (not a status column in ``estimates``) so that every
                       ``estimates`` row is a usable value and queries need no status filter;
                       a later success deletes the failure row.
``quarantine``         every rejected input file or row with its reason.
``estimate_cells``     histogram counts of the estimates per model version and cell of
                       labels, kept by triggers (etl/histogram_cells.py).

Positions: on PostgreSQL ``spectra`` and ``reference_labels`` have a Q3C index (created in
the migration, table clustered on it). On SQLite the ``zone`` column (declination zone of
:data:`ZONE_HEIGHT_DEG`) with an index on (zone, ra) serves cones: see ``etl.db``.

Sorting: range queries (``/api/v1/estimates``) are ordered by a column and then by obsid,
one page at a time; :data:`SORT_INDEX_COLUMNS` get a btree index on (column, obsid) --
on ``estimates`` behind ``model_version``, which every such query fixes -- so that a page
is read from the index in order and the scan stops when the page is full.
"""
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    JSON,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql

from models.flags import flag_table_text
from models.labels import ESTIMATE_SUFFIXES, LABELS

# Declination zone height for the SQLite cone index (the "zones" algorithm of
# Gray, Nieto-Santisteban & Szalay 2006): 2 arcmin keeps an arcmin cone in 1-3 zones.
ZONE_HEIGHT_DEG = 1.0 / 30.0

# Constraint names are fixed so migrations are reproducible across dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
SurrogateKey = BigInteger().with_variant(Integer(), "sqlite")
JSONDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)


def col(name, type_, *args, unit=None, ucd=None, description="", details=None,
        valid_range=None, published=True, **kwargs):
    """A Column with its science metadata (unit, UCD, description) in ``info``.

    ``details`` extends the description in the documentation and output formats but not the
    database comment (e.g. the flag bits, defined by the model code, which grow).
    ``valid_range``: (minimum, maximum), inclusive, None for an open end -- the physical
    range of the quantity, when it is narrower than what the SQL type holds.
    ``published=False``: the column stays on the server (the API, TAP and the pages never
    show it; :func:`published_columns`).
    """
    info = {"unit": unit, "ucd": ucd, "description": description, "details": details,
            "published": published}
    if valid_range is not None:
        info["valid_range"] = valid_range
    return Column(name, type_, *args, info=info, comment=description or None, **kwargs)


# Columns a range query can be ordered by from an index (see the module doc), per table.
# Ascending only: a descending page walks the same index backwards. The service reads a
# nullable column's values and its NULLs (which sort last either way) as two parts, so
# that neither part depends on where the index puts the NULLs. Each index costs writes
# (bench/query_indexes.py measures it): the uncertainties, ra and dec are not indexed,
# and ordering by them is answered only for selections small enough to sort.
SORT_INDEX_COLUMNS = {"estimates": tuple(LABELS), "spectra": ("snrg",)}


def zone_index():
    """The (zone, ra) index of a positional table: SQLite's cone index. PostgreSQL answers
    cones with Q3C and does not get it (every index costs ingest time: about a quarter
    of a spectra merge at 2 M rows; migration 0004)."""
    return Index(None, "zone", "ra").ddl_if(dialect="sqlite")


def sort_indexes(table_name, leading=()):
    """The btree indexes of :data:`SORT_INDEX_COLUMNS` for ``table_name``: (``leading``
    columns, column, obsid) each."""
    return [Index(None, *leading, name, "obsid") for name in SORT_INDEX_COLUMNS[table_name]]


def sort_index_column(table_name, column_name) -> bool:
    """True when rows of ``table_name`` can be read in (``column_name``, obsid) order from
    an index: the columns of :data:`SORT_INDEX_COLUMNS`, and obsid itself (primary key,
    and the (obsid, model_version) key of estimates)."""
    return column_name == "obsid" or column_name in SORT_INDEX_COLUMNS.get(table_name, ())


# Ranges of the integer SQL types (the same on PostgreSQL; SQLite stores up to 64 bits).
INTEGER_TYPE_RANGES = ((SmallInteger, (-2 ** 15, 2 ** 15 - 1)),
                       (BigInteger, (-2 ** 63, 2 ** 63 - 1)),
                       (Integer, (-2 ** 31, 2 ** 31 - 1)))     # after its subclasses
RA_RANGE = (0.0, 360.0)         # 360 is accepted as input and stored as 0
DEC_RANGE = (-90.0, 90.0)
# Physical ranges of reference labels, wide enough for any star (white dwarfs, O stars, the
# most metal-poor) and narrow enough to catch a unit mistake or a sentinel: log10 Teff,
# g in cm/s^2 instead of log g, -999 or 99 for "none" (-9999 is read as missing anyway).
REFERENCE_TEFF_RANGE = (1000.0, 100000.0)
REFERENCE_LOGG_RANGE = (-2.0, 10.0)
REFERENCE_FEH_RANGE = (-6.0, 2.0)


@dataclass(frozen=True)
class ValueLimits:
    """What a value of one column may be (see :func:`value_limits`)."""
    kind: str                        # "integer", "float" or "text" (other types: "other")
    minimum: Optional[float] = None  # inclusive
    maximum: Optional[float] = None
    max_length: Optional[int] = None  # characters
    required: bool = False           # NOT NULL

    def range_text(self) -> str:
        low = "" if self.minimum is None else self.minimum
        high = "" if self.maximum is None else self.maximum
        return f"[{low}, {high}]"


def value_limits(column) -> ValueLimits:
    """The values ``column`` accepts: an integer type's range or a String's length, and
    the column's declared ``valid_range`` (for floats the only range: a double holds any
    finite input)."""
    type_ = column.type
    low, high = column.info.get("valid_range", (None, None))
    required = not column.nullable
    if isinstance(type_, Integer):
        type_low, type_high = next(r for t, r in INTEGER_TYPE_RANGES if isinstance(type_, t))
        return ValueLimits("integer", type_low if low is None else max(low, type_low),
                           type_high if high is None else min(high, type_high),
                           required=required)
    if isinstance(type_, Float):
        return ValueLimits("float", low, high, required=required)
    if isinstance(type_, (String, Text)):
        return ValueLimits("text", max_length=type_.length, required=required)
    return ValueLimits("other", required=required)


def run_id_column(name="ingest_run_id", description="ingest run that last wrote this row"):
    return col(name, String(36), ForeignKey("ingest_runs.run_id"), ucd="meta.id",
               description=description)


ingest_runs = Table(
    "ingest_runs", metadata,
    col("run_id", String(36), primary_key=True, ucd="meta.id",
        description="run identifier (UUID)"),
    col("kind", String(32), nullable=False,
        description="what ran: ingest-spectra, ingest-labels, crossmatch, ..."),
    col("source", Text, description="input file or folder the run read"),
    col("spectra_root", Text, description="root folder that spectrum paths are relative to"),
    col("status", String(16), nullable=False, server_default="running",
        description="running, finished, or failed (a crashed run stays 'running')"),
    col("started_at", Timestamp, nullable=False, ucd="time.start", description="start (UTC)"),
    col("finished_at", Timestamp, ucd="time.end", description="end (UTC)"),
    col("n_read", Integer, description="input rows or files read"),
    col("n_loaded", Integer, description="rows inserted"),
    col("n_updated", Integer, description="rows whose stored values changed"),
    col("n_unchanged", Integer, description="rows skipped because already stored unchanged"),
    col("n_quarantined", Integer, description="rows or files rejected to quarantine"),
    col("code_version", String(64), description="lamost-vac version that ran"),
    col("options", JSONDocument, description="command-line options of the run"),
    col("message", Text, description="error message of a failed run"),
    CheckConstraint("status IN ('running', 'finished', 'failed')", name="status"),
)

spectra = Table(
    "spectra", metadata,
    col("obsid", BigInteger, primary_key=True, autoincrement=False, ucd="meta.id;meta.main",
        description="LAMOST unique spectrum identifier", valid_range=(1, None)),
    col("designation", String(32), ucd="meta.id",
        description="LAMOST designation, J hhmmss.ss+ddmmss.s"),
    col("ra", Float(53), nullable=False, unit="deg", ucd="pos.eq.ra;meta.main",
        description="right ascension (J2000) of the fibre", valid_range=RA_RANGE),
    col("dec", Float(53), nullable=False, unit="deg", ucd="pos.eq.dec;meta.main",
        description="declination (J2000) of the fibre", valid_range=DEC_RANGE),
    col("zone", Integer, nullable=False, ucd="pos.eq.dec;meta.code",
        description="declination zone index, floor((dec + 90) / zone height), for cones"),
    col("lmjd", Integer, unit="d", ucd="time.epoch",
        description="local modified Julian day of the observation", valid_range=(0, None)),
    col("mjd", Integer, unit="d", ucd="time.epoch", description="modified Julian day",
        valid_range=(0, None)),
    col("planid", String(40), ucd="meta.id;obs", description="LAMOST plan (plate) name"),
    col("spid", SmallInteger, ucd="meta.id;instr", description="spectrograph id (1-16)",
        valid_range=(1, 16)),
    col("fiberid", SmallInteger, ucd="meta.id;instr", description="fibre id (1-250)",
        valid_range=(1, 250)),
    col("snru", Float, ucd="stat.snr;em.opt.U", description="signal-to-noise ratio, u band"),
    col("snrg", Float, ucd="stat.snr;em.opt.B", description="signal-to-noise ratio, g band"),
    col("snrr", Float, ucd="stat.snr;em.opt.R", description="signal-to-noise ratio, r band"),
    col("snri", Float, ucd="stat.snr;em.opt.I", description="signal-to-noise ratio, i band"),
    col("snrz", Float, ucd="stat.snr;em.opt.I", description="signal-to-noise ratio, z band"),
    col("class", String(16), key="class_", ucd="src.class",
        description="LASP spectral class (STAR, GALAXY, QSO, Unknown)"),
    col("subclass", String(32), ucd="src.spType", description="LASP spectral subclass"),
    col("z", Float(53), ucd="src.redshift", description="LASP redshift"),
    col("z_err", Float(53), ucd="stat.error;src.redshift", description="redshift uncertainty"),
    col("data_version", String(32), ucd="meta.version",
        description="data release of the file, e.g. LAMOST DR8"),
    col("file_path", Text, ucd="meta.ref.url",
        description="spectrum file path relative to the spectra root"),
    col("file_size", BigInteger, unit="byte", ucd="phys.size;meta.file",
        description="spectrum file size", valid_range=(0, None)),
    col("file_sha256", String(64), ucd="meta.checksum", description="SHA-256 of the file bytes"),
    col("layout", String(16), ucd="meta.code",
        description="file layout: dr1-image, dr8-image or dr8-v2-table"),
    run_id_column(),
    CheckConstraint("ra >= 0 AND ra < 360 AND dec >= -90 AND dec <= 90", name="position"),
    zone_index(),
    *sort_indexes("spectra"),
)

reference_labels = Table(
    "reference_labels", metadata,
    col("label_id", SurrogateKey, primary_key=True, autoincrement=True, ucd="meta.id",
        description="internal row identifier"),
    col("label_set", String(64), nullable=False, ucd="meta.dataset",
        description="which reference catalogue, e.g. apogee-payne"),
    col("apogee_id", String(40), nullable=False, ucd="meta.id;meta.main",
        description="APOGEE (2MASS-style) star identifier"),
    col("ra", Float(53), nullable=False, unit="deg", ucd="pos.eq.ra;meta.main",
        description="right ascension (J2000)", valid_range=RA_RANGE),
    col("dec", Float(53), nullable=False, unit="deg", ucd="pos.eq.dec;meta.main",
        description="declination (J2000)", valid_range=DEC_RANGE),
    col("zone", Integer, nullable=False, ucd="pos.eq.dec;meta.code",
        description="declination zone index, as for spectra"),
    col("teff", Float, unit="K", ucd="phys.temperature.effective",
        description="reference effective temperature", valid_range=REFERENCE_TEFF_RANGE),
    col("logg", Float, unit="log(cm.s**-2)", ucd="phys.gravity",
        description="reference surface gravity", valid_range=REFERENCE_LOGG_RANGE),
    col("feh", Float, unit="dex", ucd="phys.abund.Fe",
        description="reference iron abundance [Fe/H]", valid_range=REFERENCE_FEH_RANGE),
    col("good_flag", SmallInteger, ucd="meta.code.qual",
        description="1 = label usable for training (catalogue's own flag)"),
    col("source_file", Text, ucd="meta.file", description="file the labels were read from"),
    col("source_row", Integer, ucd="meta.record", description="row of that file (1-based)",
        valid_range=(1, None)),
    run_id_column(),
    UniqueConstraint("label_set", "apogee_id"),
    CheckConstraint("ra >= 0 AND ra < 360 AND dec >= -90 AND dec <= 90", name="position"),
    zone_index(),
)

crossmatch = Table(
    "crossmatch", metadata,
    col("obsid", BigInteger, ForeignKey("spectra.obsid", ondelete="CASCADE"), primary_key=True,
        ucd="meta.id", description="LAMOST spectrum"),
    col("label_id", SurrogateKey, ForeignKey("reference_labels.label_id", ondelete="CASCADE"),
        primary_key=True, ucd="meta.id", description="matched reference_labels row"),
    col("label_set", String(64), nullable=False, ucd="meta.dataset",
        description="reference catalogue of the match"),
    col("apogee_id", String(40), nullable=False, ucd="meta.id.cross",
        description="matched APOGEE identifier"),
    col("separation_arcsec", Float(53), nullable=False, unit="arcsec", ucd="pos.angDistance",
        description="angular separation spectrum - reference star"),
    col("match_rank", SmallInteger, nullable=False, ucd="meta.number",
        description="1 = nearest reference star of this set within the radius (best match)"),
    col("radius_arcsec", Float, nullable=False, unit="arcsec", ucd="pos.angDistance",
        description="match radius used"),
    run_id_column("crossmatch_run_id", description="crossmatch run that wrote this row"),
    Index(None, "label_id"),
    Index(None, "label_set", "match_rank"),
)

models = Table(
    "models", metadata,
    col("version", String(64), primary_key=True, ucd="meta.version",
        description="model version identifier"),
    col("created_at", Timestamp, nullable=False, ucd="time.creation",
        description="when the model was registered (UTC)"),
    col("artifact_path", Text, nullable=False, ucd="meta.ref.url",
        description="where the trained artifact is stored", published=False),
    col("artifact_sha256", String(64), nullable=False, ucd="meta.checksum",
        description="SHA-256 of the artifact"),
    col("training_set", JSONDocument, nullable=False, ucd="meta.dataset",
        description="description of the training set (selection, sizes, label source)"),
    col("metrics", JSONDocument, ucd="stat.fit",
        description="validation metrics (bias, scatter per label, ...)"),
    col("status", String(16), nullable=False, server_default="current", ucd="meta.code.status",
        description="current (the catalogue's), pending (being estimated; current once every "
                    "spectrum has its estimate) or retired"),
    col("code_version", String(64), ucd="meta.version",
        description="lamost-vac version that trained it"),
    col("notes", Text, description="free-text notes"),
    CheckConstraint("status IN ('current', 'pending', 'retired')", name="status"),
    # At most one current and one pending model: partial indexes work on both dialects.
    Index("uq_models_one_current", "status", unique=True,
          postgresql_where=text("status = 'current'"), sqlite_where=text("status = 'current'")),
    Index("uq_models_one_pending", "status", unique=True,
          postgresql_where=text("status = 'pending'"), sqlite_where=text("status = 'pending'")),
)


# unit, UCD and name of each label of models.labels.LABELS
LABEL_METADATA = {"teff": ("K", "phys.temperature.effective", "effective temperature"),
                  "logg": ("log(cm.s**-2)", "phys.gravity", "surface gravity"),
                  "feh": ("dex", "phys.abund.Fe", "[Fe/H]")}


def _estimate(name, unit, ucd, what):
    """The columns of one label, in the order of ``models.labels.ESTIMATE_SUFFIXES``."""
    columns = {
        "": col(name, Float, unit=unit, ucd=ucd, description=f"estimated {what}"),
        "_err": col(f"{name}_err", Float, unit=unit, ucd=f"stat.error;{ucd}",
                    description=f"integrated uncertainty of {what} (model and noise combined)"),
        "_err_model": col(f"{name}_err_model", Float, unit=unit, ucd=f"stat.stdev;{ucd}",
                          description=f"model uncertainty of {what}: standard deviation of "
                                      "the ensemble"),
    }
    return [columns[suffix] for suffix in ESTIMATE_SUFFIXES]


estimates = Table(
    "estimates", metadata,
    col("estimate_id", SurrogateKey, primary_key=True, autoincrement=True, ucd="meta.id",
        description="internal row identifier"),
    col("obsid", BigInteger, ForeignKey("spectra.obsid", ondelete="CASCADE"), nullable=False,
        ucd="meta.id;meta.main", description="LAMOST spectrum"),
    col("model_version", String(64), ForeignKey("models.version"), nullable=False,
        ucd="meta.version", description="model version that produced the estimate"),
    *(column for label in LABELS for column in _estimate(label, *LABEL_METADATA[label])),
    col("flags", Integer, nullable=False, server_default="0", ucd="meta.code.qual",
        description="quality flag bitmask (0 = no warning); bits defined by the model code",
        details=f"bits: {flag_table_text()}"),
    col("code_version", String(64), nullable=False, ucd="meta.version",
        description="lamost-vac version that ran the inference"),
    col("preprocessing_hash", String(64), nullable=False, ucd="meta.checksum",
        description="hash of the preprocessing configuration"),
    col("run_id", String(64), nullable=False, ucd="meta.id",
        description="inference run identifier"),
    col("created_at", Timestamp, nullable=False, ucd="time.creation",
        description="when the estimate was written (UTC)"),
    UniqueConstraint("obsid", "model_version"),
    *sort_indexes("estimates", leading=("model_version",)),
)

estimate_failures = Table(
    "estimate_failures", metadata,
    col("obsid", BigInteger, ForeignKey("spectra.obsid", ondelete="CASCADE"), primary_key=True,
        ucd="meta.id", description="LAMOST spectrum"),
    col("model_version", String(64), ForeignKey("models.version"), primary_key=True,
        ucd="meta.version", description="model version that failed on it"),
    col("stage", String(32), nullable=False, ucd="meta.code",
        description="read, preprocess or predict"),
    col("reason", Text, nullable=False, ucd="meta.note", description="why it failed"),
    col("attempts", Integer, nullable=False, server_default="1", ucd="meta.number",
        description="how many times it failed"),
    col("code_version", String(64), ucd="meta.version", description="lamost-vac version"),
    col("run_id", String(64), ucd="meta.id", description="inference run identifier"),
    col("created_at", Timestamp, nullable=False, ucd="time.creation",
        description="time of the latest failure (UTC)"),
)

def _cell_key(name, description):
    return col(name, SmallInteger, primary_key=True, ucd="meta.number",
               description=description)


# Kept by triggers on ``estimates`` (made by the migration), read by the histograms of
# the API and the search page: see etl/histogram_cells.py.
estimate_cells = Table(
    "estimate_cells", metadata,
    col("model_version", String(64), primary_key=True, ucd="meta.version",
        description="model version of the counted estimates"),
    _cell_key("histogram", "0 Kiel diagram (bin1 Teff, bin2 log g), 1 [Fe/H], "
                           "2-4 Teff, log g, [Fe/H] uncertainty"),
    col("flags", Integer, primary_key=True, ucd="meta.code.qual",
        description="quality flags of the counted estimates"),
    _cell_key("teff_cell", "cell of Teff bins (-1 below, -2 NULL, the last above the range)"),
    _cell_key("logg_cell", "cell of log g bins (-1 below, -2 NULL, the last above the range)"),
    _cell_key("feh_cell", "cell of [Fe/H] bins (-1 below, -2 NULL, the last above the range)"),
    _cell_key("bin1", "bin of the histogram's first column (-1 below, -2 NULL)"),
    _cell_key("bin2", "bin of log g in the Kiel diagram, otherwise 0"),
    col("n", BigInteger, nullable=False, ucd="meta.number", description="estimates counted"),
    col("feh_n", BigInteger, nullable=False, ucd="meta.number",
        description="Kiel diagram: estimates with an [Fe/H]"),
    col("feh_sum", Float, nullable=False, unit="dex", ucd="phys.abund.Z",
        description="Kiel diagram: sum of their [Fe/H]"),
)

quarantine = Table(
    "quarantine", metadata,
    col("quarantine_id", SurrogateKey, primary_key=True, autoincrement=True, ucd="meta.id",
        description="internal row identifier"),
    col("kind", String(32), nullable=False, ucd="meta.code",
        description="what was being ingested: spectra or labels"),
    col("source_file", Text, nullable=False, ucd="meta.file",
        description="rejected file, or the catalogue file the rejected row is in (absolute)"),
    col("source_row", Integer, nullable=False, server_default="0", ucd="meta.record",
        description="data row of the catalogue (1-based); 0 = the whole file"),
    col("obsid", BigInteger, ucd="meta.id", description="obsid of the row, when known"),
    col("reason", Text, nullable=False, ucd="meta.note", description="why it was rejected"),
    run_id_column("run_id", description="run that first rejected it"),
    col("created_at", Timestamp, nullable=False, ucd="time.creation",
        description="when it was first rejected (UTC)"),
    # The same rejection seen again by a re-run is not stored twice (idempotent ingest).
    UniqueConstraint("kind", "source_file", "source_row", "reason"),
)


# ---------------------------------------------------------------------------------------
# Views for collaborators' SQL (created by the migration; same SQL on both dialects).
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

# PostgreSQL roles (created by the migrations; passwords set by ``lamost-vac db upgrade``).
# The migrations run as a superuser (q3c is not a trusted extension); nothing else does.
WRITER_ROLE = "lamost_vac_writer"      # workers, beat, ETL: owns the tables, not a superuser
READER_ROLE = "lamost_vac_reader"      # the API: SELECT on what it reads
ANALYST_ROLE = "lamost_vac_analyst"    # SQL collaborators: SELECT on the published tables
# What migrations 0002 and 0007 set for the reader and the analyst, in the form ``SHOW``
# reports it (README: SQL).
READER_SESSION_SETTINGS = {"statement_timeout": "1min",
                           "idle_in_transaction_session_timeout": "1min"}
READER_CONNECTION_LIMIT = 50


# ---------------------------------------------------------------------------------------
# Column descriptions for output formats and documentation.
@dataclass(frozen=True)
class ColumnDescription:
    name: str
    kind: str                 # "int", "float", "text", "bool", "datetime", "json"
    unit: Optional[str]
    ucd: Optional[str]
    description: str
    nullable: bool

    @property
    def votable_datatype(self) -> str:
        return {"int": "long", "float": "double", "bool": "boolean"}.get(self.kind, "char")

    @property
    def fits_format(self) -> str:
        """FITS binary-table TFORM (text columns get a width at write time: ``nA``)."""
        return {"int": "K", "float": "D", "bool": "L"}.get(self.kind, "A")

    @property
    def numpy_dtype(self) -> str:
        return {"int": "i8", "float": "f8", "bool": "?"}.get(self.kind, "U")

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.kind, "unit": self.unit, "ucd": self.ucd,
                "description": self.description, "nullable": self.nullable}


def _kind_of(column) -> str:
    type_ = column.type
    if isinstance(type_, (Integer, BigInteger, SmallInteger)):
        return "int"
    if isinstance(type_, Float):
        return "float"
    if isinstance(type_, DateTime):
        return "datetime"
    if isinstance(type_, JSON):
        return "json"
    try:
        python_type = type_.python_type
    except NotImplementedError:
        return "text"
    return {int: "int", float: "float", bool: "bool"}.get(python_type, "text")


def describe_column(column) -> ColumnDescription:
    info = column.info or {}
    description = info.get("description", "")
    if info.get("details"):
        description = f"{description}; {info['details']}"
    return ColumnDescription(
        name=column.name, kind=_kind_of(column), unit=info.get("unit"), ucd=info.get("ucd"),
        description=description, nullable=bool(column.nullable),
    )


def describe_columns(table, names=None) -> list:
    """Descriptions of ``table``'s columns (all, or ``names`` in that order).

    ``table`` is a Table or a table name. A name of the form ``"table.column"`` in
    ``names`` takes that column from another table, so a view's output (for example
    ``v_current_estimates``) can be described from the tables it reads.
    """
    if isinstance(table, str):
        table = metadata.tables[table]
    if names is None:
        return [describe_column(c) for c in table.columns]
    out = []
    for name in names:
        source, _, column_name = name.rpartition(".")
        source_table = metadata.tables[source] if source else table
        out.append(describe_column(_column_by_name(source_table, column_name)))
    return out


def _column_by_name(table, name):
    # Looked up by SQL name, not attribute key: spectra's "class" column has key "class_".
    for column in table.columns:
        if column.name == name:
            return column
    raise KeyError(f"{table.name} has no column {name!r}")


def describe_fits_columns(header, descriptions):
    """Write each column's unit, UCD and description (``descriptions``, in column order)
    into a FITS binary-table ``header`` as TUNITn, TUCDn and TCOMMn (the keywords TOPCAT
    and STILTS read). Units go in verbatim: astropy cannot parse some (log(cm.s**-2))."""
    for index, description in enumerate(descriptions, start=1):
        if description.unit:
            header.set(f"TUNIT{index}", description.unit, after=f"TFORM{index}")
        if description.ucd:
            header[f"TUCD{index}"] = description.ucd
        if description.description:
            header[f"TCOMM{index}"] = description.description[:68]


def published_columns(table) -> list:
    """The columns of ``table`` that may be shown to anyone (see :func:`col`)."""
    return [c for c in table.columns if (c.info or {}).get("published", True)]


def column_info(table_name: str, column_name: str) -> ColumnDescription:
    return describe_column(_column_by_name(metadata.tables[table_name], column_name))
