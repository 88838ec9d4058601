// Whether bytes are the beginning of a JSON object that a JSON Schema accepts, fed a few at a time:
// structured outputs (`response_format: {"type": "json_schema"}`) and a forced tool call's
// arguments, masked token by token as JSON mode is (text/json_prefix.h, whose grammar and limits
// this extends). The schema is compiled once (JsonSchema, immutable, shared); the state is a value
// to copy (json_schema_prefix_copy copies only its open containers) and feed.
//
// The schema language is the subset OpenAI's structured outputs define, which a prefix can be
// held to byte by byte:
//   type (a name or a list), properties, required, additionalProperties (true or false; absent:
//   true, as JSON Schema says), items, minItems, maxItems, enum and const (of strings, numbers,
//   booleans and null, matched as their JSON text), anyOf / oneOf whose branches begin with
//   different bytes (object, array, string, number or integer, boolean, null: the common
//   `anyOf: [{...}, {"type": "null"}]` of an optional field), minimum, maximum, exclusiveMinimum,
//   exclusiveMaximum and multipleOf on integers (a digit is refused as soon as no integer it
//   begins can end in range as a multiple; not beside enum), the four bounds on any number too
//   (compared as the double it parses to; such a number is written without an exponent, and a byte
//   is refused once no completion lies in bounds; multipleOf there is refused), minLength and
//   maxLength on strings (characters = code points, a surrogate pair one; not beside enum),
//   pattern (text/pattern.h: ECMA-262's syntax but backreferences, lookaround and \b; matched
//   anywhere unless anchored; a character is refused at its first byte once no completion can
//   match; not beside minLength / maxLength or enum), $ref
//   to "#", "#/$defs/NAME" or "#/definitions/NAME" (recursion included), nullable (OpenAPI's),
//   and the annotations title, description, default, examples, format (an annotation in JSON
//   Schema's default vocabulary), $schema, $id, $comment, deprecated, readOnly, writeOnly, strict.
// Any other keyword (allOf, minProperties, ...) is refused at compile time with its path, rather
// than approximated. The root must accept an object. Members may come in any order,
// each at most once; a key is matched as the JSON text of a property's name (escapes written
// otherwise than JSON's shortest form do not match); an additional property (allowed) takes any
// value. Limits: JSON_SCHEMA_MAX_PROPS properties per object, JSON_SCHEMA_MAX_ENUM values per
// enum, JSON_SCHEMA_MAX_NODES schemas in all.
#ifndef DSV3_TEXT_JSON_SCHEMA_H
#define DSV3_TEXT_JSON_SCHEMA_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "text/json_prefix.h"
#include "text/pattern.h"

#define JSON_SCHEMA_MAX_PROPS 64
#define JSON_SCHEMA_MAX_ENUM 64
#define JSON_SCHEMA_MAX_NODES 4096
#define JSON_SCHEMA_MAX_LENGTH 1000000  // minLength / maxLength at most
// The node of an unconstrained value (true, {}, an additional property's value).
#define JSON_SCHEMA_ANY 0

typedef struct JsonSchema JsonSchema;

// Compiles schema (a JSON Schema object, or true). 0 and *out, or -1 with why (n bytes) naming
// the keyword's path, e.g. "schema.properties.age: 'minimum' is not supported".
int json_schema_compile(JsonSchema **out, const json_t *schema, char *why, size_t n);
void json_schema_free(JsonSchema *s);

// One open container of the document.
typedef struct JsonSchemaFrame {
    uint64_t seen;       // object: the properties present so far (bit i: property i)
    uint64_t live;       // object, in a key: the properties whose key text still matches
    uint32_t count;      // array: elements so far
    uint16_t node;       // its schema (JSON_SCHEMA_ANY: unconstrained)
    uint16_t value;      // object: the schema of the value after the current key
    uint16_t key_len;    // object, in a key: its bytes so far (the opening quote included)
    uint8_t object;      // '{' (1) or '[' (0)
    uint8_t in_key;
} JsonSchemaFrame;

typedef struct JsonSchemaPrefix {
    JsonPrefix lex;            // the grammar
    const JsonSchema *schema;  // NULL: any object (JSON mode)
    uint64_t val_live;         // a scalar value being read: the enum values it still matches
    uint16_t val_node;         // its schema
    uint16_t val_len;          // its bytes so far
    int64_t num_mag;           // an integer with a range: the magnitude of its digits so far
    uint8_t num_digits, num_neg, num_zero;  // and their count, its sign, a first digit 0
    uint8_t num_dot, num_fdigits, num_len;  // a number with bounds: a point read, fraction digits,
    char num_text[40];                      //   and its text so far (the first 39 bytes)
    uint32_t str_chars;        // a string value: its characters so far
    PatternState pattern;        // and where they stand against its pattern
    uint8_t in_value;          // a scalar value is being read
    uint8_t val_kind;          // its kind (json_schema.c: string, number, integer, boolean, null)
    uint8_t depth;             // open containers (frames in use)
    uint8_t bad;               // something fed did not fit: nothing will
    JsonSchemaFrame frames[JSON_PREFIX_MAX_DEPTH];
} JsonSchemaPrefix;

// schema NULL: any object.
void json_schema_prefix_init(JsonSchemaPrefix *p, const JsonSchema *schema);
// dst = src, copying only the frames in use (the mask's copy per token id).
void json_schema_prefix_copy(JsonSchemaPrefix *dst, const JsonSchemaPrefix *src);
// Feeds n bytes; 0 while everything fed is the beginning of an object the schema accepts, -1
// when not (p is then of no further use: feed a copy to try bytes).
int json_schema_prefix_feed(JsonSchemaPrefix *p, const char *bytes, size_t n);
// 1 when what was fed is one complete object the schema accepts.
int json_schema_prefix_complete(const JsonSchemaPrefix *p);
// 1 when any run of plain string text (whole UTF-8 characters, no '"', '\\' or control
// characters) would be accepted next: inside a string that neither an enum nor a closed list of
// property names constrains. The mask's shortcut: most of an answer is such text.
int json_schema_prefix_at_free_text(const JsonSchemaPrefix *p);

#endif
