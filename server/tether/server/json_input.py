"""JSON from clients, parsed strictly and within bounds: the HTTP auth API's bodies and ``/sync``
frames both go through :func:`parse_client_json`.

Python's ``json.loads`` accepts more than JSON and fails in ways a server must not pass on:

* ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON;
* a ``\\ud800`` escape yields a lone surrogate, which no UTF-8 encoder (Redis, a JWT library, a
  hash, the client's own frames) accepts later: the text is not Unicode;
* nesting is bounded only by the interpreter's recursion limit (``[`` × 5000 raises
  ``RecursionError``), and a document nested a little less deep still reaches code that recurses
  through it later (encoders, the store). Nesting is bounded by ``TETHER_MAX_JSON_DEPTH``;
* an integer of more than 4300 digits raises a ``ValueError`` of its own;
* bytes are decoded as UTF-8, UTF-16 or UTF-32, guessed; JSON on the wire is UTF-8 (RFC 8259 §8.1).

Each of these is a :class:`JSONInputError` whose message says what is wrong, for the caller to
answer with its own code (``invalid_request``, ``bad_message``).
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

__all__ = ["JSONInputError", "parse_client_json"]

#: The most the depth limit may be set to: parsing and encoding recurse once per level, and the
#: interpreter's limit (1000 frames) must keep room for the server's own call stack.
DEPTH_CEILING = 500


class JSONInputError(ValueError):
    """The client's text is not JSON this server accepts. The message is a predicate to put
    after the caller's own subject ("the body", "the frame"): ``is not JSON``, ``is nested
    deeper than 64 levels``; it never repeats the text."""


def _reject_constant(name: str) -> Any:
    raise JSONInputError(f"holds {name}, which is not JSON")


#: One decoder for every call: ``json.loads`` with ``parse_constant`` builds a new one each time,
#: which cost as much as parsing a small ``/sync`` frame.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


#: A JSON string (valid JSON: no raw quote inside, every backslash starts an escape).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
#: An escape that may encode half of a surrogate pair: the only way a lone surrogate reaches a
#: ``str`` parsed from valid UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
#: Per byte of bracket-only text: how it moves the nesting depth.
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def nesting_depth(text: str) -> int:
    """How deeply the valid JSON ``text`` nests arrays and objects (``1`` for ``{}``)."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text)).encode("ascii")
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def parse_client_json(data: str | bytes, *, max_depth: int) -> Any:
    """Parse ``data`` (bytes must be UTF-8) as strict JSON nested at most ``max_depth`` deep.

    Raises :class:`JSONInputError` (see the module docstring for what it refuses).
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JSONInputError("is not UTF-8") from None
    else:
        text = data
    try:
        doc = _DECODER.decode(text)
    except JSONInputError:
        raise
    except RecursionError:
        raise JSONInputError(f"is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError:
        raise JSONInputError("is not JSON") from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits (CVE-2020-10735).
        raise JSONInputError("holds a number with too many digits") from None
    # Cheap bounds first: with no more brackets than the limit, nothing can nest deeper.
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        raise JSONInputError(f"is nested deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(text) is not None:
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JSONInputError("holds a lone surrogate (\\ud800-\\udfff) in a string") from None
    return doc
