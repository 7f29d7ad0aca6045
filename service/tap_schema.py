"""What the TAP service publishes, generated from the one schema (:mod:`etl.schema`).

* :data:`PUBLISHED`: the catalogue tables and the collaborators' views (``VIEWS``), each
  with its columns described by :func:`etl.schema.describe_column` (unit, UCD,
  description, datatype). A view's columns are found by parsing its SQL (sqlglot) and
  following each output column to the table column it reads.
* ``TAP_SCHEMA`` (schemas, tables, columns, keys, key_columns) is built from the same
  objects, never written by hand, and served as queryable tables: :func:`tap_schema_ctes`
  gives one ``VALUES`` common table expression per TAP_SCHEMA table, which
  :mod:`service.adql` puts in front of a query that names one. Nothing is stored in the
  database, so the read-only reader role serves it as it is, and it cannot drift from
  the schema.
* :func:`vosi_tableset` is the VOSI ``/tap/tables`` document of the same tables.

``principal`` = 1 for the columns a user wants by default: those with a unit (the
measurements, positions) or the main identifier. ``indexed`` = 1 for columns with a
B-tree index (primary keys, declared indexes) and for ``ra``/``dec`` of the tables with
a Q3C index (``spectra``, ``reference_labels``); a view column is indexed when the
table column it reads is.
"""
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Optional

import sqlglot
from sqlglot import exp
from sqlalchemy import UniqueConstraint

from etl import schema
from etl.schema import ColumnDescription

CATALOGUE_SCHEMA = "public"
TAP_SCHEMA = "TAP_SCHEMA"
# Tables collaborators may query (bookkeeping tables such as quarantine stay private).
PUBLISHED_TABLES = ("spectra", "estimates", "models", "reference_labels", "crossmatch")
Q3C_INDEXED = {"spectra": ("ra", "dec"), "reference_labels": ("ra", "dec")}
TABLE_DESCRIPTIONS = {
    "spectra": "LAMOST LRS spectrum metadata, one row per obsid (Q3C index on ra, dec).",
    "estimates": "Teff, log g, [Fe/H] per spectrum and model version (every version).",
    "models": "Registry of trained model versions; status 'current' marks the catalogue's, "
              "'pending' one being estimated (current once every spectrum has its estimate).",
    "reference_labels": "Reference (APOGEE Payne-like) labels (Q3C index on ra, dec).",
    "crossmatch": "Every reference star within the match radius of a spectrum, ranked "
                  "by separation (match_rank = 1: best match).",
}


# SQL-92 reserved words (ADQL 2.0 section 2.1.2; DEC left out, as ADQL clients do) and
# ADQL's own: a column so named is listed delimited ('"zone"') in TAP_SCHEMA and VOSI.
ADQL_RESERVED = set("""
ABSOLUTE ACTION ADD ALL ALLOCATE ALTER AND ANY ARE AS ASC ASSERTION AT AUTHORIZATION AVG
BEGIN BETWEEN BIT BIT_LENGTH BOTH BY CASCADE CASCADED CASE CAST CATALOG CHAR CHARACTER
CHAR_LENGTH CHARACTER_LENGTH CHECK CLOSE COALESCE COLLATE COLLATION COLUMN COMMIT CONNECT
CONNECTION CONSTRAINT CONSTRAINTS CONTINUE CONVERT CORRESPONDING COUNT CREATE CROSS CURRENT
CURRENT_DATE CURRENT_TIME CURRENT_TIMESTAMP CURRENT_USER CURSOR DATE DAY DEALLOCATE DECIMAL
DECLARE DEFAULT DEFERRABLE DEFERRED DELETE DESC DESCRIBE DESCRIPTOR DIAGNOSTICS DISCONNECT
DISTINCT DOMAIN DOUBLE DROP ELSE END END-EXEC ESCAPE EXCEPT EXCEPTION EXEC EXECUTE EXISTS
EXTERNAL EXTRACT FALSE FETCH FIRST FLOAT FOR FOREIGN FOUND FROM FULL GET GLOBAL GO GOTO
GRANT GROUP HAVING HOUR IDENTITY IMMEDIATE IN INDICATOR INITIALLY INNER INPUT INSENSITIVE
INSERT INT INTEGER INTERSECT INTERVAL INTO IS ISOLATION JOIN KEY LANGUAGE LAST LEADING LEFT
LEVEL LIKE LOCAL LOWER MATCH MAX MIN MINUTE MODULE MONTH NAMES NATIONAL NATURAL NCHAR NEXT
NO NOT NULL NULLIF NUMERIC OCTET_LENGTH OF ON ONLY OPEN OPTION OR ORDER OUTER OUTPUT
OVERLAPS PAD PARTIAL POSITION PRECISION PREPARE PRESERVE PRIMARY PRIOR PRIVILEGES PROCEDURE
PUBLIC READ REAL REFERENCES RELATIVE RESTRICT REVOKE RIGHT ROLLBACK ROWS SCHEMA SCROLL
SECOND SECTION SELECT SESSION SESSION_USER SET SIZE SMALLINT SOME SPACE SQL SQLCODE
SQLERROR SQLSTATE SUBSTRING SUM SYSTEM_USER TABLE TEMPORARY THEN TIME TIMESTAMP
TIMEZONE_HOUR TIMEZONE_MINUTE TO TRAILING TRANSACTION TRANSLATE TRANSLATION TRIM TRUE UNION
UNIQUE UNKNOWN UPDATE UPPER USAGE USER USING VALUE VALUES VARCHAR VARYING VIEW WHEN
WHENEVER WHERE WITH WORK WRITE YEAR ZONE
ABS ACOS ASIN ATAN ATAN2 CEILING COS DEGREES EXP FLOOR LOG LOG10 MOD PI POWER RADIANS RAND
ROUND SIN SQRT TAN TOP TRUNCATE AREA BOX CENTROID CIRCLE CONTAINS COORD1 COORD2 COORDSYS
DISTANCE INTERSECTS POINT POLYGON REGION""".split())


def adql_name(name: str) -> str:
    """``name`` as ADQL writes it: delimited when it is a reserved word."""
    return f'"{name}"' if name.upper() in ADQL_RESERVED else name


@dataclass(frozen=True)
class TypedColumn(ColumnDescription):
    """A column description with an explicit VOTable datatype (``int``, ``short``,
    ``float``, ...) where the schema's kind alone would say ``long`` or ``double``."""
    datatype: Optional[str] = None

    @property
    def votable_datatype(self) -> str:
        return self.datatype or ColumnDescription.votable_datatype.fget(self)


@dataclass(frozen=True)
class PublishedColumn:
    description: ColumnDescription
    indexed: bool
    principal: bool
    source: Optional[tuple] = None      # (table, column) a view column reads


@dataclass(frozen=True)
class PublishedTable:
    name: str
    schema_name: str
    table_type: str                     # "table" or "view"
    description: str
    columns: tuple                      # PublishedColumn
    keys: tuple = field(default=())     # (target table, ((from column, target column),))

    def column(self, name) -> Optional[PublishedColumn]:
        for column in self.columns:
            if column.description.name == name:
                return column
        return None


def _indexed_columns(table) -> set:
    """Columns that lead an index (a B-tree serves conditions on its first column)."""
    names = {list(table.primary_key.columns)[0].name}
    names.update(list(index.columns)[0].name for index in table.indexes)
    names.update(list(constraint.columns)[0].name for constraint in table.constraints
                 if isinstance(constraint, UniqueConstraint))
    names.update(Q3C_INDEXED.get(table.name, ()))
    return names


def _principal(description: ColumnDescription) -> bool:
    return bool(description.unit) or "meta.main" in (description.ucd or "")


def _table_keys(table) -> tuple:
    keys = []
    for fk in sorted(table.foreign_keys, key=lambda f: f.parent.name):
        target = fk.column.table.name
        if target in PUBLISHED_TABLES:
            keys.append((target, ((fk.parent.name, fk.column.name),)))
    return tuple(keys)


def _published_table(name) -> PublishedTable:
    table = schema.metadata.tables[name]
    indexed = _indexed_columns(table)
    columns = []
    for column in schema.published_columns(table):
        description = schema.describe_column(column)
        columns.append(PublishedColumn(description, column.name in indexed,
                                       _principal(description), (name, column.name)))
    return PublishedTable(name, CATALOGUE_SCHEMA, "table", TABLE_DESCRIPTIONS[name],
                          tuple(columns), _table_keys(table))


def partly_published(name) -> bool:
    """Whether published table ``name`` has columns that are not published (service.adql
    reads such a table through a derived table of the published ones)."""
    table = schema.metadata.tables[name]
    return len(schema.published_columns(table)) < len(table.columns)


def view_sources(sql: str) -> list:
    """[(output name, table, column)] of a view's SELECT: each output column followed
    to the table column it reads (by the table aliases of its FROM and JOINs)."""
    tree = sqlglot.parse_one(sql, read="postgres")
    aliases = {}
    for table in tree.find_all(exp.Table):
        aliases[table.alias_or_name] = table.name
    default_table = tree.args["from_"].this.name
    out = []
    for projection in tree.expressions:
        column = projection.this if isinstance(projection, exp.Alias) else projection
        out.append((projection.alias_or_name, aliases.get(column.table, default_table)
                    if column.table else default_table, column.name))
    return out


def _published_view(name, tables) -> PublishedTable:
    description, sql = schema.VIEWS[name]
    columns, keys = [], []
    for output, table_name, column_name in view_sources(sql):
        source = tables[table_name].column(column_name)
        columns.append(PublishedColumn(replace(source.description, name=output),
                                       source.indexed, True, (table_name, column_name)))
        target = _key_target(table_name, column_name, tables)
        if target is not None:
            keys.append((target[0], ((output, target[1]),)))
    return PublishedTable(name, CATALOGUE_SCHEMA, "view", description, tuple(columns),
                          tuple(keys))


def _key_target(table_name, column_name, tables):
    """(table, column) a view column joins to: the primary key it is, or the one its
    foreign key names."""
    table = schema.metadata.tables[table_name]
    column = table.c[column_name] if column_name in table.c else None
    if column is None:
        return None
    for fk in column.foreign_keys:
        if fk.column.table.name in tables:
            return fk.column.table.name, fk.column.name
    primary = list(table.primary_key.columns)
    if len(primary) == 1 and primary[0] is column and table_name in tables:
        return table_name, column_name
    return None


# ---------------------------------------------------------------------------------------
# TAP_SCHEMA's own tables (TAP 1.1 section 4), described like the catalogue's.
def _meta(name, kind, description, principal=True):
    return PublishedColumn(TypedColumn(name, kind, None, None, description, True,
                                       "int" if kind == "int" else None),
                           False, principal)


# TAP 1.1 section 4: the foreign keys between the TAP_SCHEMA tables themselves.
TAP_SCHEMA_KEYS = {
    "tables": (("schemas", (("schema_name", "schema_name"),)),),
    "columns": (("tables", (("table_name", "table_name"),)),),
    "keys": (("tables", (("from_table", "table_name"),)),
             ("tables", (("target_table", "table_name"),))),
    "key_columns": (("keys", (("key_id", "key_id"),)),),
}


TAP_SCHEMA_TABLES = {
    "schemas": ("Schemas of this service", (
        _meta("schema_name", "text", "schema name"),
        _meta("utype", "text", "utype of the schema"),
        _meta("description", "text", "what the schema holds"),
        _meta("schema_index", "int", "recommended order of the schemas"))),
    "tables": ("Tables of this service", (
        _meta("schema_name", "text", "schema the table is in"),
        _meta("table_name", "text", "table name as used in queries"),
        _meta("table_type", "text", "table or view"),
        _meta("utype", "text", "utype of the table"),
        _meta("description", "text", "what the table holds"),
        _meta("table_index", "int", "recommended order of the tables"))),
    "columns": ("Columns of the tables of this service", (
        _meta("table_name", "text", "table the column is in"),
        _meta("column_name", "text", "column name"),
        _meta("utype", "text", "utype of the column"),
        _meta("ucd", "text", "UCD of the column"),
        _meta("unit", "text", "unit (VOUnit)"),
        _meta("description", "text", "what the column holds"),
        _meta("datatype", "text", "VOTable datatype"),
        _meta("arraysize", "text", "VOTable arraysize"),
        _meta("xtype", "text", "VOTable xtype"),
        _meta("size", "int", "deprecated length (use arraysize)"),
        _meta("principal", "int", "1: shown by default"),
        _meta("indexed", "int", "1: an index serves conditions on it"),
        _meta("std", "int", "1: defined by a standard"),
        _meta("column_index", "int", "recommended order of the columns"))),
    "keys": ("Foreign keys between the tables", (
        _meta("key_id", "text", "key identifier"),
        _meta("from_table", "text", "table holding the key"),
        _meta("target_table", "text", "table the key points to"),
        _meta("utype", "text", "utype of the key"),
        _meta("description", "text", "what the key means"))),
    "key_columns": ("Columns of the foreign keys", (
        _meta("key_id", "text", "key identifier"),
        _meta("from_column", "text", "column in from_table"),
        _meta("target_column", "text", "column in target_table"))),
}


@lru_cache(maxsize=1)
def published_tables() -> dict:
    """{name: PublishedTable}: catalogue tables, then views, then TAP_SCHEMA's."""
    tables = {name: _published_table(name) for name in PUBLISHED_TABLES}
    for name in schema.VIEWS:
        tables[name] = _published_view(name, tables)
    for name, (description, columns) in TAP_SCHEMA_TABLES.items():
        qualified = f"{TAP_SCHEMA}.{name}"
        keys = tuple((f"{TAP_SCHEMA}.{target}", pairs)
                     for target, pairs in TAP_SCHEMA_KEYS.get(name, ()))
        tables[qualified] = PublishedTable(qualified, TAP_SCHEMA, "table", description,
                                           columns, keys)
    return tables


def arraysize(description: ColumnDescription) -> Optional[str]:
    return "*" if description.votable_datatype == "char" else None


def xtype(description: ColumnDescription) -> Optional[str]:
    return "timestamp" if description.kind == "datetime" else None


@lru_cache(maxsize=1)
def tap_schema_rows() -> dict:
    """{TAP_SCHEMA table: [row tuples in the column order above]}."""
    tables = published_tables()
    rows = {"schemas": [(CATALOGUE_SCHEMA, None, "LAMOST LRS value-added catalogue "
                         "(Teff, log g, [Fe/H] from LASSO-MLPNet) and its sources", 0),
                        (TAP_SCHEMA, None, "Description of the tables of this service", 1)],
            "tables": [], "columns": [], "keys": [], "key_columns": []}
    for table_index, table in enumerate(tables.values()):
        rows["tables"].append((table.schema_name, table.name, table.table_type, None,
                               table.description, table_index))
        for column_index, column in enumerate(table.columns):
            d = column.description
            rows["columns"].append((table.name, adql_name(d.name), None, d.ucd, d.unit,
                                    d.description,
                                    d.votable_datatype, arraysize(d), xtype(d), None,
                                    int(column.principal), int(column.indexed),
                                    int(table.schema_name == TAP_SCHEMA), column_index))
        for target, pairs in table.keys:
            key_id = f"{table.name}-{pairs[0][0]}"
            rows["keys"].append((key_id, table.name, target, None,
                                 f"{table.name}.{pairs[0][0]} refers to {target}"))
            rows["key_columns"].extend((key_id, a, b) for a, b in pairs)
    return rows


def cte_name(tap_table: str) -> str:
    """Name of the common table expression serving ``TAP_SCHEMA.<tap_table>``."""
    return f"lamost_vac_tap_schema_{tap_table}"


def sql_literal(value) -> exp.Expression:
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, float) and not math.isfinite(value):
        return exp.Null()
    if isinstance(value, (int, float)):
        return exp.Literal.number(repr(value))
    return exp.Literal.string(str(value))


def values_cte(name, columns, rows) -> exp.CTE:
    """``name AS (SELECT CAST(v.c0 AS type) AS "column", ... FROM (VALUES ...) AS v)``:
    a table of ``rows`` that needs no storage (the reader role may not create any),
    typed even where every value is NULL. ``columns``: [(name, SQL type)]."""
    aliases = [f"c{i}" for i in range(len(columns))]
    if rows:
        values = exp.values([tuple(sql_literal(v) for v in row) for row in rows],
                            alias="v", columns=aliases)
        source = exp.select(*[exp.cast(exp.column(a, table="v"), t).as_(
            exp.to_identifier(n, quoted=True)) for a, (n, t) in zip(aliases, columns)]
        ).from_(values)
    else:       # no rows: the columns only
        source = exp.select(*[exp.cast(exp.Null(), t).as_(exp.to_identifier(n, quoted=True))
                              for n, t in columns]).where(exp.false())
    return exp.CTE(this=source, alias=exp.TableAlias(this=exp.to_identifier(name)))


@lru_cache(maxsize=1)
def tap_schema_ctes() -> dict:
    """{TAP_SCHEMA table: sqlglot CTE} (:func:`values_cte` of :func:`tap_schema_rows`)."""
    return {name: values_cte(cte_name(name),
                             [(c.description.name,
                               "INTEGER" if c.description.kind == "int" else "TEXT")
                              for c in columns], tap_schema_rows()[name])
            for name, (_, columns) in TAP_SCHEMA_TABLES.items()}


# ---------------------------------------------------------------------------------------
# VOSI tables
def _xml(text) -> str:
    from xml.sax.saxutils import escape

    return escape(str(text))


def vosi_tableset() -> str:
    """The VODataService 1.1 ``tableset`` of every published table (VOSI tables)."""
    by_schema = {}
    for table in published_tables().values():
        by_schema.setdefault(table.schema_name, []).append(table)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n'
             '<vosi:tableset xmlns:vosi="http://www.ivoa.net/xml/VOSITables/v1.0" '
             'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
             'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n']
    for schema_row in tap_schema_rows()["schemas"]:
        parts.append(f"  <schema>\n    <name>{_xml(schema_row[0])}</name>\n"
                     f"    <description>{_xml(schema_row[2])}</description>\n")
        for table in by_schema.get(schema_row[0], []):
            parts.append(f'    <table type="{table.table_type}">\n'
                         f"      <name>{_xml(table.name)}</name>\n"
                         f"      <description>{_xml(table.description)}</description>\n")
            for column in table.columns:
                d = column.description
                size = arraysize(d)
                parts.append("      <column>\n"
                             f"        <name>{_xml(adql_name(d.name))}</name>\n")
                if d.description:
                    parts.append(f"        <description>{_xml(d.description)}"
                                 "</description>\n")
                if d.unit:
                    parts.append(f"        <unit>{_xml(d.unit)}</unit>\n")
                if d.ucd:
                    parts.append(f"        <ucd>{_xml(d.ucd)}</ucd>\n")
                parts.append('        <dataType xsi:type="vs:VOTableType"'
                             + (f' arraysize="{size}"' if size else "")
                             + (f' extendedType="{xtype(d)}"' if xtype(d) else "")
                             + f">{d.votable_datatype}</dataType>\n")
                if column.indexed:
                    parts.append("        <flag>indexed</flag>\n")
                if column.principal:
                    parts.append("        <flag>principal</flag>\n")
                if d.nullable:
                    parts.append("        <flag>nullable</flag>\n")
                parts.append("      </column>\n")
            for target, pairs in table.keys:
                parts.append(f"      <foreignKey>\n        <targetTable>{_xml(target)}"
                             "</targetTable>\n")
                for a, b in pairs:
                    parts.append(f"        <fkColumn><fromColumn>{_xml(a)}</fromColumn>"
                                 f"<targetColumn>{_xml(b)}</targetColumn></fkColumn>\n")
                parts.append("      </foreignKey>\n")
            parts.append("    </table>\n")
        parts.append("  </schema>\n")
    parts.append("</vosi:tableset>\n")
    return "".join(parts)
