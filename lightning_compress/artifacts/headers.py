"""Reading the JSON headers of our artifacts as a parser of untrusted input: every malformed header, of any kind
and depth (not JSON, not UTF-8, nested beyond Python's recursion limit, numbers beyond ``int``'s digit limit,
wrong types, missing or extra fields), becomes an :class:`ArtifactError`, never a raw Python exception.

Messages describe values by their kind and a short prefix (:func:`describe`), never by ``repr`` of the whole
value, which can itself fail (a 5,000-digit integer) or be enormous.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

#: Largest JSON header we read, in bytes (ours are a few hundred).
MAX_HEADER_BYTES = 64 * 1024
#: Longest string field we accept (member names, input names, metadata values).
MAX_STRING = 1024


class ArtifactError(ValueError):
    """A file is not a valid lightning_compress artifact: wrong format or version, damaged, malformed, or larger
    than allowed. The message says what is wrong and what to do."""


def parse(raw: bytes, source: str) -> Any:
    """The JSON value in ``raw``, or an ArtifactError saying the header is damaged."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ArtifactError(
            f"{source} carries a lightning_compress header of {len(raw):,} bytes, more than ours ever "
            f"are ({MAX_HEADER_BYTES:,}): it is damaged or was not written by lightning_compress"
        )
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSON and UTF-8 errors, int digit limit, nesting
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ArtifactError(
            f"{source} carries a damaged lightning_compress header (not valid JSON: {reason})"
        ) from error


def describe(value: Any) -> str:
    """A short description of a JSON value for a message: its kind, and a prefix of a short string or number."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, int):
        return str(value) if abs(value) < 10**18 else f"an integer of about {int(math.log10(abs(value)))} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object with {len(value)} field(s)"
    return type(value).__name__


def is_count(value: Any) -> bool:
    """A whole number >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_name(value: Any) -> bool:
    """A non-empty string of at most ``MAX_STRING`` characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_STRING


def scalar_problem(mapping: Any, field: str) -> str | None:
    """Why ``mapping`` is not an object of string keys and scalar values (string, finite number, bool, null)."""
    if not isinstance(mapping, Mapping):
        return f"{field!r} must be an object, got {describe(mapping)}"
    if len(mapping) > 64:
        return f"{field!r} has {len(mapping)} fields, more than ours ever hold"
    for key, value in mapping.items():
        if not is_name(key):
            return f"{field!r} has the field name {describe(key)}"
        if isinstance(value, str) and len(value) <= MAX_STRING:
            continue
        if isinstance(value, float) and math.isfinite(value):
            continue
        if value is None or isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**63):
            continue
        return f"{field}[{describe(key)}] must be a string, number, true/false or null, got {describe(value)}"
    return None


def field_problem(header: dict[str, Any], fields: Mapping[str, Callable[[Any], bool]]) -> str | None:
    """Why ``header`` does not have exactly ``fields``, each passing its check (a predicate), or ``None``."""
    missing = [name for name in fields if name not in header]
    if missing:
        return f"its header lacks the field(s) {', '.join(map(repr, missing))}"
    extra = [name for name in header if name not in fields]
    if extra:
        return f"its header has unknown field(s) {', '.join(describe(n) for n in extra[:5])}"
    for name, check in fields.items():
        if not check(header[name]):
            return f"its field {name!r} is {describe(header[name])}"
    return None
