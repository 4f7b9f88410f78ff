"""JSON schemas for the structured-output tests. Every string, array and integer is
bounded and every object closed: the tiny test models pick tokens at random, so only the
constraint ends their output, and a bounded schema makes it end within a few dozen tokens."""

from __future__ import annotations

from typing import Any

INT = {"type": "integer", "minimum": 0, "maximum": 99}
ROLE = {"enum": ["admin", "dev"]}
PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
WORD = {"type": "string", "maxLength": 6}


def closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "person": closed({"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "flag": closed({"ok": {"type": "boolean"}}),
    "color": closed({"color": {"enum": ["red", "green", "blue"]}}),
    "digits": closed(
        {"digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}}
    ),
    "address": closed({"city": WORD, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "code": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    "const": closed({"version": {"const": 2}, "kind": {"const": "event"}}),
    "either": closed({"value": {"anyOf": [INT, {"type": "string", "maxLength": 4}]}}),
    "items": closed(
        {"items": {"type": "array", "items": closed({"id": INT, "ok": {"type": "boolean"}}), "maxItems": 2}}
    ),
    "optional": closed({"id": INT, "note": WORD, "tag": {"enum": ["a", "b"]}}, required=["id"]),
    "nothing": closed({"nothing": {"type": "null"}}),
    "level": closed({"level": {"enum": [1, 2, 3, 5, 8]}}),
    "shape": closed(
        {
            "shape": {
                "anyOf": [
                    closed({"circle": {"type": "integer", "minimum": 1, "maximum": 9}}),
                    closed({"square": {"type": "integer", "minimum": 1, "maximum": 9}}),
                ]
            }
        }
    ),
    "date": closed({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    "ref": {
        "$defs": {"point": closed({"x": INT, "y": INT})},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "tags": closed({"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 2}}),
    "nested": closed(
        {"user": closed({"name": WORD, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}})}
    ),
    "pair": {"type": "array", "prefixItems": [INT, {"type": "boolean"}], "items": False, "minItems": 2},
    "short": closed({"s": {"type": "string", "minLength": 2, "maxLength": 4}}),
    "range": closed({"n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}}),
    "bools": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    "answer": closed(
        {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}
    ),
}
