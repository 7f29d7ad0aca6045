"""ADQL 2.0/2.1 to PostgreSQL + Q3C, on the parsed tree (sqlglot), never on the text.

``translate(query, maxrows)`` parses the query with sqlglot (its T-SQL dialect reads
ADQL's ``TOP n``; ADQL's ``LOG`` is the natural logarithm there too; ``TIMESTAMP`` is
read as ADQL's type, not T-SQL's ROWVERSION: :class:`AdqlRead`), then:

1. **refuses** anything but one SELECT (or UNION / INTERSECT / EXCEPT of SELECTs): a
   second statement, DDL or DML, a table outside the published ones (:mod:`service.
   tap_schema`: ``pg_catalog``, ``information_schema`` and every unpublished table are
   simply not there), a column that no published table has (system columns such as
   ``ctid`` or ``xmin`` included), a function outside the allow-list (``pg_sleep``,
   ``pg_read_file``, ``dblink``, ``set_config``, ``lo_*``, ... are not in it), any
   syntax node outside the allow-list of :data:`ALLOWED_NODES`, a tree nested deeper
   than :data:`MAX_DEPTH` or a query longer than :data:`MAX_QUERY_CHARS`, a CIRCLE or
   POLYGON whose constant declination is outside [-90, 90] or whose constant radius is
   negative (:func:`check_regions`, on every translation, a reused one included). The
   refusal is an :class:`AdqlError` naming the problem, raised before anything reaches
   the database.
2. **rewrites** ADQL geometry to the Q3C functions the catalogue indexes (pgSphere does
   not install on PostgreSQL 15): ``CONTAINS(POINT(ra, dec), CIRCLE(ra0, dec0, r)) = 1``
   -> ``q3c_radial_query(ra, dec, ra0, dec0, r)`` (also ``INTERSECTS`` with a point, and
   ``= 0`` -> ``NOT``), ``POLYGON`` -> ``q3c_poly_query``, ``DISTANCE`` -> ``q3c_dist``,
   ``COORD1``/``COORD2`` of a point -> its coordinates; ``TAP_SCHEMA.<table>`` -> the
   generated ``VALUES`` tables (:func:`service.tap_schema.tap_schema_ctes`).
3. caps the rows: the outermost ``LIMIT`` (ADQL ``TOP``) becomes at most ``maxrows``.
4. **binds** the numbers given to the Q3C functions (a cone's centre and radius, a
   polygon's vertices, a DISTANCE's point) as statement parameters instead of literals:
   every cone of one query shape is then the same statement, so that its translation is
   reused (:class:`QueryShapes`) and psycopg prepares it once per connection. PostgreSQL
   still plans each execution for its values: a generic plan cannot know that a cone is
   small and joins it to the estimates by scanning them all (unlike /scs's statement,
   which is built for a generic plan).

The SQL is generated from the checked tree by sqlglot's PostgreSQL dialect (literals
quoted by it) for psycopg; the service runs it as the read-only reader role with a
statement timeout.
"""
import math
import re
import secrets
import threading
from dataclasses import dataclass, field, replace
from typing import Optional

import sqlglot
from sqlglot import exp
from sqlglot.dialects.tsql import TSQL
from sqlglot.errors import OptimizeError, ParseError, TokenError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.scope import traverse_scope
from sqlglot.tokens import TokenType

from service import tap_schema

MAX_QUERY_CHARS = 20000
# PostgreSQL's system columns: refused by name, however the query aliases them
SYSTEM_COLUMNS = {"tableoid", "xmin", "xmax", "cmin", "cmax", "ctid"}
MAX_DEPTH = 60              # syntax-tree depth; a real query stays far below it


class AdqlRead(TSQL):
    """How ADQL is read: T-SQL (ADQL's ``SELECT TOP n`` is T-SQL syntax), except that
    ``TIMESTAMP`` is ADQL's (and PostgreSQL's) timestamp type, not T-SQL's synonym of
    ``ROWVERSION``."""

    class Tokenizer(TSQL.Tokenizer):
        KEYWORDS = {**TSQL.Tokenizer.KEYWORDS, "TIMESTAMP": TokenType.TIMESTAMP}


ADQL_READ_DIALECT = AdqlRead

# Every syntax node a query may contain (functions: ALLOWED_FUNCTIONS below).
ALLOWED_NODES = (
    exp.Select, exp.Union, exp.Intersect, exp.Except, exp.From, exp.Join, exp.Where,
    exp.Group, exp.Having, exp.Order, exp.Ordered, exp.Limit, exp.Offset, exp.Distinct,
    exp.Alias, exp.TableAlias, exp.Table, exp.Column, exp.Identifier, exp.Star,
    exp.Literal, exp.Null, exp.Boolean, exp.Paren, exp.Subquery, exp.With, exp.CTE,
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.And, exp.Or, exp.Not, exp.Is,
    exp.In, exp.Between, exp.Like, exp.ILike, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod,
    exp.Neg, exp.DPipe, exp.Exists, exp.Tuple, exp.DataType,
)
ALLOWED_FUNCTIONS = (
    # ADQL 2.1 section 2.3 mathematical and trigonometric functions
    exp.Abs, exp.Ceil, exp.Floor, exp.Exp, exp.Ln, exp.Log, exp.Pow, exp.Sqrt, exp.Round,
    exp.Trunc, exp.Rand, exp.Sign, exp.Pi, exp.Degrees, exp.Radians, exp.Sin, exp.Cos,
    exp.Tan, exp.Cot, exp.Asin, exp.Acos, exp.Atan, exp.Atan2,
    # aggregates, strings, conditionals
    exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Lower, exp.Upper, exp.Trim,
    exp.Length, exp.Substring, exp.Coalesce, exp.Nullif, exp.Case, exp.If, exp.Cast,
)
# ADQL 2.1 CAST targets (not regclass, regproc, ...: those look up system catalogues).
CAST_TYPES = {exp.DataType.Type.SMALLINT, exp.DataType.Type.INT, exp.DataType.Type.BIGINT,
              exp.DataType.Type.FLOAT, exp.DataType.Type.DOUBLE, exp.DataType.Type.DECIMAL,
              exp.DataType.Type.CHAR, exp.DataType.Type.VARCHAR, exp.DataType.Type.NCHAR,
              exp.DataType.Type.NVARCHAR, exp.DataType.Type.TEXT,
              exp.DataType.Type.TIMESTAMP, exp.DataType.Type.DATETIME}
GEOMETRY_FUNCTIONS = {"POINT", "CIRCLE", "POLYGON", "BOX", "CONTAINS", "INTERSECTS",
                      "DISTANCE", "COORD1", "COORD2", "COORDSYS", "AREA", "CENTROID",
                      "REGION"}
ALLOWED_ANONYMOUS = {"LOG10"} | GEOMETRY_FUNCTIONS
COORDINATE_SYSTEMS = {"", "ICRS"}
UPLOAD_SCHEMA = "TAP_UPLOAD"


class AdqlError(ValueError):
    """A query this service refuses; the message names the problem."""


@dataclass
class Translation:
    sql: str                # PostgreSQL for psycopg: % doubled, Q3C numbers %(name)s
    tree: exp.Expression    # the translated tree (for the output columns' metadata)
    parameters: dict = field(default_factory=dict)   # name -> value of the placeholders


def translate(query: str, maxrows: Optional[int] = None, uploads=None) -> Translation:
    """``uploads``: {name: :class:`service.tap_upload.UploadedTable`} reachable as
    ``TAP_UPLOAD.name``. A query without uploads whose shape was translated before (the
    same text but for the numbers bound as parameters) is not parsed again
    (:class:`QueryShapes`)."""
    if uploads:
        translation = _translate(query, maxrows, uploads)[0]
    else:
        translation = QUERY_SHAPES.translate(query, maxrows)
    check_regions(translation)
    return translation


def _translate(query, maxrows, uploads=None):
    """(:class:`Translation`, where its parameters are in ``query``: see
    :func:`driver_statement`)."""
    uploads = {name.lower(): table for name, table in (uploads or {}).items()}
    tree = parse(query)
    relations = check(tree, uploads)
    generated = {tap_schema.TAP_SCHEMA.lower(): dict(tap_schema.tap_schema_ctes()),
                 UPLOAD_SCHEMA.lower(): {name: t.cte for name, t in uploads.items()}}
    tree = rewrite_generated_tables(tree, generated)
    rewrite_partly_published(tree, relations)
    tree = rewrite_geometry(tree)
    if maxrows is not None:
        tree = cap_rows(tree, maxrows)
    _default_null_order(tree)
    return driver_statement(tree)


# A number as query shapes see it: digits with an optional fraction and exponent, with
# no letter, digit, underscore or dot on either side (those make it part of a name, or
# sqlglot reads it otherwise).
NUMBER_TEXT = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?![\w.])")


class QueryShapes:
    """Translations by query shape, so that a client sending the same query with other
    cone centres (the common case: a list of targets) does not pay for parsing, checking
    and rewriting each time (sqlglot is pure Python: ~10 ms per query, more than the
    database takes for a small cone).

    The shape of a query is its text with the numbers (:data:`NUMBER_TEXT`) cut out.
    An entry keeps the translation of the first query of a shape and, for each of its
    numbers, either which Q3C parameter it became (its value is the parameter's) or its
    text. A later query of the same shape whose other numbers have the same text gets
    the same SQL with its own parameters; anything else is translated and checked in
    full. A shape is kept only when every parameter's literal is exactly one of the
    numbers cut out, so a number is never swapped for something sqlglot reads otherwise.
    """

    def __init__(self, size=256):
        self.size = size
        self._entries = {}      # (maxrows, texts between numbers) -> (Translation, slots)
        self._lock = threading.Lock()

    def translate(self, query, maxrows):
        if not query or len(query) > MAX_QUERY_CHARS:   # the full path says why
            return _translate(query, maxrows)[0]
        pieces = NUMBER_TEXT.split(query)
        key, numbers = (maxrows, tuple(pieces[0::2])), pieces[1::2]
        entry = self._entries.get(key)
        if entry is not None:
            translation, slots = entry
            parameters = _parameter_values(numbers, slots)
            if parameters is not None:
                return replace(translation, parameters=parameters)
        translation, literals = _translate(query, maxrows)
        spans = [match.span(1) for match in NUMBER_TEXT.finditer(query)]
        parameter_of = {span: (f"q3c_{n}", sign) for n, (span, sign) in enumerate(literals)}
        if set(parameter_of) <= set(spans):
            slots = tuple(parameter_of.get(span, text) for span, text in zip(spans, numbers))
            with self._lock:
                if len(self._entries) >= self.size:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[key] = (translation, slots)
        return translation


def _parameter_values(numbers, slots):
    """{q3c_<n>: value} of a query's ``numbers`` in a shape's ``slots`` (a (parameter
    name, sign) pair, or the text the number must have), or None when a number differs
    from its text or a parameter is not a finite number."""
    parameters = {}
    for text, slot in zip(numbers, slots):
        if isinstance(slot, str):
            if text != slot:
                return None
            continue
        name, sign = slot
        value = _number(text)
        if value is None:
            return None
        parameters[name] = sign * value
    return parameters


QUERY_SHAPES = QueryShapes()


# ---------------------------------------------------------------------------------------
# Parsing
def parse(query: str) -> exp.Expression:
    if not query or not query.strip():
        raise AdqlError("QUERY is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise AdqlError(f"QUERY is {len(query)} characters long; at most "
                        f"{MAX_QUERY_CHARS} are accepted")
    try:
        statements = [s for s in sqlglot.parse(query, read=ADQL_READ_DIALECT)
                      if s is not None]
    except ParseError as error:
        raise AdqlError(_syntax_message(error)) from None
    except TokenError as error:
        raise AdqlError(f"ADQL syntax error: {error}") from None
    except RecursionError:
        raise AdqlError("the query is nested too deeply") from None
    if not statements:
        raise AdqlError("QUERY holds no statement")
    if len(statements) > 1:
        raise AdqlError(f"QUERY holds {len(statements)} statements; one SELECT is accepted")
    # sqlglot reads CONTAINS(a, b) as its own node; the geometry rewrite expects ADQL's.
    return statements[0].transform(
        lambda node: exp.Anonymous(this="CONTAINS", expressions=[node.this, node.expression])
        if isinstance(node, exp.Contains) else node, copy=False)


def _syntax_message(error: ParseError) -> str:
    if not error.errors:
        return f"ADQL syntax error: {error}"
    first = error.errors[0]
    near = (first.get("highlight") or "").strip()
    near_text = f" near {near!r}" if near else ""
    return (f"ADQL syntax error at line {first.get('line')}, column {first.get('col')}"
            f"{near_text}: {first.get('description')}")


# ---------------------------------------------------------------------------------------
# Checks
def _depth_first(tree):
    """(node, depth) of every node, without recursion (a deep tree must not overflow)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        stack.extend((child, depth + 1) for child in node.iter_expressions())


def function_name(node) -> str:
    return node.name.upper() if isinstance(node, exp.Anonymous) else node.sql_name()


def check(tree: exp.Expression, uploads=None) -> list:
    """Raise :class:`AdqlError` unless ``tree`` only reads published tables and columns
    through allowed syntax and functions; returns its :func:`relations`."""
    if not isinstance(tree, (exp.Select, exp.SetOperation)):
        raise AdqlError(f"only SELECT queries are accepted, not {tree.key.upper()}")
    query_names = set()         # CTE names, table and column aliases the query defines
    for node, depth in _depth_first(tree):
        if depth > MAX_DEPTH:
            raise AdqlError(f"the query is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, (exp.Alias, exp.TableAlias)):
            query_names.add(node.alias_or_name.lower() if isinstance(node, exp.Alias)
                            else node.name.lower())
            if isinstance(node, exp.TableAlias):
                query_names.update(c.name.lower() for c in node.columns)
        if isinstance(node, exp.DataType) and node.this not in CAST_TYPES:
            # the type as ADQL names it (PostgreSQL's name may be another: ROWVERSION
            # is BYTEA there)
            raise AdqlError(f"CAST to {node.this.value} is not accepted; numbers (SMALLINT, "
                            "INTEGER, BIGINT, REAL, DOUBLE PRECISION, DECIMAL), text "
                            "(CHAR, VARCHAR) and TIMESTAMP are")
        if isinstance(node, ALLOWED_NODES):
            continue
        if isinstance(node, exp.Func):     # (sqlglot's AND, OR, ... are Funcs too)
            if isinstance(node, exp.Anonymous):
                if node.name.upper() not in ALLOWED_ANONYMOUS:
                    raise AdqlError(f"function {node.name} is not available; ADQL's "
                                    "mathematical, aggregate and geometry functions are")
            elif not isinstance(node, ALLOWED_FUNCTIONS):
                raise AdqlError(f"function {function_name(node)} is not available; ADQL's "
                                "mathematical, aggregate and geometry functions are")
        else:
            raise AdqlError(f"{node.key.upper()} is not accepted in a query here: "
                            f"{_snippet(node)}")
    published = tap_schema.published_tables()
    catalogue = {name.lower() for name, t in published.items()
                 if t.schema_name == tap_schema.CATALOGUE_SCHEMA}
    tap_tables = {name.lower() for name in tap_schema.TAP_SCHEMA_TABLES}
    uploads = uploads or {}
    found = relations(tree)
    for table in found:
        _check_table(table, catalogue, tap_tables, uploads)
    columns = {c.description.name.lower() for t in published.values() for c in t.columns}
    columns.update(c.lower() for t in uploads.values() for c in t.column_names)
    for column in tree.find_all(exp.Column):
        if isinstance(column.this, exp.Star):
            continue
        name = column.name.lower()
        if name in SYSTEM_COLUMNS and name not in columns:
            raise AdqlError(f"column {column.name} is not published: it is a PostgreSQL "
                            "system column")
        # ``x AS x`` defines the name x: it must not vouch for the column it names
        own_alias = isinstance(column.parent, exp.Alias) and \
            column.parent.alias_or_name.lower() == name
        if name not in columns and (name not in query_names or own_alias):
            raise AdqlError(f"column {column.name} is not published: no table of this "
                            "service has it (see /tap/tables)")
    return found


def relations(tree) -> list:
    """The table references of ``tree`` that PostgreSQL reads as tables of the database,
    i.e. every one but those naming a common table expression visible where they stand
    (sqlglot's scopes follow SQL's rules: a CTE is not visible in its own body nor before
    its WITH, nor outside the query that holds that WITH). Going by names alone, ``FROM
    (...) AS quarantine, quarantine`` read the unpublished table quarantine. Names are
    compared as PostgreSQL does (unquoted ones in lower case): ``WITH "Models" AS (...)
    SELECT * FROM Models`` reads the table models."""
    normalised = normalize_identifiers(tree.copy(), dialect="postgres")
    try:
        scopes = traverse_scope(normalised)
    except (OptimizeError, RecursionError) as error:
        raise AdqlError(f"the query's tables cannot be resolved: {error}") from None
    common = {id(table) for scope in scopes for table in scope.tables
              if not table.args.get("db") and table.name in scope.cte_sources}
    # the copy has the tree's shape: its tables come in the same order
    return [table for table, copy in zip(tree.find_all(exp.Table), normalised.find_all(exp.Table))
            if id(copy) not in common]


def _check_table(table, catalogue, tap_tables, uploads):
    shown = table.sql(dialect="postgres")
    if table.args.get("catalog") is not None or not isinstance(table.this, exp.Identifier):
        raise AdqlError(f"table {shown} is not published (see /tap/tables)")
    schema_name, name = table.db.lower(), table.name.lower()
    if schema_name == tap_schema.TAP_SCHEMA.lower():
        if name not in tap_tables:
            raise AdqlError(f"TAP_SCHEMA has no table {table.name}; it has "
                            + ", ".join(sorted(tap_tables)))
        return
    if schema_name == UPLOAD_SCHEMA.lower():
        if name not in uploads:
            raise AdqlError(f"no table {table.name} was uploaded with this query "
                            "(UPLOAD=name,param:part)")
        return
    if schema_name in ("", tap_schema.CATALOGUE_SCHEMA) and name in catalogue:
        return
    raise AdqlError(f"table {shown} is not published; the published tables are listed "
                    "in TAP_SCHEMA.tables and /tap/tables")


def _snippet(node, length=60) -> str:
    text = node.sql(dialect="postgres")
    return text if len(text) <= length else text[:length] + "..."


# ---------------------------------------------------------------------------------------
# Rewrites
def rewrite_generated_tables(tree, generated):
    """``TAP_SCHEMA.x`` and ``TAP_UPLOAD.x`` -> common table expressions put in front
    of the query (``generated``: {schema: {table: CTE}}, names in lower case)."""
    used = []
    for table in list(tree.find_all(exp.Table)):
        schema_name, name = table.db.lower(), table.name.lower()
        if schema_name not in generated:
            continue
        cte = generated[schema_name][name]
        if all(c is not cte for c in used):
            used.append(cte)
        alias = table.alias or table.name
        table.replace(exp.Table(this=exp.to_identifier(cte.alias),
                                alias=exp.TableAlias(this=exp.to_identifier(alias))))
    for column in tree.find_all(exp.Column):
        if column.args.get("db") is not None and column.args["db"].name.lower() in generated:
            column.set("db", None)
    if not used:
        return tree
    ctes = [cte.copy() for cte in used]
    existing = tree.args.get("with_")
    if existing is not None:
        ctes.extend(existing.expressions)
    tree.set("with_", exp.With(expressions=ctes))
    return tree


def rewrite_partly_published(tree, relations):
    """A published table with columns that are not published (``etl.schema.col``) is
    read through a derived table of its published columns, under the reference's own alias
    (its column list and quoting kept), so that no spelling of a query reaches the
    others: the database itself says they do not exist."""
    published = tap_schema.published_tables()
    rewritten = set()
    for table in relations:
        name = table.name.lower()
        if table.db.lower() not in ("", tap_schema.CATALOGUE_SCHEMA) or \
                name not in tap_schema.PUBLISHED_TABLES or not tap_schema.partly_published(name):
            continue
        derived = exp.select(*(exp.column(c.description.name, quoted=True)
                               for c in published[name].columns)).from_(exp.Table(
            this=exp.to_identifier(name), db=exp.to_identifier(tap_schema.CATALOGUE_SCHEMA)))
        alias = table.args.get("alias")
        subquery = exp.Subquery(this=derived, alias=alias.copy() if alias is not None
                                else exp.TableAlias(this=exp.to_identifier(name)))
        subquery.meta["published_table"] = name      # its columns' metadata are the table's
        table.replace(subquery)
        rewritten.add(name)
    # a column named through the schema (public.models.version) names the derived table now
    for column in tree.find_all(exp.Column):
        if column.args.get("db") is not None and column.table.lower() in rewritten:
            column.set("db", None)


def _is_anonymous(node, *names) -> bool:
    return isinstance(node, exp.Anonymous) and node.name.upper() in names


def _coordinates(node, what):
    """The numeric arguments of a geometry constructor, its coordinate system checked
    (ADQL 2.0: a first string argument; 2.1 lets it out)."""
    arguments = list(node.expressions)
    if arguments and isinstance(arguments[0], exp.Literal) and arguments[0].is_string:
        system = arguments.pop(0).this.strip().upper()
        if system not in COORDINATE_SYSTEMS:
            raise AdqlError(f"{what}: coordinate system {system!r} is not supported; the "
                            "catalogue is ICRS")
    return arguments


def _point(node):
    """(ra, dec) of POINT(...)."""
    if not _is_anonymous(node, "POINT"):
        raise AdqlError(f"a POINT is expected, not {_snippet(node)}")
    arguments = _coordinates(node, "POINT")
    if len(arguments) != 2:
        raise AdqlError("POINT takes two coordinates (after the optional coordinate system)")
    return arguments


def _region_condition(point, region):
    """Q3C condition: (ra, dec) inside ``region`` (CIRCLE or POLYGON)."""
    ra, dec = point
    if _is_anonymous(region, "CIRCLE"):
        arguments = _coordinates(region, "CIRCLE")
        if len(arguments) == 2 and _is_anonymous(arguments[0], "POINT"):   # ADQL 2.1
            arguments = [*_point(arguments[0]), arguments[1]]
        if len(arguments) != 3:
            raise AdqlError("CIRCLE takes a centre (two coordinates or a POINT) and a radius")
        return exp.func("q3c_radial_query", ra, dec, *arguments)
    if _is_anonymous(region, "POLYGON"):
        arguments = _coordinates(region, "POLYGON")
        if arguments and all(_is_anonymous(a, "POINT") for a in arguments):
            arguments = [c for a in arguments for c in _point(a)]
        if len(arguments) < 6 or len(arguments) % 2:
            raise AdqlError("POLYGON takes at least three vertices (pairs of coordinates)")
        vertices = exp.cast(exp.Array(expressions=arguments), "DOUBLE PRECISION[]")
        return exp.func("q3c_poly_query", ra, dec, vertices)
    if _is_anonymous(region, "BOX"):
        raise AdqlError("BOX is not supported (deprecated in ADQL 2.1); use a POLYGON")
    raise AdqlError(f"a CIRCLE or POLYGON is expected, not {_snippet(region)}")


def _containment(node):
    """CONTAINS(point, region) / INTERSECTS(point or region, region or point) as a Q3C
    boolean condition."""
    name = node.name.upper()
    arguments = list(node.expressions)
    if len(arguments) != 2:
        raise AdqlError(f"{name} takes two arguments")
    first, second = arguments
    if name == "INTERSECTS" and _is_anonymous(second, "POINT"):
        first, second = second, first
    if not _is_anonymous(first, "POINT"):
        raise AdqlError(f"{name} is supported with a POINT and a CIRCLE or POLYGON "
                        "(the catalogue's positions are points)")
    return _region_condition(_point(first), second)


def _is_number(node, value) -> bool:
    return (isinstance(node, exp.Literal) and not node.is_string
            and node.this.strip() in (str(value), f"{value}.0"))


def rewrite_geometry(tree):
    def containment_comparison(node):
        if isinstance(node, exp.EQ):
            for a, b in ((node.this, node.expression), (node.expression, node.this)):
                if _is_anonymous(a, "CONTAINS", "INTERSECTS"):
                    if _is_number(b, 1):
                        return _containment(a)
                    if _is_number(b, 0):
                        return exp.not_(_containment(a))
        return node

    def other_geometry(node):
        if _is_anonymous(node, "CONTAINS", "INTERSECTS"):
            return exp.Case(ifs=[exp.If(this=_containment(node), true=exp.Literal.number(1))],
                            default=exp.Literal.number(0))
        if _is_anonymous(node, "DISTANCE"):
            arguments = list(node.expressions)
            if len(arguments) == 2:
                arguments = [*_point(arguments[0]), *_point(arguments[1])]
            if len(arguments) != 4:
                raise AdqlError("DISTANCE takes two POINTs (or four coordinates)")
            return exp.func("q3c_dist", *arguments)
        if _is_anonymous(node, "COORD1", "COORD2"):
            if len(node.expressions) != 1:
                raise AdqlError(f"{node.name.upper()} takes one POINT")
            return _point(node.expressions[0])[0 if node.name.upper() == "COORD1" else 1]
        if _is_anonymous(node, "COORDSYS"):
            return exp.Literal.string("ICRS")
        if _is_anonymous(node, *GEOMETRY_FUNCTIONS):
            raise AdqlError(f"{node.name.upper()} is supported only inside CONTAINS, "
                            "INTERSECTS, DISTANCE, COORD1 and COORD2 (results hold "
                            "numbers and text, not geometries)")
        return node

    tree = tree.transform(containment_comparison, copy=False)
    return tree.transform(other_geometry, copy=False)


def _constant(node, parameters):
    """The value of a number given as a literal or a bound parameter (signs and
    parentheses around it included), or None for anything else (a column, arithmetic:
    the database checks those)."""
    if isinstance(node, exp.Paren):
        return _constant(node.this, parameters)
    if isinstance(node, exp.Neg):
        value = _constant(node.this, parameters)
        return None if value is None else -value
    if isinstance(node, exp.Placeholder):
        return parameters.get((node.name or "")[PLACEHOLDER_MARKER_CHARS:])
    if isinstance(node, exp.Literal) and not node.is_string:
        return _number(node.this)
    return None


def check_regions(translation):
    """Refuse a CIRCLE or POLYGON whose constant declination is outside [-90, 90] or
    whose constant radius is negative (Q3C would fail with an internal error, or find
    nothing). A number too large for a float is left to the database, which refuses it
    as out of range."""
    parameters = translation.parameters
    for function in translation.tree.find_all(exp.Anonymous):
        name = function.name.upper()
        arguments = list(function.expressions)
        if name == "Q3C_RADIAL_QUERY" and len(arguments) == 5:
            _check_declination("CIRCLE", "the centre's", _constant(arguments[3], parameters))
            radius = _constant(arguments[4], parameters)
            if radius is not None and (math.isnan(radius) or radius < 0):
                raise AdqlError(f"CIRCLE: the radius must be >= 0 degrees, got {radius!r}")
        elif name == "Q3C_POLY_QUERY" and len(arguments) == 3:
            array = arguments[2].this if isinstance(arguments[2], exp.Cast) else arguments[2]
            if isinstance(array, exp.Array):
                for index, vertex in enumerate(array.expressions[1::2]):
                    _check_declination("POLYGON", f"vertex {index + 1}'s",
                                       _constant(vertex, parameters))


def _check_declination(region, whose, value):
    if value is None or math.isinf(value):
        return
    if math.isnan(value) or not -90.0 <= value <= 90.0:
        raise AdqlError(f"{region}: {whose} declination must be between -90 and 90 "
                        f"degrees, got {value!r}")


def _top_number(text):
    """A TOP's value (a digit string); a number too long for int() is larger than any
    row cap."""
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10 ** 18


def cap_rows(tree, maxrows: int):
    """The outermost LIMIT (ADQL TOP) at most ``maxrows``."""
    if not isinstance(tree, exp.Select):
        return exp.select("*").from_(tree.subquery("adql_query")).limit(maxrows)
    limit = tree.args.get("limit")
    current = None
    if limit is not None:
        value = limit.expression
        if not (isinstance(value, exp.Literal) and not value.is_string
                and value.this.isdigit()):
            raise AdqlError(f"TOP takes a whole number, not {_snippet(value)}")
        current = _top_number(value.this)
    return tree.limit(maxrows if current is None else min(current, maxrows), copy=False)


def _default_null_order(tree):
    """ORDER BY without an explicit NULLS clause keeps PostgreSQL's default (sqlglot
    would spell out T-SQL's, which stops an index from serving the order)."""
    for ordered in tree.find_all(exp.Ordered):
        ordered.set("nulls_first", bool(ordered.args.get("desc")))


Q3C_FUNCTIONS = {"Q3C_RADIAL_QUERY", "Q3C_POLY_QUERY", "Q3C_DIST"}
PLACEHOLDER_MARKER_CHARS = 16     # the random marker in front of a placeholder's name
# Nodes between a Q3C function and a number that becomes a parameter: arithmetic on
# numbers and the polygon's array. Not a sub-query, where a number can be a position
# (ORDER BY 1), nor a type (DECIMAL(10, 2)).
NUMBER_CONTEXT = (exp.Neg, exp.Paren, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Array,
                  exp.Cast)


def driver_statement(tree):
    """The psycopg statement of a translated tree: the numbers given to the Q3C
    functions become placeholders ``%(q3c_0)s``, ... with their values in
    ``parameters``; every other ``%`` (a LIKE pattern, a string) is doubled, so that
    psycopg reads it as text. The placeholders are generated with a random marker in
    their names, which no query can contain, so that escaping tells them from the
    query's own text; the final names depend only on their order, so that every query
    of one shape gives the same statement.

    Returns the :class:`Translation` and, per parameter, (the span of its number in the
    query text, or None; its sign: a unary minus is taken into the value)."""
    marker = secrets.token_hex(PLACEHOLDER_MARKER_CHARS // 2)
    parameters, literals = {}, []
    for function in list(tree.find_all(exp.Anonymous, bfs=False)):
        if function.name.upper() not in Q3C_FUNCTIONS:
            continue
        for literal in list(function.find_all(exp.Literal, bfs=False)):
            value = _number_argument(literal, function)
            if value is None:
                continue
            negated = isinstance(literal.parent, exp.Neg)
            name = f"q3c_{len(parameters)}"
            parameters[name] = -value if negated else value
            start, end = literal.meta.get("start"), literal.meta.get("end")
            span = (start, end + 1) if start is not None and end is not None else None
            literals.append((span, -1 if negated else 1))
            (literal.parent if negated else literal).replace(
                exp.Placeholder(this=marker + name))
    sql = tree.sql(dialect="postgres").replace("%", "%%")
    for name in parameters:
        sql = sql.replace(f"%%({marker}{name})s", f"%({name})s")
    return Translation(sql, tree, parameters), literals


def _number_argument(literal, function):
    """The value of a finite number literal that reaches ``function`` through arithmetic
    only, else None."""
    if literal.is_string:
        return None
    node = literal.parent
    while node is not function:
        if not isinstance(node, NUMBER_CONTEXT):
            return None
        node = node.parent
    return _number(literal.this)


def _number(text):
    """The value of a number's text (int when it has only digits), None if it is not a
    finite number: int() refuses more than 4300 digits (and a float could not hold
    them), float() takes any length, giving inf when too large."""
    try:
        value = int(text) if text.isdigit() and len(text) <= 18 else float(text)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def top_value(tree) -> Optional[int]:
    """The query's own TOP / LIMIT, when it has one (before :func:`cap_rows`)."""
    limit = tree.args.get("limit") if isinstance(tree, exp.Select) else None
    if limit is None:
        return None
    value = limit.expression
    return (_top_number(value.this) if isinstance(value, exp.Literal) and value.this.isdigit()
            else None)
