"""The Compute v1 discovery document as a validator for the local endpoint.

The document is the one google-api-python-client ships (in the demo's and the tests'
requirements), read as JSON: the client library itself is never imported. Every request body
the endpoint accepts and every response it writes is checked against the schema of its method:
unknown fields, types, enums, `$ref`s, patterns, and the proto3 JSON encoding (64-bit integers
travel as strings; a request may also send them as numbers, as the real API's JSON parser
accepts).

A request that does not fit is refused with the real API's wording ("Invalid JSON payload
received. Unknown name ...", reason `invalid`); a response that does not fit is a bug in the
endpoint and raises `ResponseInvalid`, so a test fails instead of a client seeing a shape that
Compute Engine never sends.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

_INT64 = re.compile(r"-?[0-9]+")
_UINT64 = re.compile(r"[0-9]+")
_RANGES = {"int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}


class RequestInvalid(ValueError):
    """A request the real API would refuse with 400 `invalid`."""


class ResponseInvalid(AssertionError):
    """A response that Compute Engine would never write: the endpoint has a bug."""


def document_path() -> Path:
    spec = importlib.util.find_spec("googleapiclient")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("google-api-python-client is not installed: the local Compute "
                           "endpoint validates against the compute v1 discovery document it "
                           "ships (pip install -r requirements-demo.txt)")
    return (Path(next(iter(spec.submodule_search_locations))) / "discovery_cache" / "documents"
            / "compute.v1.json")


class ComputeSchema:
    """The compute v1 schemas and methods, with a request and a response checker."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.revision: str = document["revision"]
        self.schemas: dict[str, Any] = document["schemas"]
        self.system_parameters = frozenset(document.get("parameters", {}))

    def method(self, resource: str, name: str) -> dict[str, Any]:
        method: dict[str, Any] = self.document["resources"][resource]["methods"][name]
        return method

    # ------------------------------------------------------------ parameters

    def check_parameters(self, resource: str, name: str, path: Mapping[str, str],
                         query: Mapping[str, list[str]]) -> None:
        """Path parameters match their patterns; query parameters are known and typed."""
        params = self.method(resource, name).get("parameters", {})
        for key, value in path.items():
            pattern = params[key].get("pattern")
            if pattern and not re.fullmatch(pattern, value):
                raise RequestInvalid(f"Invalid value for field '{key}': '{value}'. Must be a "
                                     f"match of regex '{pattern}'")
        for key, values in query.items():
            spec = params.get(key)
            if spec is None or spec.get("location") != "query":
                if key in self.system_parameters or key.startswith("$"):
                    continue
                raise RequestInvalid(f"Invalid JSON payload received. Unknown name \"{key}\": "
                                     f"Cannot bind query parameter. Field '{key}' could not "
                                     "be found in request message.")
            for value in values:
                if spec.get("type") == "boolean" and value not in ("true", "false"):
                    raise RequestInvalid(f"Invalid value for field '{key}': '{value}'. "
                                         "Expected a boolean.")
                if spec.get("type") == "integer" and not _INT64.fullmatch(value):
                    raise RequestInvalid(f"Invalid value for field '{key}': '{value}'. "
                                         "Expected an integer.")

    # ------------------------------------------------------------ bodies

    def check_request(self, ref: str, body: Any) -> Any:
        """The body in its canonical form (64-bit integers as strings), or RequestInvalid."""
        return self._check(body, {"$ref": ref}, "", request=True)

    def check_response(self, ref: str, body: Any) -> None:
        try:
            self._check(body, {"$ref": ref}, "", request=False)
        except RequestInvalid as e:
            raise ResponseInvalid(f"the local endpoint wrote a {ref} that compute v1 "
                                  f"(revision {self.revision}) does not allow: {e}") from None

    def _check(self, value: Any, schema: dict[str, Any], at: str, request: bool) -> Any:
        if "$ref" in schema:
            schema = self.schemas[schema["$ref"]]
        kind = schema.get("type")
        where = f" at '{at}'" if at else ""
        if kind == "object":
            if not isinstance(value, dict):
                raise RequestInvalid(f"Invalid JSON payload received. Expected an object"
                                     f"{where}, got {json.dumps(value)[:60]}.")
            props = schema.get("properties")
            extra = schema.get("additionalProperties")
            out: dict[str, Any] = {}
            for key, item in value.items():
                sub = f"{at}.{key}" if at else key
                if props is not None and key in props:
                    out[key] = self._check(item, props[key], sub, request)
                elif extra is not None:
                    out[key] = self._check(item, extra, f"{at}[{key!r}]" if at else key,
                                           request)
                else:
                    raise RequestInvalid(f"Invalid JSON payload received. Unknown name "
                                         f"\"{key}\"{where}: Cannot find field.")
            return out
        elif kind == "array":
            if not isinstance(value, list):
                raise RequestInvalid(f"Invalid JSON payload received. Expected a list{where}.")
            return [self._check(item, schema.get("items", {}), f"{at}[{i}]", request)
                    for i, item in enumerate(value)]
        if kind == "string":
            return self._string(value, schema, at, request)
        if kind == "integer":
            return self._integer(value, schema, at, request)
        if kind == "boolean":
            if not isinstance(value, bool):
                raise RequestInvalid(f"Invalid value{where} (TYPE_BOOL), {json.dumps(value)}")
        elif kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RequestInvalid(f"Invalid value{where} (TYPE_DOUBLE), "
                                     f"{json.dumps(value)}")
        elif kind not in (None, "any"):
            raise ResponseInvalid(f"schema type {kind!r}{where} is not understood")
        return value

    def _string(self, value: Any, schema: dict[str, Any], at: str, request: bool) -> Any:
        where = f" at '{at}'" if at else ""
        fmt = schema.get("format")
        if fmt in ("int64", "uint64"):
            # proto3 JSON: 64-bit integers are written as strings; a parser takes numbers too.
            if request and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not (_UINT64 if fmt == "uint64" else _INT64
                                                  ).fullmatch(value):
                raise RequestInvalid(f"Invalid value{where} (TYPE_{fmt.upper()}), "
                                     f"{json.dumps(value)}")
            return value
        if not isinstance(value, str):
            raise RequestInvalid(f"Invalid value{where} (TYPE_STRING), {json.dumps(value)}")
        if fmt == "byte":
            try:
                base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
            except (binascii.Error, ValueError):
                raise RequestInvalid(f"Invalid value{where} (TYPE_BYTES), "
                                     f"{json.dumps(value)}") from None
        enum = schema.get("enum")
        if enum is not None and value not in enum:
            raise RequestInvalid(f"Invalid value{where} (TYPE_ENUM), {json.dumps(value)}")
        pattern = schema.get("pattern")
        if pattern and request and not re.fullmatch(pattern, value):
            raise RequestInvalid(f"Invalid value for field '{at}': '{value[:80]}'. Must be a "
                                 f"match of regex '{pattern}'")
        return value

    def _integer(self, value: Any, schema: dict[str, Any], at: str, request: bool) -> int:
        where = f" at '{at}'" if at else ""
        fmt = schema.get("format", "int32")
        if request and isinstance(value, str) and _INT64.fullmatch(value):
            value = int(value)  # a parser takes a 32-bit integer in a string too
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestInvalid(f"Invalid value{where} (TYPE_{fmt.upper()}), "
                                 f"{json.dumps(value)}")
        low, high = _RANGES.get(fmt, (-(2**31), 2**31 - 1))
        if not low <= value <= high:
            raise RequestInvalid(f"Invalid value{where} (TYPE_{fmt.upper()}), {value}")
        return value


@cache
def compute_v1() -> ComputeSchema:
    """The schema, loaded once per process (the document is ~3 MB of JSON)."""
    return ComputeSchema(json.loads(document_path().read_text(encoding="utf-8")))

