// Loading tokenizer.json (+ tokenizer_config.json), encoding and decoding.
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "text/pretok.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

// Ids beyond this are refused: an embedding of 2^27 rows is far past any real vocabulary, and the
// bound keeps per-id tables small when a file lists an absurd id.
#define TOK_MAX_ID (1 << 27)

typedef struct AddedTok {
    char *content;
    size_t len;
    int id;
    uint8_t special, lstrip, rstrip, single_word;
} AddedTok;

// A byte trie over the added tokens' contents, for leftmost-longest matching.
typedef struct TrieNode {
    int32_t child, sibling, tok;  // first child, next sibling, index into added (-1: none)
    uint8_t byte;
} TrieNode;

struct Tokenizer {
    char path[4096];
    PreTokenizer pre;
    BpeModel bpe;
    int n_ids;
    uint32_t *dec_off, *dec_len;  // per id: its bytes in dec
    ByteBuf dec;
    uint8_t *defined, *special;  // per id; special: ADDED_SPECIAL | ADDED_TOKEN bits
    StrMap by_text;              // a token's text as written in tokenizer.json -> id
    AddedTok *added;
    int n_added;
    TrieNode *trie;
    int n_trie, cap_trie;
    int32_t root[256];  // first-level trie node of each byte, -1 when no added token starts so
    int bos, eos, pad;
    int cfg_add_bos, cfg_add_eos;  // -1: the config does not say
    TokIds tpl_pre, tpl_post;      // the post-processor template's ids around the text
    int has_tpl;
    Regex word_re;  // single_word: the characters that make a word
    int has_word_re;
    ByteBuf repaired, piece;
    TokIds *out;  // the list encode is appending to
};

enum { ADDED_SPECIAL = 1, ADDED_TOKEN = 2 };  // an id's bits in Tokenizer.special

// ---- small helpers ----

static int get_bool(const json_t *o, const char *key, int dflt, int *out, const char *path, const char *field,
                    Error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) return err_set(err, "%s: %s%s: expected true or false", path, field, key);
    *out = json_is_true(v);
    return 0;
}

// The id of a token's text: added tokens first, then the vocabulary (as the reference's map).
static int text_id(const Tokenizer *t, const char *s, size_t n) {
    uint64_t *v = strmap_find(&t->by_text, s, n);
    return v ? (int)*v : -1;
}

// ---- loading ----

static int check_normalizer(const json_t *n, const char *path, const char *field, Error *err) {
    if (!n || json_is_null(n)) return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (type && strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(n, "normalizers");
        if (!json_is_array(arr)) return err_set(err, "%s: %s.normalizers: expected an array", path, field);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.normalizers[%zu]", field, i);
            if (check_normalizer(json_array_get(arr, i), path, sub, err)) return -1;
        }
        return 0;
    }
    return err_set(err, "%s: %s: normalizer type '%s' is not supported (dsv3 supports none or an empty Sequence)",
                   path, field, type ? type : "(missing)");
}

static int check_decoder(const json_t *d, const char *path, const char *field, Error *err) {
    const char *type = json_string_value(json_object_get(d, "type"));
    if (type && strcmp(type, "ByteLevel") == 0) return 0;
    if (type && strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(d, "decoders");
        if (!json_is_array(arr) || json_array_size(arr) == 0)
            return err_set(err, "%s: %s.decoders: expected a non-empty array", path, field);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.decoders[%zu]", field, i);
            if (check_decoder(json_array_get(arr, i), path, sub, err)) return -1;
        }
        return 0;
    }
    return err_set(err, "%s: %s: decoder type '%s' is not supported (dsv3 decodes byte-level BPE: ByteLevel)", path,
                   field, type ? type : "(missing)");
}

// Reads one TemplateProcessing "single" template into tpl_pre / tpl_post.
static int parse_template(Tokenizer *t, const json_t *pp, const char *field, Error *err) {
    if (t->has_tpl) return err_set(err, "%s: %s: more than one TemplateProcessing", t->path, field);
    json_t *single = json_object_get(pp, "single"), *specials = json_object_get(pp, "special_tokens");
    if (!json_is_array(single)) return err_set(err, "%s: %s.single: expected an array", t->path, field);
    int seen_a = 0;
    for (size_t i = 0; i < json_array_size(single); i++) {
        json_t *it = json_array_get(single, i), *sp = json_object_get(it, "SpecialToken"),
               *sq = json_object_get(it, "Sequence");
        if (sq) {
            const char *sid = json_string_value(json_object_get(sq, "id"));
            if (!sid || strcmp(sid, "A") != 0 || seen_a)
                return err_set(err, "%s: %s.single[%zu]: only one Sequence A is supported", t->path, field, i);
            seen_a = 1;
            continue;
        }
        const char *name = json_string_value(json_object_get(sp, "id"));
        if (!name) return err_set(err, "%s: %s.single[%zu]: expected SpecialToken or Sequence", t->path, field, i);
        json_t *ids = json_object_get(json_object_get(specials, name), "ids");
        if (!json_is_array(ids))
            return err_set(err, "%s: %s.special_tokens: '%s' is not listed with its ids", t->path, field, name);
        for (size_t k = 0; k < json_array_size(ids); k++) {
            json_int_t id = json_integer_value(json_array_get(ids, k));
            if (!json_is_integer(json_array_get(ids, k)) || id < 0 || id >= t->n_ids)
                return err_set(err, "%s: %s.special_tokens.%s.ids[%zu]: not a token id", t->path, field, name, k);
            if (ids_push(seen_a ? &t->tpl_post : &t->tpl_pre, (int)id)) return err_set(err, "out of memory");
        }
    }
    if (!seen_a) return err_set(err, "%s: %s.single: no Sequence A", t->path, field);
    t->has_tpl = 1;
    return 0;
}

static int parse_post_processor(Tokenizer *t, const json_t *pp, const char *field, Error *err) {
    if (!pp || json_is_null(pp)) return 0;
    const char *type = json_string_value(json_object_get(pp, "type"));
    if (type && strcmp(type, "ByteLevel") == 0) return 0;  // only moves offsets, never ids
    if (type && strcmp(type, "TemplateProcessing") == 0) return parse_template(t, pp, field, err);
    if (type && strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(pp, "processors");
        if (!json_is_array(arr)) return err_set(err, "%s: %s.processors: expected an array", t->path, field);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.processors[%zu]", field, i);
            if (parse_post_processor(t, json_array_get(arr, i), sub, err)) return -1;
        }
        return 0;
    }
    return err_set(err, "%s: %s: post-processor type '%s' is not supported (dsv3 supports ByteLevel, "
                   "TemplateProcessing, Sequence)", t->path, field, type ? type : "(missing)");
}

static int parse_model(Tokenizer *t, const json_t *model, json_t *added, Error *err) {
    const char *P = t->path;
    if (!json_is_object(model)) return err_set(err, "%s: model: missing or not an object", P);
    const char *type = json_string_value(json_object_get(model, "type"));
    if (type && strcmp(type, "BPE") != 0)
        return err_set(err, "%s: model.type: '%s' is not supported (dsv3 supports BPE)", P, type);
    json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout) && json_number_value(dropout) != 0.0)
        return err_set(err, "%s: model.dropout: BPE dropout is not supported", P);
    static const char *const unsupported[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const char *v = json_string_value(json_object_get(model, unsupported[i]));
        if (v && *v) return err_set(err, "%s: model.%s: not supported by byte-level BPE", P, unsupported[i]);
    }
    int byte_fallback = 0;
    if (get_bool(model, "byte_fallback", 0, &byte_fallback, P, "model.", err) ||
        get_bool(model, "ignore_merges", 0, &t->bpe.ignore_merges, P, "model.", err))
        return -1;
    if (byte_fallback) return err_set(err, "%s: model.byte_fallback: not supported (byte-level BPE needs none)", P);

    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab)) return err_set(err, "%s: model.vocab: missing or not an object", P);
    if (!json_is_array(added) && added && !json_is_null(added))
        return err_set(err, "%s: added_tokens: expected an array", P);

    // the id space: vocabulary and added tokens
    int max_id = -1;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id >= TOK_MAX_ID)
            return err_set(err, "%s: model.vocab: token '%.80s' has no valid id", P, key);
        if (id > max_id) max_id = (int)id;
    }
    size_t nadd = json_array_size(added);
    for (size_t i = 0; i < nadd; i++) {
        json_t *a = json_array_get(added, i), *idv = json_object_get(a, "id");
        json_int_t id = json_integer_value(idv);
        if (!json_is_object(a) || !json_is_integer(idv) || id < 0 || id >= TOK_MAX_ID)
            return err_set(err, "%s: added_tokens[%zu].id: missing or not a valid id", P, i);
        if (id > max_id) max_id = (int)id;
    }
    if (max_id < 0) return err_set(err, "%s: model.vocab: empty", P);
    t->n_ids = max_id + 1;
    t->dec_off = calloc((size_t)t->n_ids, sizeof *t->dec_off);
    t->dec_len = calloc((size_t)t->n_ids, sizeof *t->dec_len);
    t->defined = calloc((size_t)t->n_ids, 1);
    t->special = calloc((size_t)t->n_ids, 1);
    if (!t->dec_off || !t->dec_len || !t->defined || !t->special) return err_set(err, "out of memory");

    // code point -> byte of the ByteLevel alphabet, -1 outside it
    int16_t decmap[324];
    for (uint32_t cp = 0; cp < 324; cp++) decmap[cp] = (int16_t)bytelevel_byte(cp);
    char one[8];
    json_object_foreach(vocab, key, val) {
        int id = (int)json_integer_value(val);
        if (t->defined[id]) return err_set(err, "%s: model.vocab: id %d is given to two tokens", P, id);
        t->defined[id] = 1;
        size_t klen = strlen(key);
        int is_new;
        uint64_t *slot = strmap_insert(&t->by_text, key, klen, &is_new);
        if (!slot) return err_set(err, "out of memory");
        *slot = (uint64_t)id;
        // the token's bytes: each alphabet character gives its byte; any other character (a
        // special written into the vocabulary) stands for its own UTF-8, as HF's decoder does
        t->dec_off[id] = (uint32_t)t->dec.n;
        int pure = 1;
        const uint8_t *k = (const uint8_t *)key;
        for (size_t i = 0; i < klen;) {
            uint32_t cp;
            size_t cl = utf8_decode(k + i, klen - i, &cp);
            if (cp < 324 && decmap[cp] >= 0) {
                char b = (char)decmap[cp];
                if (bb_append(&t->dec, &b, 1)) return err_set(err, "out of memory");
            } else {
                pure = 0;
                if (bb_append(&t->dec, k + i, cl)) return err_set(err, "out of memory");
            }
            i += cl;
        }
        t->dec_len[id] = (uint32_t)(t->dec.n - t->dec_off[id]);
        if (t->bpe.ignore_merges && pure) {
            uint64_t *w = strmap_insert(&t->bpe.whole, t->dec.p + t->dec_off[id], t->dec_len[id], &is_new);
            if (!w) return err_set(err, "out of memory");
            *w = (uint64_t)id;
        }
    }

    // added tokens take their ids' text and bytes (the reference maps content -> id last)
    t->added = calloc(nadd ? nadd : 1, sizeof *t->added);
    if (!t->added) return err_set(err, "out of memory");
    for (size_t i = 0; i < nadd; i++) {
        json_t *a = json_array_get(added, i), *c = json_object_get(a, "content");
        char field[64];
        snprintf(field, sizeof field, "added_tokens[%zu].", i);
        if (!json_is_string(c) || json_string_length(c) == 0)
            return err_set(err, "%s: added_tokens[%zu].content: missing or empty", P, i);
        AddedTok *at = &t->added[t->n_added];
        int sw = 0, ls = 0, rs = 0, sp = 0;
        if (get_bool(a, "single_word", 0, &sw, P, field, err) || get_bool(a, "lstrip", 0, &ls, P, field, err) ||
            get_bool(a, "rstrip", 0, &rs, P, field, err) || get_bool(a, "special", 0, &sp, P, field, err))
            return -1;
        size_t clen = json_string_length(c);
        const char *cs = json_string_value(c);
        if (utf8_valid_prefix((const uint8_t *)cs, clen) != clen)
            return err_set(err, "%s: added_tokens[%zu].content: not valid UTF-8", P, i);
        at->content = malloc(clen + 1);
        if (!at->content) return err_set(err, "out of memory");
        memcpy(at->content, cs, clen + 1);
        at->len = clen;
        at->id = (int)json_integer_value(json_object_get(a, "id"));
        at->single_word = (uint8_t)sw;
        at->lstrip = (uint8_t)ls;
        at->rstrip = (uint8_t)rs;
        at->special = (uint8_t)sp;
        t->n_added++;
        int id = at->id, is_new;
        t->defined[id] = 1;
        t->special[id] = (uint8_t)(ADDED_TOKEN | (sp ? ADDED_SPECIAL : 0));
        t->dec_off[id] = (uint32_t)t->dec.n;
        t->dec_len[id] = (uint32_t)clen;
        if (bb_append(&t->dec, cs, clen)) return err_set(err, "out of memory");
        uint64_t *slot = strmap_insert(&t->by_text, cs, clen, &is_new);
        if (!slot) return err_set(err, "out of memory");
        *slot = (uint64_t)id;
    }

    // every byte needs a token of its own, or some text could not be encoded at all
    for (int b = 0; b < 256; b++) {
        int n = utf8_encode(bytelevel_char((uint8_t)b), one);
        int id = text_id(t, one, (size_t)n);
        if (id < 0) return err_set(err, "%s: model.vocab: no token for byte 0x%02X ('%.*s')", P, b, n, one);
        t->bpe.byte_id[b] = id;
    }

    json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges)) return err_set(err, "%s: model.merges: missing or not an array", P);
    ByteBuf cat = {0};
    for (size_t i = 0; i < json_array_size(merges); i++) {
        json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t al, bl;
        if (json_is_string(m)) {
            // "A B": byte-level symbols never hold a space, so the first space separates them
            const char *s = json_string_value(m), *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ') || sp == s || !sp[1]) {
                bb_free(&cat);
                return err_set(err, "%s: model.merges[%zu]: '%.80s' is not two symbols separated by a space", P, i,
                               s);
            }
            a = s;
            al = (size_t)(sp - s);
            b = sp + 1;
            bl = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            al = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            bl = json_string_length(json_array_get(m, 1));
        } else {
            bb_free(&cat);
            return err_set(err, "%s: model.merges[%zu]: expected \"A B\" or [\"A\", \"B\"]", P, i);
        }
        int ia = text_id(t, a, al), ib = text_id(t, b, bl);
        cat.n = 0;
        if (bb_append(&cat, a, al) || bb_append(&cat, b, bl)) {
            bb_free(&cat);
            return err_set(err, "out of memory");
        }
        int im = text_id(t, cat.p, cat.n);
        if (ia < 0 || ib < 0 || im < 0) {
            const char *what = ia < 0 ? a : ib < 0 ? b : cat.p;
            int wl = (int)(ia < 0 ? al : ib < 0 ? bl : cat.n);
            err_set(err, "%s: model.merges[%zu]: %s '%.*s' is not in the vocabulary", P, i,
                    ia < 0 || ib < 0 ? "symbol" : "merged token", wl > 80 ? 80 : wl, what);
            bb_free(&cat);
            return -1;
        }
        if (bpe_add_merge(&t->bpe, ia, ib, im, (int32_t)i)) {
            bb_free(&cat);
            return err_set(err, "out of memory");
        }
    }
    bb_free(&cat);
    return 0;
}

static int trie_node(Tokenizer *t, uint8_t byte) {
    if (t->n_trie == t->cap_trie) {
        int cap = t->cap_trie ? t->cap_trie * 2 : 256;
        TrieNode *n = realloc(t->trie, (size_t)cap * sizeof *n);
        if (!n) return -1;
        t->trie = n;
        t->cap_trie = cap;
    }
    t->trie[t->n_trie] = (TrieNode){-1, -1, -1, byte};
    return t->n_trie++;
}

static int build_trie(Tokenizer *t, Error *err) {
    for (int b = 0; b < 256; b++) t->root[b] = -1;
    for (int k = 0; k < t->n_added; k++) {
        const uint8_t *s = (const uint8_t *)t->added[k].content;
        int node = t->root[s[0]];
        if (node < 0) {
            if ((node = trie_node(t, s[0])) < 0) return err_set(err, "out of memory");
            t->root[s[0]] = node;
        }
        for (size_t i = 1; i < t->added[k].len; i++) {
            int c = t->trie[node].child;
            while (c >= 0 && t->trie[c].byte != s[i]) c = t->trie[c].sibling;
            if (c < 0) {
                if ((c = trie_node(t, s[i])) < 0) return err_set(err, "out of memory");
                t->trie[c].sibling = t->trie[node].child;
                t->trie[node].child = c;
            }
            node = c;
        }
        t->trie[node].tok = k;  // a content listed twice: the later entry wins, as in the reference
        if (t->added[k].single_word && !t->has_word_re) {
            static const char WORD[] = "[\\p{L}\\p{N}_]";
            if (regex_compile(&t->word_re, WORD, strlen(WORD), 0, err)) return -1;
            t->has_word_re = 1;
        }
    }
    return 0;
}

// The config's "bos_token": a string, {"content": ...}, or null.
static int config_token(Tokenizer *t, const json_t *cfg, const char *key, const char *cpath, int *out, Error *err) {
    *out = -1;
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) return 0;
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return err_set(err, "%s: %s: expected a string or {\"content\": ...}", cpath, key);
    int id = text_id(t, json_string_value(v), json_string_length(v));
    if (id < 0)
        return err_set(err, "%s: %s: '%.80s' is not a token of %s", cpath, key, json_string_value(v), t->path);
    *out = id;
    return 0;
}

static int load_config(Tokenizer *t, Error *err) {
    char dir[4096], cpath[4200];
    snprintf(dir, sizeof dir, "%s", t->path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    else snprintf(dir, sizeof dir, ".");
    snprintf(cpath, sizeof cpath, "%s/tokenizer_config.json", dir);
    if (!path_exists(cpath)) return 0;
    json_t *cfg = file_read_json(cpath, 0, err);
    if (!cfg) return -1;
    int rc = -1;
    if (!json_is_object(cfg)) {
        err_set(err, "%s: expected a JSON object", cpath);
        goto done;
    }
    if (config_token(t, cfg, "bos_token", cpath, &t->bos, err) || config_token(t, cfg, "eos_token", cpath, &t->eos, err) ||
        config_token(t, cfg, "pad_token", cpath, &t->pad, err))
        goto done;
    for (int k = 0; k < 2; k++) {
        const char *key = k ? "add_eos_token" : "add_bos_token";
        json_t *v = json_object_get(cfg, key);
        int *dst = k ? &t->cfg_add_eos : &t->cfg_add_bos;
        if (!v || json_is_null(v)) continue;
        if (!json_is_boolean(v)) {
            err_set(err, "%s: %s: expected true or false", cpath, key);
            goto done;
        }
        *dst = json_is_true(v);
        if (*dst && (k ? t->eos : t->bos) < 0) {
            err_set(err, "%s: %s is true but %s is not set", cpath, key, k ? "eos_token" : "bos_token");
            goto done;
        }
    }
    rc = 0;
done:
    json_decref(cfg);
    return rc;
}

Tokenizer *tok_load(const char *path, Error *err) {
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        err_set(err, "out of memory");
        return NULL;
    }
    bpe_init(&t->bpe);
    t->bos = t->eos = t->pad = -1;
    t->cfg_add_bos = t->cfg_add_eos = -1;
    snprintf(t->path, sizeof t->path, "%s", path);
    const char *P = t->path;
    json_t *root = NULL;
    root = file_read_json(path, JSON_ALLOW_NUL, err);
    if (!root) goto fail;
    if (!json_is_object(root)) {
        err_set(err, "%s: expected a JSON object", P);
        goto fail;
    }
    json_t *trunc = json_object_get(root, "truncation");
    if (trunc && !json_is_null(trunc)) {
        err_set(err, "%s: truncation: not supported (dsv3 never cuts a text short)", P);
        goto fail;
    }
    json_t *dec = json_object_get(root, "decoder");
    if (!dec || json_is_null(dec)) {
        err_set(err, "%s: decoder: missing (dsv3 decodes byte-level BPE: ByteLevel)", P);
        goto fail;
    }
    if (check_normalizer(json_object_get(root, "normalizer"), P, "normalizer", err) ||
        check_decoder(dec, P, "decoder", err) ||
        parse_model(t, json_object_get(root, "model"), json_object_get(root, "added_tokens"), err) ||
        parse_post_processor(t, json_object_get(root, "post_processor"), "post_processor", err) ||
        pretok_from_json(&t->pre, json_object_get(root, "pre_tokenizer"), P, err) || build_trie(t, err) ||
        load_config(t, err))
        goto fail;
    json_decref(root);
    return t;
fail:
    json_decref(root);
    tok_free(t);
    return NULL;
}

Tokenizer *tok_load_dir(const char *dir, Error *err) {
    char path[4096];
    if (path_join(path, sizeof path, dir, "tokenizer.json", err)) return NULL;
    if (!path_exists(path)) {
        err_set(err, "%s: not found (the model directory needs a tokenizer.json)", path);
        return NULL;
    }
    return tok_load(path, err);
}

void tok_free(Tokenizer *t) {
    if (!t) return;
    pretok_free(&t->pre);
    bpe_free(&t->bpe);
    free(t->dec_off);
    free(t->dec_len);
    bb_free(&t->dec);
    free(t->defined);
    free(t->special);
    strmap_free(&t->by_text);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t->trie);
    ids_free(&t->tpl_pre);
    ids_free(&t->tpl_post);
    if (t->has_word_re) regex_free(&t->word_re);
    bb_free(&t->repaired);
    bb_free(&t->piece);
    free(t);
}

int tok_vocab_size(const Tokenizer *t) { return t->n_ids; }
int tok_bos_id(const Tokenizer *t) { return t->bos; }
int tok_eos_id(const Tokenizer *t) { return t->eos; }
int tok_pad_id(const Tokenizer *t) { return t->pad; }
int tok_token_id(const Tokenizer *t, const char *text) { return text_id(t, text, strlen(text)); }

const char *tok_token_bytes(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->n_ids || !t->defined[id]) return NULL;
    *len = t->dec_len[id];
    return t->dec.p + t->dec_off[id];
}

int tok_is_special(const Tokenizer *t, int id) { return id >= 0 && id < t->n_ids && (t->special[id] & ADDED_SPECIAL); }
int tok_is_added(const Tokenizer *t, int id) { return id >= 0 && id < t->n_ids && (t->special[id] & ADDED_TOKEN); }

// ---- encoding ----

static int piece_to_ids(void *ctx, const uint8_t *s, size_t n, int prefix_space, Error *err) {
    Tokenizer *t = ctx;
    if (prefix_space) {
        t->piece.n = 0;
        if (bb_append(&t->piece, " ", 1) || bb_append(&t->piece, s, n)) return err_set(err, "out of memory");
        s = (const uint8_t *)t->piece.p;
        n++;
    }
    if (bpe_encode_piece(&t->bpe, s, n, t->out)) return err_set(err, "out of memory");
    return 0;
}

// The code point that ends just before s[i] (i > 0, s valid UTF-8).
static uint32_t cp_before(const uint8_t *s, size_t i) {
    size_t j = i - 1;
    while (j > 0 && (s[j] & 0xC0) == 0x80) j--;
    uint32_t cp;
    utf8_decode(s + j, i - j, &cp);
    return cp;
}

static int is_word_at(Tokenizer *t, const uint8_t *s, size_t n, size_t at, Error *err) {
    size_t ms, me, cl = 1;
    while (at + cl < n && (s[at + cl] & 0xC0) == 0x80) cl++;
    return regex_next(&t->word_re, s + at, cl, 0, &ms, &me, err);
}

// A text section between added tokens, trimmed as the neighbouring tokens' lstrip/rstrip ask.
static int encode_section(Tokenizer *t, const uint8_t *s, size_t a, size_t b, int trim_start, int trim_end,
                          Error *err) {
    uint32_t cp;
    while (trim_start && a < b) {
        size_t cl = utf8_decode(s + a, b - a, &cp);
        if (!js_is_space(cp)) break;
        a += cl;
    }
    while (trim_end && b > a && js_is_space(cp = cp_before(s, b))) {
        size_t j = b - 1;
        while (j > a && (s[j] & 0xC0) == 0x80) j--;
        b = j;
    }
    if (b <= a) return 0;
    return pretok_run(&t->pre, s + a, b - a, piece_to_ids, t, err);
}

static int encode_body(Tokenizer *t, const uint8_t *s, size_t n, Error *err) {
    size_t start = 0, i = 0;
    int rstrip_next = 0;
    while (i < n) {
        int node = t->root[s[i]];
        if (node < 0) {
            i++;
            continue;
        }
        int best = -1;
        size_t best_end = 0, j = i;
        // walk the trie for the longest added token starting at i
        for (;;) {
            if (t->trie[node].tok >= 0) best = t->trie[node].tok, best_end = j + 1;
            if (++j >= n) break;
            int c = t->trie[node].child;
            while (c >= 0 && t->trie[c].byte != s[j]) c = t->trie[c].sibling;
            if (c < 0) break;
            node = c;
        }
        if (best < 0) {
            i++;
            continue;
        }
        const AddedTok *at = &t->added[best];
        if (at->single_word) {
            // HF's rule: a single_word token is not taken from inside a word
            int before = 0, after = 0;
            if (i > 0) {
                size_t j0 = i - 1;
                while (j0 > 0 && (s[j0] & 0xC0) == 0x80) j0--;
                before = is_word_at(t, s, n, j0, err);
            }
            if (best_end < n) after = is_word_at(t, s, n, best_end, err);
            if (before < 0 || after < 0) return -1;
            if (before || after) {
                i++;
                continue;
            }
        }
        if (encode_section(t, s, start, i, rstrip_next, at->lstrip, err)) return -1;
        if (ids_push(t->out, at->id)) return err_set(err, "out of memory");
        rstrip_next = at->rstrip;
        i = start = best_end;
    }
    return encode_section(t, s, start, n, rstrip_next, 0, err);
}

int tok_encode(Tokenizer *t, const char *text, size_t len, int flags, TokIds *out, Error *err) {
    const uint8_t *s = (const uint8_t *)text;
    // pieces are addressed with 32-bit offsets (and repair can triple the length)
    if (len > UINT32_MAX / 3) return err_set(err, "a text of %zu bytes is too long to encode at once (1 GiB at most)", len);
    if (utf8_valid_prefix(s, len) != len) {
        t->repaired.n = 0;
        if (utf8_repair(s, len, 1, &t->repaired) == (size_t)-1) return err_set(err, "out of memory");
        s = (const uint8_t *)t->repaired.p;
        len = t->repaired.n;
    }
    const TokIds *pre = NULL, *post = NULL;
    int cfg_bos = 0, cfg_eos = 0;
    if (flags & TOK_ADD_SPECIAL) {
        if (t->cfg_add_bos >= 0 || t->cfg_add_eos >= 0) {
            cfg_bos = t->cfg_add_bos > 0;
            cfg_eos = t->cfg_add_eos > 0;
        } else if (t->has_tpl) {
            pre = &t->tpl_pre;
            post = &t->tpl_post;
        }
    }
    if ((flags & TOK_ADD_BOS) && t->bos < 0)
        return err_set(err, "%s: no BOS token (tokenizer_config.json beside it names none)", t->path);
    size_t n0 = out->n;
    int bos_added = 0;
    if ((flags & TOK_ADD_BOS) && !(pre && pre->n && pre->v[0] == t->bos)) {
        if (ids_push(out, t->bos)) return err_set(err, "out of memory");
        bos_added = 1;
    }
    if (cfg_bos && !bos_added && ids_push(out, t->bos)) return err_set(err, "out of memory");
    if (pre && ids_append(out, pre->v, pre->n)) return err_set(err, "out of memory");
    t->out = out;
    if (encode_body(t, s, len, err)) {
        out->n = n0;
        return -1;
    }
    if (post && ids_append(out, post->v, post->n)) return err_set(err, "out of memory");
    if (cfg_eos && ids_push(out, t->eos)) return err_set(err, "out of memory");
    return 0;
}

// ---- decoding ----

static int check_id(const Tokenizer *t, int id, Error *err) {
    if (id < 0 || id >= t->n_ids) return err_set(err, "token id %d is out of range (vocabulary: 0..%d)", id, t->n_ids - 1);
    if (!t->defined[id]) return err_set(err, "token id %d is not in the vocabulary", id);
    return 0;
}

char *tok_decode(const Tokenizer *t, const int *ids, size_t n, int flags, size_t *len, Error *err) {
    ByteBuf raw = {0}, out = {0};
    for (size_t i = 0; i < n; i++) {
        if (check_id(t, ids[i], err)) {
            bb_free(&raw);
            return NULL;
        }
        if ((flags & TOK_SKIP_SPECIAL) && (t->special[ids[i]] & ADDED_SPECIAL)) continue;
        if (bb_append(&raw, t->dec.p + t->dec_off[ids[i]], t->dec_len[ids[i]])) goto oom;
    }
    if (utf8_repair((const uint8_t *)raw.p, raw.n, 1, &out) == (size_t)-1 || bb_reserve(&out, 0)) goto oom;
    bb_free(&raw);
    *len = out.n;
    return out.p;
oom:
    bb_free(&raw);
    bb_free(&out);
    err_set(err, "out of memory");
    return NULL;
}

void tok_stream_init(TokStream *s, const Tokenizer *t, int flags) {
    memset(s, 0, sizeof *s);
    s->tok = t;
    s->flags = flags;
}

int tok_stream_push(TokStream *s, int id, const char **text, size_t *len, Error *err) {
    const Tokenizer *t = s->tok;
    s->out.n = 0;
    *text = "";
    *len = 0;
    if (check_id(t, id, err)) return -1;
    if ((s->flags & TOK_SKIP_SPECIAL) && (t->special[id] & ADDED_SPECIAL)) return 0;
    if (bb_append(&s->in, t->dec.p + t->dec_off[id], t->dec_len[id]) || bb_reserve(&s->out, 0))
        return err_set(err, "out of memory");
    size_t used = utf8_repair((const uint8_t *)s->in.p, s->in.n, 0, &s->out);
    if (used == (size_t)-1) return err_set(err, "out of memory");
    // keep the start of an unfinished character for the next token
    memmove(s->in.p, s->in.p + used, s->in.n - used);
    s->in.n -= used;
    *text = s->out.p;
    *len = s->out.n;
    return 0;
}

void tok_stream_finish(TokStream *s, const char **text, size_t *len) {
    s->out.n = 0;
    *text = "";
    *len = 0;
    if (s->in.n && utf8_repair((const uint8_t *)s->in.p, s->in.n, 1, &s->out) != (size_t)-1) {
        *text = s->out.p;
        *len = s->out.n;
    }
    s->in.n = 0;
}

void tok_stream_free(TokStream *s) {
    bb_free(&s->in);
    bb_free(&s->out);
}
