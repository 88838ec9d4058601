// Byte-level BPE training: count the pre-tokenized pieces of the text, then repeatedly merge the
// most frequent adjacent pair, updating pair counts only in the words that hold the pair.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/file.h"
#include "text/bpe_train.h"
#include "text/pretok.h"
#include "text/strmap.h"
#include "text/utf8.h"

const char *const DEEPSEEK_V3_SPLIT_REGEX[3] = {
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+"
    "[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

// DeepSeek-V3's: BOS, EOS, pad, the chat turns' markers, its tool-call format's markers (text/
// chat.c) and fill-in-the-middle's, each one token, as in the released tokenizer.json.
const char *const BPE_TRAIN_SPECIALS[BPE_TRAIN_N_SPECIAL] = {
    "<｜begin▁of▁sentence｜>",  "<｜end▁of▁sentence｜>",  "<｜▁pad▁｜>",           "<｜User｜>",
    "<｜Assistant｜>",          "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",  "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",      "<｜tool▁sep｜>",         "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",  "<｜tool▁output▁end｜>", "<｜fim▁hole｜>",          "<｜fim▁begin｜>",
    "<｜fim▁end｜>",
};
#define N_SPECIAL_FLAGGED 3  // BOS, EOS, pad are "special" (skipped by skip_special_tokens)
#define FIRST_BYTE_ID BPE_TRAIN_N_SPECIAL

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static json_t *deepseek_pretokenizer(void) {
    json_t *steps = json_array();
    for (int i = 0; i < 3; i++)
        json_array_append_new(steps, json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex",
                                               DEEPSEEK_V3_SPLIT_REGEX[i], "behavior", "Isolated", "invert", 0));
    json_array_append_new(steps, json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                                           "trim_offsets", 1, "use_regex", 0));
    return json_pack("{s:s, s:o}", "type", "Sequence", "pretokenizers", steps);
}

// ---- counting pieces ----

typedef struct CountCtx {
    StrMap *words;
    size_t pieces;
    int oom;
} CountCtx;

static int count_piece(void *ctx, const uint8_t *s, size_t n, int prefix_space, Error *err) {
    CountCtx *c = ctx;
    (void)prefix_space;  // DeepSeek-V3's ByteLevel adds no prefix space
    int is_new;
    uint64_t *v = strmap_insert(c->words, s, n, &is_new);
    if (!v) return err_set(err, "out of memory");
    (*v)++;
    c->pieces++;
    return 0;
}

// ---- pairs ----

typedef struct Pair {
    int32_t a, b;
    int64_t count;
    int32_t *w;  // words that held the pair when it formed (some may not any more)
    uint32_t nw, capw;
} Pair;

typedef struct PairTable {
    uint64_t *key;  // packed (a, b); UINT64_MAX empty
    int32_t *idx;
    size_t cap;
    Pair *p;
    size_t n, capp;
} PairTable;

static inline uint64_t pkey(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }
static inline size_t pslot(uint64_t k, size_t cap) { return (size_t)((k * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1); }

static int ptab_grow(PairTable *t) {
    size_t cap = t->cap ? t->cap * 2 : 1 << 16;
    uint64_t *key = malloc(cap * sizeof *key);
    int32_t *idx = malloc(cap * sizeof *idx);
    if (!key || !idx) {
        free(key);
        free(idx);
        return -1;
    }
    for (size_t i = 0; i < cap; i++) key[i] = UINT64_MAX;
    for (size_t i = 0; i < t->cap; i++) {
        if (t->key[i] == UINT64_MAX) continue;
        size_t j = pslot(t->key[i], cap);
        while (key[j] != UINT64_MAX) j = (j + 1) & (cap - 1);
        key[j] = t->key[i];
        idx[j] = t->idx[i];
    }
    free(t->key);
    free(t->idx);
    t->key = key;
    t->idx = idx;
    t->cap = cap;
    return 0;
}

// The index of pair (a, b), added with count 0 when create is set; -1 when absent (or OOM on create).
static int32_t ptab_get(PairTable *t, int32_t a, int32_t b, int create) {
    if (create && (t->n + 1) * 2 > t->cap && ptab_grow(t)) return -1;
    if (!t->cap) return -1;
    uint64_t k = pkey(a, b);
    size_t i = pslot(k, t->cap);
    while (t->key[i] != UINT64_MAX) {
        if (t->key[i] == k) return t->idx[i];
        i = (i + 1) & (t->cap - 1);
    }
    if (!create) return -1;
    if (t->n == t->capp) {
        size_t capp = t->capp ? t->capp * 2 : 1 << 15;
        Pair *np = realloc(t->p, capp * sizeof *np);
        if (!np) return -1;
        t->p = np;
        t->capp = capp;
    }
    t->p[t->n] = (Pair){a, b, 0, NULL, 0, 0};
    t->key[i] = k;
    t->idx[i] = (int32_t)t->n;
    return (int32_t)t->n++;
}

static int pair_add_word(Pair *p, int32_t w) {
    if (p->nw && p->w[p->nw - 1] == w) return 0;
    if (p->nw == p->capw) {
        uint32_t cap = p->capw ? p->capw * 2 : 4;
        int32_t *nw = realloc(p->w, cap * sizeof *nw);
        if (!nw) return -1;
        p->w = nw;
        p->capw = cap;
    }
    p->w[p->nw++] = w;
    return 0;
}

// ---- the max-heap of candidate merges (lazy: an entry is current only if its count still is) ----

typedef struct Cand {
    int64_t count;
    int32_t a, b;
} Cand;

typedef struct Heap {
    Cand *v;
    size_t n, cap;
} Heap;

// Higher count first; among equal counts the smaller pair, so the result never depends on hashing.
static inline int cand_before(const Cand *x, const Cand *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static int heap_push(Heap *h, Cand c) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 1 << 16;
        Cand *nv = realloc(h->v, cap * sizeof *nv);
        if (!nv) return -1;
        h->v = nv;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_before(&c, &h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = c;
    return 0;
}

static Cand heap_pop(Heap *h) {
    Cand top = h->v[0], last = h->v[--h->n];
    size_t i = 0, n = h->n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && cand_before(&h->v[c + 1], &h->v[c])) c++;
        if (!cand_before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (n) h->v[i] = last;
    return top;
}

// ---- writing ----

// A token's bytes in the ByteLevel alphabet, appended to out.
static int bytelevel_text(const uint8_t *s, size_t n, ByteBuf *out) {
    char u[4];
    for (size_t i = 0; i < n; i++)
        if (bb_append(out, u, (size_t)utf8_encode(bytelevel_char(s[i]), u))) return -1;
    return 0;
}

static int write_outputs(const char *out_json, const ByteBuf *tokbytes, const uint32_t *off, const uint32_t *len,
                         int n_ids, const int32_t *merges, int n_merges, Error *err) {
    json_t *vocab = json_object(), *mlist = json_array(), *added = json_array();
    ByteBuf s = {0};
    int rc = -1;
    if (!vocab || !mlist || !added) goto oom;
    for (int i = 0; i < BPE_TRAIN_N_SPECIAL; i++) {
        if (json_object_set_new(vocab, BPE_TRAIN_SPECIALS[i], json_integer(i))) goto oom;
        json_t *a = json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", i, "content", BPE_TRAIN_SPECIALS[i],
                              "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", i >= N_SPECIAL_FLAGGED,
                              "special", i < N_SPECIAL_FLAGGED);
        if (!a || json_array_append_new(added, a)) goto oom;
    }
    for (int id = FIRST_BYTE_ID; id < n_ids; id++) {
        s.n = 0;
        if (bytelevel_text((const uint8_t *)tokbytes->p + off[id], len[id], &s) || bb_reserve(&s, 0)) goto oom;
        if (json_object_setn_new(vocab, s.p, s.n, json_integer(id))) goto oom;
    }
    for (int m = 0; m < n_merges; m++) {
        s.n = 0;
        int a = merges[2 * m], b = merges[2 * m + 1];
        if (bytelevel_text((const uint8_t *)tokbytes->p + off[a], len[a], &s) || bb_append(&s, " ", 1) ||
            bytelevel_text((const uint8_t *)tokbytes->p + off[b], len[b], &s))
            goto oom;
        if (json_array_append_new(mlist, json_stringn(s.p, s.n))) goto oom;
    }
    json_t *model = json_pack("{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:b, s:O, s:O}", "type", "BPE", "dropout",
                              "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", 0,
                              "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab, "merges", mlist);
    json_t *root = json_pack("{s:s, s:n, s:n, s:O, s:n, s:o, s:{s:s,s:b,s:b,s:b}, s:{s:s,s:b,s:b,s:b}, s:o}",
                             "version", "1.0", "truncation", "padding", "added_tokens", added, "normalizer",
                             "pre_tokenizer", deepseek_pretokenizer(), "post_processor", "type", "ByteLevel",
                             "add_prefix_space", 1, "trim_offsets", 0, "use_regex", 1, "decoder", "type",
                             "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex", 1, "model", model);
    if (!model || !root) goto oom;
    char *text = json_dumps(root, JSON_INDENT(2));
    json_decref(root);
    if (!text) goto oom;
    char dir[4096], cpath[4200];  // the output's directory, made when missing (as prepare and init make theirs)
    snprintf(dir, sizeof dir, "%s", out_json);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    else snprintf(dir, sizeof dir, ".");
    rc = make_dirs(dir, err) || file_write_all(out_json, text, strlen(text), err);
    free(text);
    if (rc) goto done;
    // the config names BOS/EOS/pad and asks for BOS, as DeepSeek-V3's does
    snprintf(cpath, sizeof cpath, "%s/tokenizer_config.json", dir);
    json_t *cfg = json_pack("{s:b, s:b, s:s, s:s, s:s, s:b, s:b, s:s, s:n}", "add_bos_token", 1, "add_eos_token", 0,
                            "bos_token", BPE_TRAIN_SPECIALS[0], "eos_token", BPE_TRAIN_SPECIALS[1], "pad_token",
                            BPE_TRAIN_SPECIALS[2], "clean_up_tokenization_spaces", 0, "legacy", 1, "tokenizer_class",
                            "LlamaTokenizerFast", "unk_token");
    char *ctext = cfg ? json_dumps(cfg, JSON_INDENT(2)) : NULL;
    json_decref(cfg);
    if (!ctext) {
        rc = -1;
        goto oom;
    }
    rc = file_write_all(cpath, ctext, strlen(ctext), err);
    free(ctext);
    goto done;
oom:
    err_set(err, "out of memory");
    rc = -1;
done:
    json_decref(vocab);
    json_decref(mlist);
    json_decref(added);
    bb_free(&s);
    return rc;
}

// ---- training ----

int bpe_train(const char *const *files, int nfiles, int vocab_size, const char *out_json, BpeTrainStats *st,
              Error *err) {
    memset(st, 0, sizeof *st);
    if (vocab_size < FIRST_BYTE_ID + 256 + 1)
        return err_set(err, "--vocab-size %d: must be at least %d (%d specials, 256 bytes, one merge)", vocab_size,
                       FIRST_BYTE_ID + 257, FIRST_BYTE_ID);
    if (nfiles < 1) return err_set(err, "no input files");
    double t0 = now_s();
    PreTokenizer pre = {0};
    StrMap words = {0};
    PairTable pt = {0};
    Heap heap = {0};
    ByteBuf repaired = {0}, tokbytes = {0};
    StrMap tokmap = {0};
    uint32_t *toff = NULL, *tlen = NULL;
    int32_t *sym = NULL, *merges = NULL, *stamp = NULL, *pushed = NULL;
    uint32_t *woff = NULL, *wlen = NULL;
    int64_t *wcnt = NULL;
    int rc = -1;
    json_t *pj = deepseek_pretokenizer();
    if (!pj) return err_set(err, "out of memory");
    if (pretok_from_json(&pre, pj, "DeepSeek-V3 pre-tokenizer", err)) {
        json_decref(pj);
        return -1;
    }
    json_decref(pj);

    CountCtx cc = {&words, 0, 0};
    for (int f = 0; f < nfiles; f++) {
        size_t n;
        char *text = file_read_all(files[f], &n, err);
        if (!text) goto done;
        const uint8_t *s = (const uint8_t *)text;
        if (utf8_valid_prefix(s, n) != n) {
            repaired.n = 0;
            if (utf8_repair(s, n, 1, &repaired) == (size_t)-1) {
                free(text);
                err_set(err, "out of memory");
                goto done;
            }
            s = (const uint8_t *)repaired.p;
            n = repaired.n;
        }
        st->bytes += n;
        int r = pretok_run(&pre, s, n, count_piece, &cc, err);
        free(text);
        if (r) {
            err_prefix(err, "%s", files[f]);
            goto done;
        }
    }
    st->pieces = cc.pieces;
    st->unique = words.count;
    double t1 = now_s();
    st->seconds_count = t1 - t0;

    // words: the distinct pieces as symbol ids (byte b is id FIRST_BYTE_ID + b), with their counts
    size_t nw = words.count, total = 0;
    woff = malloc((nw + 1) * sizeof *woff);
    wlen = malloc((nw + 1) * sizeof *wlen);
    wcnt = malloc((nw + 1) * sizeof *wcnt);
    stamp = calloc(nw + 1, sizeof *stamp);
    sym = malloc((words.keys.n + 1) * sizeof *sym);
    toff = malloc((size_t)vocab_size * sizeof *toff);
    tlen = malloc((size_t)vocab_size * sizeof *tlen);
    merges = malloc((size_t)vocab_size * 2 * sizeof *merges);
    pushed = calloc((size_t)vocab_size, sizeof *pushed);
    if (!woff || !wlen || !wcnt || !stamp || !sym || !toff || !tlen || !merges || !pushed) goto oom;
    size_t w = 0;
    for (size_t i = 0; i < words.cap; i++) {
        if (!words.slots[i].hash) continue;
        size_t kl;
        const uint8_t *k = strmap_key(&words, i, &kl);
        woff[w] = (uint32_t)total;
        wlen[w] = (uint32_t)kl;
        wcnt[w] = (int64_t)words.slots[i].val;
        for (size_t j = 0; j < kl; j++) sym[total + j] = FIRST_BYTE_ID + k[j];
        total += kl;
        w++;
    }
    // token bytes: the specials have none (they never take part in merges)
    for (int i = 0; i < FIRST_BYTE_ID; i++) toff[i] = tlen[i] = 0;
    for (int b = 0; b < 256; b++) {
        uint8_t byte = (uint8_t)b;
        int is_new;
        toff[FIRST_BYTE_ID + b] = (uint32_t)tokbytes.n;
        tlen[FIRST_BYTE_ID + b] = 1;
        uint64_t *slot = strmap_insert(&tokmap, &byte, 1, &is_new);
        if (bb_append(&tokbytes, &byte, 1) || !slot) goto oom;
        *slot = (uint64_t)(FIRST_BYTE_ID + b);
    }
    int n_ids = FIRST_BYTE_ID + 256, n_merges = 0;

    for (size_t i = 0; i < nw; i++)
        for (uint32_t j = 0; j + 1 < wlen[i]; j++) {
            int32_t p = ptab_get(&pt, sym[woff[i] + j], sym[woff[i] + j + 1], 1);
            if (p < 0 || pair_add_word(&pt.p[p], (int32_t)i)) goto oom;
            pt.p[p].count += wcnt[i];
        }
    for (size_t p = 0; p < pt.n; p++)
        if (heap_push(&heap, (Cand){pt.p[p].count, pt.p[p].a, pt.p[p].b})) goto oom;

    int step = 0;
    int32_t *touched = NULL;
    size_t ntouched = 0, captouched = 0;
    while (n_ids < vocab_size && heap.n) {
        Cand c = heap_pop(&heap);
        int32_t pi = ptab_get(&pt, c.a, c.b, 0);
        if (pi < 0) continue;
        if (pt.p[pi].count != c.count) {
            // stale: the count changed since this entry was pushed; queue the current one
            if (pt.p[pi].count > 0 && heap_push(&heap, (Cand){pt.p[pi].count, c.a, c.b})) goto oom_t;
            continue;
        }
        if (c.count < 2) break;
        // the merged token; a byte string that already exists keeps its id (another pair made it)
        int32_t a = c.a, b = c.b, id;
        size_t cat = tokbytes.n;
        // both halves live in tokbytes itself: grow it first, then copy
        if (bb_reserve(&tokbytes, tlen[a] + tlen[b])) goto oom_t;
        memcpy(tokbytes.p + cat, tokbytes.p + toff[a], tlen[a]);
        memcpy(tokbytes.p + cat + tlen[a], tokbytes.p + toff[b], tlen[b]);
        tokbytes.n += tlen[a] + tlen[b];
        int is_new;
        uint64_t *slot = strmap_insert(&tokmap, tokbytes.p + cat, tlen[a] + tlen[b], &is_new);
        if (!slot) goto oom_t;
        if (is_new) {
            id = n_ids++;
            *slot = (uint64_t)id;
            toff[id] = (uint32_t)cat;
            tlen[id] = tlen[a] + tlen[b];
        } else {
            id = (int32_t)*slot;
            tokbytes.n = cat;
        }
        merges[2 * n_merges] = a;
        merges[2 * n_merges + 1] = b;
        n_merges++;
        step++;
        ntouched = 0;
        // rewrite every word holding (a, b): take its pairs out, merge, put its pairs back
        for (uint32_t k = 0; k < pt.p[pi].nw; k++) {
            int32_t wi = pt.p[pi].w[k];
            if (stamp[wi] == step) continue;
            stamp[wi] = step;
            int32_t *ws = sym + woff[wi];
            uint32_t L = wlen[wi], j;
            for (j = 0; j + 1 < L; j++)
                if (ws[j] == a && ws[j + 1] == b) break;
            if (j + 1 >= L) continue;  // the pair left this word in an earlier merge
            for (j = 0; j + 1 < L; j++) pt.p[ptab_get(&pt, ws[j], ws[j + 1], 0)].count -= wcnt[wi];
            uint32_t o = 0;
            for (j = 0; j < L;) {
                if (j + 1 < L && ws[j] == a && ws[j + 1] == b) {
                    ws[o++] = id;
                    j += 2;
                } else ws[o++] = ws[j++];
            }
            wlen[wi] = L = o;
            for (j = 0; j + 1 < L; j++) {
                int32_t p = ptab_get(&pt, ws[j], ws[j + 1], 1);
                if (p < 0) goto oom_t;
                pt.p[p].count += wcnt[wi];
                if (ws[j] == id || ws[j + 1] == id) {
                    if (pair_add_word(&pt.p[p], wi)) goto oom_t;
                    if (ntouched == captouched) {
                        captouched = captouched ? captouched * 2 : 1024;
                        int32_t *nt = realloc(touched, captouched * sizeof *nt);
                        if (!nt) goto oom_t;
                        touched = nt;
                    }
                    touched[ntouched++] = p;
                }
            }
        }
        pi = ptab_get(&pt, a, b, 0);  // the table may have grown
        free(pt.p[pi].w);
        pt.p[pi].w = NULL;
        pt.p[pi].nw = pt.p[pi].capw = 0;
        // the pairs the new token formed: queue each once with its final count
        for (size_t k = 0; k < ntouched; k++) {
            Pair *p = &pt.p[touched[k]];
            int32_t other = p->a == id ? p->b : p->a;
            if (pushed[other] == step * 2 + (p->a == id)) continue;
            pushed[other] = step * 2 + (p->a == id);
            if (p->count > 0 && heap_push(&heap, (Cand){p->count, p->a, p->b})) goto oom_t;
        }
    }
    free(touched);
    st->merges = n_merges;
    st->vocab_size = n_ids;
    st->seconds_merge = now_s() - t1;
    rc = write_outputs(out_json, &tokbytes, toff, tlen, n_ids, merges, n_merges, err);
    goto done;
oom_t:
    free(touched);
oom:
    err_set(err, "out of memory");
done:
    pretok_free(&pre);
    strmap_free(&words);
    strmap_free(&tokmap);
    for (size_t p = 0; p < pt.n; p++) free(pt.p[p].w);
    free(pt.p);
    free(pt.key);
    free(pt.idx);
    free(heap.v);
    bb_free(&repaired);
    bb_free(&tokbytes);
    free(toff);
    free(tlen);
    free(sym);
    free(merges);
    free(stamp);
    free(pushed);
    free(woff);
    free(wlen);
    free(wcnt);
    return rc;
}
