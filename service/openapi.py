"""Request parameters: one definition validates the request and documents it.

Each endpoint declares its parameters as :class:`Param` objects (the blueprints build them
from the schema's column metadata and the service limits). :func:`parse` validates a
request against them (a :class:`ParamError` naming the parameter becomes a 400, or a
VOTable error document for /scs), and :func:`build_document` turns the very same objects
into the OpenAPI 3 document served at ``/openapi.json``, so documentation and validation
cannot drift apart.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

INT64_MAX = 2 ** 63 - 1
# ASCII only: Python's \d, float() and int() also take other scripts' digits ('١٢', '１２').
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")
ASCII_SPACE = " \t\r\n\f\v"    # str.strip() would also drop U+00A0, U+3000, ...
_MISSING = object()


class ParamError(ValueError):
    """A bad request parameter; ``str()`` names the parameter."""

    def __init__(self, name: str, message: str):
        self.name = name
        self.message = message
        super().__init__(f"{name}: {message}")


def _shown(raw: str, limit: int = 40) -> str:
    text = raw if len(raw) <= limit else raw[:limit] + "..."
    return repr(text)


@dataclass(frozen=True)
class Param:
    """One query (or path) parameter.

    ``kind``: ``number`` (finite float), ``integer`` (int64), ``string`` (matching
    ``pattern``), ``enum`` (one of ``choices``; matched case-insensitively when
    ``ignore_case``) or ``list`` (comma-separated ``choices``).
    """
    name: str
    kind: str
    description: str
    required: bool = False
    default: Any = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    choices: Sequence[str] = ()
    pattern: Optional[str] = None
    max_length: int = 200
    ignore_case: bool = False
    location: str = "query"
    example: Any = None
    aliases: Mapping[str, str] = field(default_factory=dict)  # accepted spelling -> value

    # ---- validation ------------------------------------------------------------------
    def parse(self, raw: str):
        if len(raw) > self.max_length:
            raise ParamError(self.name, f"longer than {self.max_length} characters")
        if self.kind == "number":
            return self._check_range(self._number(raw), raw)
        if self.kind == "integer":
            return self._check_range(self._integer(raw), raw)
        if self.kind == "enum":
            return self._choice(raw.strip(ASCII_SPACE))
        if self.kind == "list":
            items = [item.strip(ASCII_SPACE) for item in raw.split(",")]
            if not all(items):
                raise ParamError(self.name, f"empty item in the list {_shown(raw)}")
            values = [self._choice(item) for item in items]
            if len(set(values)) != len(values):
                raise ParamError(self.name, "an item is given more than once")
            return values
        if self.kind == "string":
            if self.pattern and not re.fullmatch(self.pattern, raw):
                raise ParamError(self.name, f"{_shown(raw)} does not match {self.pattern}")
            return raw
        raise AssertionError(self.kind)  # pragma: no cover

    def _number(self, raw):
        text = raw.strip(ASCII_SPACE)
        if not _NUMBER.fullmatch(text):
            raise ParamError(self.name, f"not a decimal number (ASCII digits 0-9): "
                                        f"{_shown(raw)}")
        value = float(text)
        if not math.isfinite(value):
            raise ParamError(self.name, f"not a finite number: {_shown(raw)}")
        return value

    def _integer(self, raw):
        text = raw.strip(ASCII_SPACE)
        if not _INTEGER.fullmatch(text):
            raise ParamError(self.name, f"not an integer (ASCII digits 0-9): {_shown(raw)}")
        value = int(text)
        if abs(value) > INT64_MAX:
            raise ParamError(self.name, f"out of the 64-bit integer range: {_shown(raw)}")
        return value

    def _check_range(self, value, raw):
        low, high = self.minimum, self.maximum
        too_low = low is not None and (value <= low if self.exclusive_minimum else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            left = "(" if self.exclusive_minimum else "["
            low_text = "-inf" if low is None else f"{low:g}"
            high_text = "inf" if high is None else f"{high:g}"
            raise ParamError(self.name, f"{_shown(raw)} is outside {left}{low_text}, "
                                        f"{high_text}]")
        return value

    def _choice(self, raw):
        key = raw.lower() if self.ignore_case else raw
        for choice in self.choices:
            if key == (choice.lower() if self.ignore_case else choice):
                return choice
        for alias, value in self.aliases.items():
            if key == (alias.lower() if self.ignore_case else alias):
                return value
        allowed = ", ".join(self.choices)
        raise ParamError(self.name, f"{_shown(raw)} is not one of: {allowed}")

    # ---- documentation ---------------------------------------------------------------
    def schema(self) -> dict:
        if self.kind == "number":
            schema = {"type": "number"}
        elif self.kind == "integer":
            schema = {"type": "integer", "format": "int64"}
        elif self.kind == "enum":
            schema = {"type": "string", "enum": list(self.choices) + list(self.aliases)}
        elif self.kind == "list":
            schema = {"type": "array", "items": {"type": "string", "enum": list(self.choices)},
                      "minItems": 1, "uniqueItems": True}
        else:
            schema = {"type": "string", "maxLength": self.max_length}
            if self.pattern:
                schema["pattern"] = self.pattern
        if self.kind in ("number", "integer"):
            if self.minimum is not None:
                if self.exclusive_minimum:
                    schema["exclusiveMinimum"] = True
                schema["minimum"] = self.minimum
            if self.maximum is not None:
                schema["maximum"] = self.maximum
        if self.default is not None:
            schema["default"] = self.default
        if self.example is not None:
            schema["example"] = self.example
        return schema

    def openapi(self) -> dict:
        document = {"name": self.name, "in": self.location, "description": self.description,
                    "required": self.required or self.location == "path",
                    "schema": self.schema()}
        if self.kind == "list":
            document.update(style="form", explode=False)
        return document


def parse(params: Sequence[Param], args, *, ignore_case=False, allow_unknown=False,
          path_values: Mapping[str, str] = None) -> dict:
    """Validated values of ``params`` from ``args`` (a werkzeug MultiDict).

    Absent or empty optional parameters take their default. A parameter given twice, a
    missing required one, or (unless ``allow_unknown``) an unknown one is a
    :class:`ParamError`. ``ignore_case``: parameter names match case-insensitively (DALI).
    """
    by_key = {(p.name.upper() if ignore_case else p.name): p for p in params}
    raw_values = {}
    for key in args.keys():
        lookup = key.upper() if ignore_case else key
        param = by_key.get(lookup)
        if param is None:
            if allow_unknown:
                continue
            known = ", ".join(p.name for p in params if p.location == "query")
            raise ParamError(key[:40], f"unknown parameter (known: {known})")
        values = args.getlist(key)
        if param.name in raw_values or len(values) > 1:
            raise ParamError(param.name, "given more than once")
        raw_values[param.name] = values[0]
    for name, value in (path_values or {}).items():
        raw_values[name] = value
    parsed = {}
    for param in params:
        raw = raw_values.get(param.name, _MISSING)
        if raw is _MISSING or raw.strip(ASCII_SPACE) == "":
            if param.required:
                raise ParamError(param.name, "required parameter is missing or empty")
            parsed[param.name] = param.default
            continue
        parsed[param.name] = param.parse(raw)
    return parsed


# ---------------------------------------------------------------------------------------
@dataclass
class Operation:
    """One documented GET endpoint."""
    path: str                       # OpenAPI form, e.g. /api/v1/spectra/{obsid}
    summary: str
    description: str
    params: Callable[[Any], Sequence[Param]]     # limits -> parameters
    responses: Mapping[str, dict]
    tags: Sequence[str] = ()
    operation_id: str = ""


OPERATIONS: list = []


def operation(**kwargs) -> Operation:
    """Declare a documented endpoint (called by the blueprint modules at import)."""
    op = Operation(**kwargs)
    OPERATIONS[:] = [o for o in OPERATIONS if o.path != op.path] + [op]
    return op


def content(*mime_types, schema=None) -> dict:
    return {m: {"schema": schema or ({"type": "object"} if m == "application/json"
                                     else {"type": "string"})} for m in mime_types}


ERROR_SCHEMA = {"type": "object", "properties": {
    "error": {"type": "string"}, "parameter": {"type": "string"},
    "status": {"type": "integer"}}}
JSON_ERROR = {"content": content("application/json", schema=ERROR_SCHEMA)}


def build_document(limits, server_url: str = "/", version: str = "0") -> dict:
    from service.state import LIMITS_DESCRIPTION

    paths = {}
    for op in OPERATIONS:
        paths[op.path] = {"get": {
            "operationId": op.operation_id or op.path.strip("/").replace("/", "_") or "root",
            "summary": op.summary,
            "description": op.description,
            "tags": list(op.tags),
            "parameters": [p.openapi() for p in op.params(limits)],
            "responses": dict(op.responses),
        }}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "LAMOST LRS value-added catalogue: Teff, log g, [Fe/H]",
            "version": version,
            "description": (
                "Read-only query service over the LAMOST low-resolution value-added "
                "catalogue (LASSO-MLPNet estimates). Positions are ICRS (J2000) decimal "
                "degrees. " + LIMITS_DESCRIPTION.format(**limits.as_dict())),
        },
        "servers": [{"url": server_url}],
        "paths": paths,
    }
