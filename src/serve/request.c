#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/request.h"

const char *api_error_type(int status) {
    switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: return "overloaded_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

int api_error(ApiError *e, int status, const char *param, const char *code, const char *fmt, ...) {
    e->status = status;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

// The field key of o, NULL when absent or null.
static json_t *field(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return v && !json_is_null(v) ? v : NULL;
}

static int get_number(json_t *o, const char *key, double lo, double hi, float *out, ApiError *e) {
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_number(v)) return api_error(e, 400, key, "invalid_type", "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) return api_error(e, 400, key, "invalid_value", "'%s' is %g; it must be in [%g, %g]", key, x, lo, hi);
    *out = (float)x;
    return 0;
}

static int get_int(json_t *o, const char *key, long long lo, long long hi, int *out, ApiError *e) {
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_integer(v)) return api_error(e, 400, key, "invalid_type", "'%s' must be an integer", key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi) return api_error(e, 400, key, "invalid_value", "'%s' is %lld; it must be in [%lld, %lld]", key, (long long)x, lo, hi);
    *out = (int)x;
    return 0;
}

static int get_bool(json_t *o, const char *key, int *out, ApiError *e) {
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_boolean(v)) return api_error(e, 400, key, "invalid_type", "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

static char *dup_str(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

// A JSON string's bytes (it may hold NULs: its length, not strlen).
static char *dup_json_string(json_t *v) { return dup_str(json_string_value(v), json_string_length(v)); }

#define OOM(e) api_error(e, 500, NULL, NULL, "out of memory")

// A message's content: a string, or an array of text parts joined by newlines (as vLLM joins them).
static int message_content(json_t *c, int i, char **out, ApiError *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].content", i);
    if (!c) {
        *out = dup_str("", 0);
        return *out ? 0 : OOM(e);
    }
    if (json_is_string(c)) {
        *out = dup_json_string(c);
        return *out ? 0 : OOM(e);
    }
    if (!json_is_array(c)) return api_error(e, 400, param, "invalid_type", "'%s' must be a string or an array of text parts", param);
    ByteBuf b = {0};
    size_t k;
    json_t *part;
    json_array_foreach(c, k, part) {
        json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type) || strcmp(json_string_value(type), "text") || !json_is_string(text)) {
            bb_free(&b);
            return api_error(e, 400, param, "invalid_value", "'%s[%zu]' must be {\"type\": \"text\", \"text\": STRING} (only text parts are supported)", param, k);
        }
        if ((k > 0 && bb_append(&b, "\n", 1)) || bb_append(&b, json_string_value(text), json_string_length(text))) {
            bb_free(&b);
            return OOM(e);
        }
    }
    *out = b.p ? b.p : dup_str("", 0);
    return *out ? 0 : OOM(e);
}

// A function name as the API allows it: 1 to 64 of a-z, A-Z, 0-9, '_' and '-'.
static int valid_name(json_t *v) {
    size_t n = json_is_string(v) ? json_string_length(v) : 0;
    const char *s = json_string_value(v);
    if (n < 1 || n > 64) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_' ||
              s[i] == '-'))
            return 0;
    return 1;
}

// An assistant message's tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}].
static int message_tool_calls(json_t *calls, int i, ChatMessage *m, ApiError *e) {
    char param[80];
    snprintf(param, sizeof param, "messages[%d].tool_calls", i);
    if (!json_is_array(calls)) return api_error(e, 400, param, "invalid_type", "'%s' must be an array", param);
    size_t n = json_array_size(calls), k;
    if (n == 0) return 0;
    ChatToolCall *tc = calloc(n, sizeof *tc);
    if (!tc) return OOM(e);
    m->tool_calls = tc;
    json_t *c;
    json_array_foreach(calls, k, c) {
        snprintf(param, sizeof param, "messages[%d].tool_calls[%zu]", i, k);
        json_t *f = json_object_get(c, "function"), *type = json_object_get(c, "type"), *id = json_object_get(c, "id");
        json_t *name = json_object_get(f, "name"), *args = json_object_get(f, "arguments");
        if (!json_is_object(c) || !json_is_object(f))
            return api_error(e, 400, param, "invalid_type", "'%s' must be {\"type\": \"function\", \"function\": {...}}", param);
        if (type && !(json_is_string(type) && !strcmp(json_string_value(type), "function")))
            return api_error(e, 400, param, "invalid_value", "'%s.type' must be \"function\"", param);
        if (!valid_name(name))
            return api_error(e, 400, param, "invalid_value", "'%s.function.name' must be 1 to 64 letters, digits, '_' or '-'", param);
        if (!json_is_string(args))
            return api_error(e, 400, param, "invalid_type", "'%s.function.arguments' must be a string (JSON text)", param);
        if (id && !json_is_string(id)) return api_error(e, 400, param, "invalid_type", "'%s.id' must be a string", param);
        m->n_tool_calls = (int)k + 1;
        if (!(tc[k].name = dup_json_string(name)) || !(tc[k].arguments = dup_json_string(args)) ||
            (id && !(tc[k].id = dup_json_string(id))))
            return OOM(e);
    }
    return 0;
}

static int parse_messages(ServeRequest *r, json_t *body, ApiError *e) {
    json_t *m = field(body, "messages");
    if (!m) return api_error(e, 400, "messages", "missing_required_parameter", "'messages' is required");
    if (!json_is_array(m)) return api_error(e, 400, "messages", "invalid_type", "'messages' must be an array");
    if (json_array_size(m) == 0) return api_error(e, 400, "messages", "invalid_value", "'messages' must not be empty");
    r->msgs = calloc(json_array_size(m), sizeof *r->msgs);
    if (!r->msgs) return OOM(e);
    size_t i;
    json_t *msg;
    json_array_foreach(m, i, msg) {
        char param[64];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(msg)) return api_error(e, 400, param, "invalid_type", "'%s' must be an object", param);
        json_t *role = json_object_get(msg, "role");
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!json_is_string(role)) return api_error(e, 400, param, "invalid_type", "'%s' must be a string", param);
        const char *rs = json_string_value(role);
        if (!strcmp(rs, "developer")) rs = "system";  // OpenAI's newer name for the system prompt
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") && strcmp(rs, "tool"))
            return api_error(e, 400, param, "invalid_value", "'%s' is '%.40s'; it must be system, user, assistant or tool",
                             param, rs);
        r->msgs[i].role = rs[0] == 's' ? "system" : rs[0] == 'u' ? "user" : rs[0] == 't' ? "tool" : "assistant";
        r->n_msgs = (int)i + 1;
        json_t *calls = rs[0] == 'a' ? field(msg, "tool_calls") : NULL;
        if (calls && message_tool_calls(calls, (int)i, &r->msgs[i], e)) return -1;
        char *content = NULL;
        snprintf(param, sizeof param, "messages[%zu].content", i);
        if (rs[0] == 't' && !field(msg, "content"))
            return api_error(e, 400, param, "missing_required_parameter", "'%s' is required for a tool message", param);
        // Content may be absent beside calls; an empty tool_calls array is no calls (as vLLM reads it).
        if (!(r->msgs[i].n_tool_calls > 0 && !field(msg, "content")) &&
            message_content(field(msg, "content"), (int)i, &content, e))
            return -1;
        r->msgs[i].content = content;
    }
    return 0;
}

// One prompt as ids: a non-empty array of token ids (param names it in errors).
static int prompt_ids(json_t *p, const char *param, ServePrompt *out, ApiError *e) {
    size_t n = json_array_size(p), i;
    if (n == 0) return api_error(e, 400, "prompt", "invalid_value", "'%s' must not be empty", param);
    out->ids = malloc(sizeof(int) * n);
    if (!out->ids) return OOM(e);
    json_t *v;
    json_array_foreach(p, i, v) {
        if (!json_is_integer(v)) return api_error(e, 400, "prompt", "invalid_type", "'%s[%zu]' must be a token id", param, i);
        json_int_t id = json_integer_value(v);
        if (id < 0 || id > 0x7fffffff)
            return api_error(e, 400, "prompt", "invalid_value", "'%s[%zu]' = %lld is not a token id", param, i, (long long)id);
        out->ids[i] = (int)id;
    }
    out->n_ids = (int)n;
    return 0;
}

// prompt: a string, an array of token ids, or an array of strings or of arrays of ids (one
// prompt each).
static int parse_prompt(ServeRequest *r, json_t *body, ApiError *e) {
    json_t *p = field(body, "prompt");
    if (!p) return api_error(e, 400, "prompt", "missing_required_parameter", "'prompt' is required");
    if (!json_is_string(p) && !json_is_array(p))
        return api_error(e, 400, "prompt", "invalid_type", "'prompt' must be a string, an array of token ids, or an array of either");
    if (json_is_array(p) && json_array_size(p) == 0) return api_error(e, 400, "prompt", "invalid_value", "'prompt' must not be empty");
    // one prompt (a string, or ids), or a list of them
    int many = json_is_array(p) && !json_is_integer(json_array_get(p, 0));
    size_t n = many ? json_array_size(p) : 1;
    if (n > SERVE_MAX_PROMPTS)
        return api_error(e, 400, "prompt", "invalid_value", "'prompt' has %zu prompts; at most %d", n, SERVE_MAX_PROMPTS);
    r->prompts = calloc(n, sizeof *r->prompts);
    if (!r->prompts) return OOM(e);
    for (size_t i = 0; i < n; i++) {
        json_t *q = many ? json_array_get(p, i) : p;
        char param[32];
        if (many) snprintf(param, sizeof param, "prompt[%zu]", i);
        else snprintf(param, sizeof param, "prompt");
        r->n_prompts = (int)i + 1;
        if (json_is_string(q)) {
            if (!(r->prompts[i].text = dup_json_string(q))) return OOM(e);
        } else if (!json_is_array(q) || (many && json_array_size(q) > 0 && !json_is_integer(json_array_get(q, 0)))) {
            return api_error(e, 400, "prompt", "invalid_type", "'%s' must be a string or an array of token ids", param);
        } else if (prompt_ids(q, param, &r->prompts[i], e)) {
            return -1;
        }
    }
    return 0;
}

// logit_bias: {"ID": BIAS, ...}, ids as decimal strings, biases in [-100, 100].
static int parse_logit_bias(ServeRequest *r, json_t *body, ApiError *e) {
    json_t *b = field(body, "logit_bias");
    if (!b) return 0;
    if (!json_is_object(b)) return api_error(e, 400, "logit_bias", "invalid_type", "'logit_bias' must be an object of token ids to biases");
    size_t n = json_object_size(b);
    if (n == 0) return 0;
    r->bias_ids = malloc(sizeof(int) * n);
    r->bias_values = malloc(sizeof(float) * n);
    if (!r->bias_ids || !r->bias_values) return OOM(e);
    const char *key;
    json_t *v;
    json_object_foreach(b, key, v) {
        char *end;
        long long id = strtoll(key, &end, 10);
        if (!key[0] || *end || key[0] == '-' || key[0] == '+' || key[0] == ' ' || id > 0x7fffffff)
            return api_error(e, 400, "logit_bias", "invalid_value", "'logit_bias' key '%.40s' is not a token id", key);
        if (!json_is_number(v))
            return api_error(e, 400, "logit_bias", "invalid_type", "'logit_bias[\"%lld\"]' must be a number", id);
        double x = json_number_value(v);
        if (!(x >= -100 && x <= 100))
            return api_error(e, 400, "logit_bias", "invalid_value", "'logit_bias[\"%lld\"]' is %g; it must be in [-100, 100]", id, x);
        r->bias_ids[r->n_bias] = (int)id;
        r->bias_values[r->n_bias++] = (float)x;
    }
    return 0;
}

static int parse_stop(ServeRequest *r, json_t *body, ApiError *e) {
    json_t *s = field(body, "stop");
    if (!s) return 0;
    if (json_is_string(s)) {
        r->stop[0] = dup_json_string(s);
        r->n_stop = 1;
        return r->stop[0] ? 0 : OOM(e);
    }
    if (!json_is_array(s)) return api_error(e, 400, "stop", "invalid_type", "'stop' must be a string or an array of strings");
    if (json_array_size(s) > STOP_TEXT_MAX)
        return api_error(e, 400, "stop", "invalid_value", "'stop' has %zu strings; at most %d", json_array_size(s), STOP_TEXT_MAX);
    size_t i;
    json_t *v;
    json_array_foreach(s, i, v) {
        if (!json_is_string(v)) return api_error(e, 400, "stop", "invalid_type", "'stop[%zu]' must be a string", i);
        r->stop[i] = dup_json_string(v);
        if (!r->stop[i]) return OOM(e);
        r->n_stop = (int)i + 1;
    }
    return 0;
}

// tools: [{"type": "function", "function": {"name", "description"?, "parameters"?}}] and
// tool_choice. The description the model reads is written here: the functions, their
// parameters' JSON Schema as given, and the format of a call in the chat format.
static int parse_tools(ServeRequest *r, json_t *body, ApiError *e) {
    json_t *tools = field(body, "tools"), *choice = field(body, "tool_choice");
    if (tools && !json_is_array(tools)) return api_error(e, 400, "tools", "invalid_type", "'tools' must be an array");
    size_t n = tools ? json_array_size(tools) : 0, k;
    if (n > SERVE_MAX_TOOLS) return api_error(e, 400, "tools", "invalid_value", "'tools' has %zu functions; at most %d", n, SERVE_MAX_TOOLS);
    r->tool_choice = n ? TOOL_AUTO : TOOL_NONE;
    r->parallel_tool_calls = 1;
    TRY(get_bool(body, "parallel_tool_calls", &r->parallel_tool_calls, e));
    if (choice) {
        const char *cs = json_string_value(choice);
        json_t *f = json_object_get(choice, "function");
        if (cs && !strcmp(cs, "none")) r->tool_choice = TOOL_NONE;
        else if (cs && (!strcmp(cs, "auto") || !strcmp(cs, "required")))
            r->tool_choice = cs[0] == 'a' ? TOOL_AUTO : TOOL_REQUIRED;
        else if (json_is_object(choice) && json_is_object(f) && json_is_string(json_object_get(f, "name")))
            r->tool_choice = TOOL_NAMED;
        else
            return api_error(e, 400, "tool_choice", "invalid_value",
                             "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}");
        if (r->tool_choice != TOOL_NONE && n == 0)
            return api_error(e, 400, "tool_choice", "invalid_value", "'tool_choice' needs 'tools'");
    }
    if (n == 0) return 0;
    if (!(r->tool_names = calloc(n, sizeof *r->tool_names)) || !(r->tool_schemas = calloc(n, sizeof *r->tool_schemas)))
        return OOM(e);
    ByteBuf b = {0};
    int fail = bb_puts(&b, "## Tools\n\nYou can call the functions below. To call one, answer with\n"
                       CHAT_TOOL_CALLS_BEGIN CHAT_TOOL_CALL_BEGIN "function" CHAT_TOOL_SEP "NAME\n```json\nARGUMENTS\n```"
                       CHAT_TOOL_CALL_END CHAT_TOOL_CALLS_END "\nwhere ARGUMENTS is a JSON object that fits the "
                       "function's parameters; ");
    fail |= bb_puts(&b, r->parallel_tool_calls ? "for several calls, put them one after another, separated by a newline, "
                                                 "before " CHAT_TOOL_CALLS_END ".\n"
                                               : "make at most one call.\n");
    json_t *t;
    json_array_foreach(tools, k, t) {
        char param[40];
        snprintf(param, sizeof param, "tools[%zu]", k);
        json_t *type = json_object_get(t, "type"), *f = json_object_get(t, "function");
        json_t *name = json_object_get(f, "name"), *desc = field(f, "description"), *params = field(f, "parameters");
        json_t *strict = field(f, "strict");
        const char *why = !json_is_object(t) || !json_is_object(f) ? "must be {\"type\": \"function\", \"function\": {...}}"
                          : type && !(json_is_string(type) && !strcmp(json_string_value(type), "function"))
                              ? "has a type other than \"function\""
                          : !valid_name(name) ? "needs a function name of 1 to 64 letters, digits, '_' or '-'"
                          : desc && !json_is_string(desc) ? "has a description that is not a string"
                          : params && !json_is_object(params) ? "has parameters that are not a JSON Schema object"
                          : strict && !json_is_boolean(strict) ? "has a 'strict' that is not a boolean"
                                                               : NULL;
        if (why) {
            bb_free(&b);
            return api_error(e, 400, param, "invalid_value", "'%s' %s", param, why);
        }
        r->n_tools = (int)k + 1;
        // the arguments of a forced call are held to the parameters where json_schema.h can; a
        // strict function's parameters must be within its subset, as OpenAI's strict mode requires
        char schema_why[256];
        if (params && json_schema_compile(&r->tool_schemas[k], params, schema_why, sizeof schema_why) &&
            json_is_true(strict)) {
            bb_free(&b);
            return api_error(e, 400, param, "invalid_value", "'%s.function.parameters' (strict): %s", param, schema_why);
        }
        if (!(r->tool_names[k] = dup_json_string(name))) fail = 1;
        char *schema = params ? json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
        fail = fail || bb_puts(&b, "\n### ") || bb_puts(&b, r->tool_names[k]) || bb_puts(&b, "\n") ||
               (desc && (bb_puts(&b, json_string_value(desc)) || bb_puts(&b, "\n"))) ||
               bb_puts(&b, "Parameters: ") || bb_puts(&b, schema ? schema : "{}") || bb_puts(&b, "\n");
        free(schema);
    }
    if (r->tool_choice == TOOL_NAMED) {
        const char *want = json_string_value(json_object_get(json_object_get(choice, "function"), "name"));
        for (r->tool_named = 0; r->tool_named < r->n_tools && strcmp(r->tool_names[r->tool_named], want); r->tool_named++) {}
        if (r->tool_named == r->n_tools) {
            bb_free(&b);
            return api_error(e, 400, "tool_choice", "invalid_value", "'tool_choice' names '%.64s', which is not in 'tools'", want);
        }
    }
    if (fail || !b.p) {
        bb_free(&b);
        return OOM(e);
    }
    if (r->tool_choice != TOOL_NONE) r->tools_prompt = b.p;
    else bb_free(&b);
    return 0;
}

// response_format {"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}:
// the schema compiled (absent: any object). dsv3 holds every answer to it, strict or not.
static int parse_json_schema(ServeRequest *r, json_t *js, ApiError *e) {
    const char *param = "response_format.json_schema";
    if (!json_is_object(js)) return api_error(e, 400, param, "invalid_type", "'%s' must be an object", param);
    json_t *name = json_object_get(js, "name"), *desc = field(js, "description"), *schema = field(js, "schema");
    json_t *strict = field(js, "strict");
    if (!valid_name(name))
        return api_error(e, 400, "response_format.json_schema.name", "invalid_value",
                         "'%s.name' must be 1 to 64 letters, digits, '_' or '-'", param);
    if ((desc && !json_is_string(desc)) || (strict && !json_is_boolean(strict)))
        return api_error(e, 400, param, "invalid_type", "'%s': 'description' must be a string, 'strict' a boolean", param);
    r->json_mode = 1;
    char why[256];
    if (schema && json_schema_compile(&r->json_schema, schema, why, sizeof why))
        return api_error(e, 400, "response_format.json_schema.schema", "invalid_value", "'%s.schema': %s", param, why);
    return 0;
}

static int parse_fields(ServeRequest *r, json_t *body, ApiError *e) {
    json_t *model = field(body, "model");
    if (model && !json_is_string(model)) return api_error(e, 400, "model", "invalid_type", "'model' must be a string");
    if (model && !(r->model = dup_json_string(model))) return OOM(e);
    if (r->kind == API_CHAT ? parse_messages(r, body, e) : parse_prompt(r, body, e)) return -1;
    TRY(get_int(body, "max_tokens", r->kind == API_CHAT ? 1 : 0, SERVE_MAX_TOKENS, &r->max_tokens, e));
    if (r->kind == API_CHAT) TRY(get_int(body, "max_completion_tokens", 1, SERVE_MAX_TOKENS, &r->max_tokens, e));
    TRY(get_number(body, "temperature", 0, 2, &r->temperature, e));
    TRY(get_number(body, "top_p", 0, 1, &r->top_p, e));
    TRY(get_number(body, "min_p", 0, 1, &r->min_p, e));
    TRY(get_number(body, "presence_penalty", -2, 2, &r->presence_penalty, e));
    TRY(get_number(body, "frequency_penalty", -2, 2, &r->frequency_penalty, e));
    TRY(get_int(body, "top_k", -1, 1 << 30, &r->top_k, e));
    if (r->top_k < 0) r->top_k = 0;
    json_t *seed = field(body, "seed");
    if (seed && !json_is_integer(seed)) return api_error(e, 400, "seed", "invalid_type", "'seed' must be an integer");
    if (seed) {
        r->has_seed = 1;
        r->seed = (unsigned long long)json_integer_value(seed);
    }
    TRY(parse_stop(r, body, e));
    TRY(get_int(body, "n", 1, SERVE_MAX_N, &r->n, e));
    r->best_of = r->n;
    TRY(get_bool(body, "stream", &r->stream, e));
    json_t *so = field(body, "stream_options");
    if (so && !json_is_object(so)) return api_error(e, 400, "stream_options", "invalid_type", "'stream_options' must be an object");
    if (so) {
        int usage = 0;
        if (get_bool(so, "include_usage", &usage, e)) return api_error(e, 400, "stream_options.include_usage", "invalid_type", "'stream_options.include_usage' must be true or false");
        r->include_usage = usage;
    }
    if (r->kind == API_CHAT) {
        // logprobs: a boolean; top_logprobs: alternatives per token (needs logprobs)
        TRY(get_bool(body, "logprobs", &r->logprobs, e));
        TRY(get_int(body, "top_logprobs", 0, 20, &r->top_logprobs, e));
        if (r->top_logprobs > 0 && !r->logprobs)
            return api_error(e, 400, "top_logprobs", "invalid_value", "'top_logprobs' needs 'logprobs': true");
    } else {
        // logprobs: the number of alternatives (0 .. 20); present means report
        int lp = -1;
        TRY(get_int(body, "logprobs", 0, 20, &lp, e));
        if (lp >= 0) {
            r->logprobs = 1;
            r->top_logprobs = lp;
        }
        TRY(get_bool(body, "echo", &r->echo, e));
        TRY(get_int(body, "best_of", 1, SERVE_MAX_N, &r->best_of, e));
        if (r->best_of < r->n)
            return api_error(e, 400, "best_of", "invalid_value", "'best_of' is %d; it must be at least 'n' (%d)", r->best_of, r->n);
        if (r->best_of > r->n && r->stream)
            return api_error(e, 400, "best_of", "invalid_value", "'best_of' greater than 'n' cannot be streamed");
        // suffix: fill in the middle (the model's FIM format, text/tokenizer.h); an empty one is a
        // plain continuation, as there is nothing after the hole
        json_t *suffix = field(body, "suffix");
        if (suffix && !json_is_string(suffix))
            return api_error(e, 400, "suffix", "invalid_type", "'suffix' must be a string");
        if (suffix && json_string_length(suffix) > 0) {
            for (int i = 0; i < r->n_prompts; i++)
                if (!r->prompts[i].text)
                    return api_error(e, 400, "suffix", "invalid_value",
                                     "'suffix' needs a text prompt (the text before the hole), not token ids");
            if (r->echo)
                return api_error(e, 400, "suffix", "invalid_value", "'echo' cannot be combined with 'suffix'");
            if (!(r->suffix = dup_json_string(suffix))) return OOM(e);
        }
        if (r->max_tokens == 0 && !r->echo)
            return api_error(e, 400, "max_tokens", "invalid_value", "'max_tokens' is 0; it must be at least 1 (0 only with 'echo')");
    }
    TRY(get_bool(body, "ignore_eos", &r->ignore_eos, e));
    TRY(parse_logit_bias(r, body, e));
    json_t *rf = field(body, "response_format");
    if (rf) {
        json_t *type = json_object_get(rf, "type");
        if (!json_is_object(rf) || !json_is_string(type))
            return api_error(e, 400, "response_format", "invalid_type",
                             "'response_format' must be {\"type\": \"text\", \"json_object\" or \"json_schema\"}");
        const char *t = json_string_value(type);
        if (!strcmp(t, "json_object")) r->json_mode = 1;
        else if (!strcmp(t, "json_schema")) TRY(parse_json_schema(r, json_object_get(rf, "json_schema"), e));
        else if (strcmp(t, "text"))
            return api_error(e, 400, "response_format", "invalid_value",
                             "'response_format.type' is '%.40s'; it must be text, json_object or json_schema", t);
    }
    if (r->kind == API_CHAT) TRY(parse_tools(r, body, e));
    return 0;
}

int serve_request_parse(ServeRequest *r, ApiKind kind, const char *body, size_t len, ApiError *e) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->max_tokens = -1;
    r->temperature = 1.0f;  // the API's defaults
    r->top_p = 1.0f;
    r->n = 1;
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    if (!root) return api_error(e, 400, NULL, "invalid_json", "the body is not valid JSON: %s (at byte %d)", je.text, je.position);
    int rc = 0;
    if (!json_is_object(root)) rc = api_error(e, 400, NULL, "invalid_json", "the body must be a JSON object");
    else rc = parse_fields(r, root, e);
    json_decref(root);
    if (rc) serve_request_free(r);
    return rc;
}

void serve_request_free(ServeRequest *r) {
    free(r->model);
    for (int i = 0; i < r->n_msgs; i++) {
        free((char *)r->msgs[i].content);
        for (int k = 0; k < r->msgs[i].n_tool_calls; k++) {
            free((char *)r->msgs[i].tool_calls[k].id);
            free((char *)r->msgs[i].tool_calls[k].name);
            free((char *)r->msgs[i].tool_calls[k].arguments);
        }
        free((void *)r->msgs[i].tool_calls);
    }
    free(r->tools_prompt);
    for (int i = 0; i < r->n_tools; i++) {
        free(r->tool_names[i]);
        if (r->tool_schemas) json_schema_free(r->tool_schemas[i]);
    }
    free(r->tool_names);
    free(r->tool_schemas);
    json_schema_free(r->json_schema);
    free(r->msgs);
    for (int i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].ids);
    }
    free(r->prompts);
    free(r->suffix);
    free(r->bias_ids);
    free(r->bias_values);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    memset(r, 0, sizeof *r);
}
