"""Inputs a hostile publisher could send, shaped like the real ones.

Three families, mixed by every target: raw bytes; JSON text built from hostile values (lone
surrogates, integers past Python's 4300-digit limit, nesting past the parser's depth, NUL,
wrong types); and valid messages with one field replaced by such a value, so the parsers'
checks deep inside a message are reached, not only the first one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import strategies as st

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
CHARS = st.characters() | SURROGATES | st.sampled_from("\x00\n\r'\"\\ $;`")
TEXT = st.text(CHARS, max_size=40)

#: Integers past sys.get_int_max_str_digits() (4300) and nesting past the JSON parser's
#: depth cannot be Python values (neither can be made or written), so they travel as
#: placeholders that `dumps` expands in the text.
RAW = "\x01{}{}\x01"
RAW_RE = re.compile(r'"\\u0001(HUGE|DEEP)(\d+)\\u0001"')
HUGE_INTS = st.integers(min_value=4301, max_value=6000).map(lambda n: RAW.format("HUGE", n))
DEEP = st.integers(min_value=1000, max_value=12000).map(lambda n: RAW.format("DEEP", n))
INTS = st.integers() | st.sampled_from([0, -1, 1, 1000, 1001, 65535, 65536, 2**63])
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
LEAVES = st.none() | st.booleans() | INTS | FLOATS | TEXT | HUGE_INTS | DEEP

JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def _expand(m: re.Match[str]) -> str:
    n = int(m.group(2))
    return "9" * n if m.group(1) == "HUGE" else "[" * n + "]" * n


def dumps(value: Any, ensure_ascii: bool = True) -> str:
    """JSON text for `value`, placeholders expanded (NaN and Infinity stay: json writes them)."""
    return RAW_RE.sub(_expand, json.dumps(value, allow_nan=True, ensure_ascii=ensure_ascii))


#: Nesting past the JSON parser's recursion limit, as a whole message.
DEEP_TEXT = DEEP.map(lambda raw: dumps(raw)) | st.integers(1000, 12000).map(
    lambda n: '{"a":' * n + "0" + "}" * n)


def with_field(base: dict[str, Any], fields: tuple[str, ...]) -> st.SearchStrategy[str]:
    """`base` as JSON with one field (known or not) set to a hostile value."""
    return st.builds(lambda k, v: dumps({**base, k: v}), st.sampled_from(fields) | TEXT,
                     JSON_VALUES)


def messages(base: dict[str, Any], fields: tuple[str, ...]
             ) -> st.SearchStrategy[bytes | str]:
    """Every family, as the bytes a Pub/Sub message or a stored object would carry (and as
    text, which may hold raw lone surrogates: the parsers take both)."""
    as_text = st.one_of(JSON_VALUES.map(dumps), DEEP_TEXT, with_field(base, fields),
                        st.just(dumps(base)),
                        JSON_VALUES.map(lambda v: dumps(v, ensure_ascii=False)))
    return st.one_of(st.binary(max_size=200),
                     as_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                     as_text)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = _set(doc[path[0]], path[1:], value)
    return copy


def mutated(doc: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """A stored document with one value anywhere in it replaced by a hostile one, as the
    bytes in the bucket."""
    return st.builds(lambda path, value: dumps(_set(doc, path, value)).encode(
        "utf-8", "surrogatepass"), st.sampled_from(_paths(doc)), JSON_VALUES)
