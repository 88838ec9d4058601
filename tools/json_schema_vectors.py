#!/usr/bin/env python3
"""Test vectors for src/text/json_schema.c from an independent validator (python3-jsonschema,
Draft 2020-12): schemas of the supported subset, documents made from valid examples by random
mutation, each labelled valid or not by jsonschema. Written to tests/data/json_schema/vectors.json.

Documents are written by json.dumps (compact or spaced, ensure_ascii=False): dsv3 matches keys and
enum values as JSON text, so a document must spell them as JSON's shortest form does (which these
do). Floats are never whole (jsonschema counts 3.0 as an integer; dsv3 wants an integer written
without a fraction), and no key repeats.

    python3 tools/json_schema_vectors.py [OUT]
"""
import copy
import importlib.metadata
import json
import random
import sys

import jsonschema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "email": {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}

TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"root": {"$ref": "#/$defs/node"}, "label": {"const": "tree"}},
    "required": ["root", "label"],
    "additionalProperties": False,
}

OPEN = {  # additional properties allowed (JSON Schema's default)
    "type": "object",
    "properties": {"id": {"type": "integer"}, "meta": {"type": "object"}},
    "required": ["id"],
}

EVENTS = {
    "title": "Events",
    "description": "a list of dated events",
    "type": "object",
    "properties": {
        "events": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "when": {"type": "string", "format": "date"},
                    "what": {"type": "string"},
                    "score": {"type": ["number", "null"]},
                    "level": {"enum": [1, 2, 3, None, "max", True]},
                },
                "required": ["when", "what", "score", "level"],
                "additionalProperties": False,
            },
        },
        "nested": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    },
    "required": ["events"],
    "additionalProperties": False,
}

RANGES = {  # integer bounds, inclusive and exclusive, whole and not
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 100},
        "offset": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 7.5},
        "year": {"type": ["integer", "null"], "minimum": 1900},
        "debt": {"type": "integer", "maximum": -1000},
        "digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 2.5},
        "temp": {"type": ["number", "null"], "minimum": -40.5, "exclusiveMaximum": 60},
    },
    "required": ["count"],
    "additionalProperties": False,
}

STRINGS = {  # string lengths (code points) and integer multiples
    "type": "object",
    "properties": {
        "code": {"type": "string", "minLength": 2, "maxLength": 4},
        "note": {"type": ["string", "null"], "maxLength": 1},
        "word": {"type": "string", "minLength": 3},
        "even": {"type": "integer", "multipleOf": 2},
        "step": {"type": "integer", "multipleOf": 5, "minimum": -12, "maximum": 40},
        "list": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 3},
    },
    "required": ["code"],
    "additionalProperties": False,
}

PATTERNS = {  # pattern: anchored, unanchored, non-ASCII, inside arrays (no \\w: Python's is Unicode's)
    "type": "object",
    "properties": {
        "zip": {"type": "string", "pattern": "^\\d{5}(-\\d{4})?$"},
        "id": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,7}$"},
        "tag": {"type": "string", "pattern": "x"},
        "date": {"type": ["string", "null"], "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "emoji": {"type": "string", "pattern": "^(é|✓|😀)+$"},
        "list": {"type": "array", "items": {"type": "string", "pattern": "^(ab|cd)*$"}, "maxItems": 3},
    },
    "required": ["id"],
    "additionalProperties": False,
}

CASES = [
    (PERSON, [{"name": "Ada", "age": 36, "role": "admin"},
              {"name": "Bob \"B\" \\ é ✓", "age": -3, "height": 1.5, "email": None, "tags": ["a", "b"], "role": "guest",
               "active": True},
              {"role": "user", "email": "x@y.z", "age": 0, "name": ""}]),
    (TREE, [{"root": {"value": 1}, "label": "tree"},
            {"label": "tree", "root": {"value": 2, "children": [{"value": 3}, {"value": 4, "children": []}]}}]),
    (OPEN, [{"id": 7}, {"id": 8, "meta": {"a": [1, {"b": None}], "c": "d"}, "extra": [True, 2.5]}]),
    (EVENTS, [{"events": [{"when": "2024-01-02", "what": "x", "score": 0.25, "level": "max"}]},
              {"events": [{"when": "d", "what": "", "score": None, "level": None},
                          {"when": "e", "what": "y", "score": -12, "level": True}],
               "nested": [[1, 2], [], [3]]}]),
    (RANGES, [{"count": 1}, {"count": 100, "offset": 7, "year": None, "debt": -1000, "digits": [0, 9], "ratio": 2.5},
              {"count": 42, "offset": -4, "year": 2024, "digits": [], "ratio": 0.001, "temp": -40.5},
              {"count": 3, "temp": 59.75, "ratio": 1}]),
    (STRINGS, [{"code": "ab"},
               {"code": "é✓😀x", "note": "😀", "word": "abc", "even": -4, "step": 35, "list": ["", "ab"]},
               {"code": "x\"\\", "note": None, "step": -10, "even": 0, "list": []}]),
    (PATTERNS, [{"id": "a"},
                {"id": "abc_12", "zip": "12345-6789", "tag": "axb", "date": "2024-01-02", "emoji": "é😀✓", "list": ["", "abcd"]},
                {"id": "z", "zip": "00000", "date": None, "list": ["cdab"], "tag": "x"}]),
]

SCALARS = ["", "x", "admin", "tree", 0, 1, 3, -7, 2.5, -0.125, True, False, None,
           100, 101, -4, -5, 7, 8, 1899, 1900, -999, -1000, 10, -1001,
           "ab", "abcde", "😀", "é✓", "\n\t", 35, 40, 45, -10, -15, 6, 15,
           "12345", "1234", "12345-678", "2024-13-99", "axb", "abcd", "cd", "é😀", "a_1", "A1", "abcdefghi",
           2.49, 2.51, -40.5, -40.55, 59.99, 0.001, -0.001, 60]


def random_value(rng, depth=0):
    r = rng.random()
    if depth < 2 and r < 0.15:
        return {rng.choice(["a", "name", "value", "id"]): random_value(rng, depth + 1)}
    if depth < 2 and r < 0.3:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(SCALARS)


def mutate(rng, v):
    """One random change somewhere in v (a copy)."""
    v = copy.deepcopy(v)
    paths = []

    def walk(x, path):
        paths.append(path)
        if isinstance(x, dict):
            for k in x:
                walk(x[k], path + [k])
        elif isinstance(x, list):
            for i, e in enumerate(x):
                walk(e, path + [i])

    walk(v, [])
    path = rng.choice(paths)
    parent = None
    x = v
    for p in path:
        parent, x = x, x[p]
    op = rng.randrange(5)
    if op == 0 and path:  # replace the value
        parent[path[-1]] = random_value(rng)
    elif op == 1 and isinstance(x, dict) and x:  # drop a key
        del x[rng.choice(list(x))]
    elif op == 2 and isinstance(x, dict):  # add a key
        x[rng.choice(["extra", "name", "age", "value", "zz"])] = random_value(rng)
    elif op == 3 and isinstance(x, list):  # add or drop an element
        if x and rng.random() < 0.5:
            x.pop(rng.randrange(len(x)))
        else:
            x.insert(rng.randint(0, len(x)), copy.deepcopy(x[0]) if x and rng.random() < 0.6 else random_value(rng))
    elif op == 4 and isinstance(x, dict) and len(x) > 1:  # reorder the keys
        items = list(x.items())
        rng.shuffle(items)
        x.clear()
        x.update(items)
    return v


def whole_floats(x):
    if isinstance(x, float):
        return x == int(x)
    if isinstance(x, dict):
        return any(whole_floats(e) for e in x.values())
    if isinstance(x, list):
        return any(whole_floats(e) for e in x)
    return False


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/json_schema/vectors.json"
    rng = random.Random(20261129)
    cases = []
    for schema, examples in CASES:
        validator = jsonschema.Draft202012Validator(schema)
        seen, docs = set(), []
        pool = [copy.deepcopy(e) for e in examples]
        for _ in range(400):
            base = rng.choice(pool)
            v = mutate(rng, base) if rng.random() < 0.85 else base
            for _ in range(rng.randrange(3)):
                v = mutate(rng, v)
            if not isinstance(v, dict) or whole_floats(v):
                continue
            text = json.dumps(v, ensure_ascii=False, separators=(",", ":") if rng.random() < 0.5 else None)
            if text in seen:
                continue
            seen.add(text)
            valid = validator.is_valid(v)
            docs.append({"text": text, "valid": valid})
            if valid and len(pool) < 40:
                pool.append(v)
        cases.append({"schema": schema, "docs": docs})
    with open(out, "w") as f:
        json.dump({"generator": "tools/json_schema_vectors.py (python3-jsonschema %s, Draft 2020-12)" % importlib.metadata.version("jsonschema"),
                   "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for c in cases:
        n = len(c["docs"])
        print("%d documents, %d valid" % (n, sum(d["valid"] for d in c["docs"])))


if __name__ == "__main__":
    main()
