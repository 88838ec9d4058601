#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/file.h"
#include "base/rng.h"
#include "text/tokenizer.h"
#include "train/data.h"

// ---- prepare ----

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const unsigned char *p) { return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }

static int write_shard(const char *path, const int *ids, size_t n, int vocab, Error *err) {
    unsigned char head[DATA_HEADER_BYTES] = {0};
    memcpy(head, DATA_MAGIC, 8);
    put_u32(head + 8, DATA_VERSION);
    put_u32(head + 12, DATA_HEADER_BYTES);
    put_u64(head + 16, n);
    put_u32(head + 24, (uint32_t)vocab);
    AtomicFile af;
    if (atomic_open(&af, path, err)) return -1;
    if (atomic_write(&af, head, sizeof head, err)) return atomic_abort(&af), -1;
    unsigned char buf[4096];
    for (size_t i = 0; i < n;) {
        size_t k = 0;
        for (; k < sizeof buf / 4 && i < n; k++, i++) put_u32(buf + 4 * k, (uint32_t)ids[i]);
        if (atomic_write(&af, buf, 4 * k, err)) return atomic_abort(&af), -1;
    }
    return atomic_commit(&af, err);
}

// Writes a split's shards and returns their names as a JSON array.
static json_t *write_split(const char *dir, const char *split, const int *ids, size_t n, size_t shard_tokens,
                           int vocab, Error *err) {
    json_t *names = json_array();
    size_t nshards = n == 0 ? 0 : (n + shard_tokens - 1) / shard_tokens;
    for (size_t s = 0; s < nshards; s++) {
        char name[64], path[4096];
        snprintf(name, sizeof name, "%s-%05zu.bin", split, s);
        size_t b = s * shard_tokens, e = b + shard_tokens < n ? b + shard_tokens : n;
        if (path_join(path, sizeof path, dir, name, err) || write_shard(path, ids + b, e - b, vocab, err)) {
            json_decref(names);
            return NULL;
        }
        json_array_append_new(names, json_string(name));
    }
    return names;
}

// After the splits of counts[0] training and counts[1] validation shards are written, whether a file
// of the directory is a shard of an earlier preparation beyond them (train-00009.bin after a shorter
// corpus): data.json no longer lists it, so it is only disk used. Other files stay.
static int stale_shard(const char *name, void *counts) {
    const size_t *n = counts;
    size_t k, len = strlen(name);
    int end = 0;
    if (len == 15 && sscanf(name, "train-%5zu.bin%n", &k, &end) == 1 && end == 15) return k >= n[0];
    if (len == 13 && sscanf(name, "val-%5zu.bin%n", &k, &end) == 1 && end == 13) return k >= n[1];
    return 0;
}

int data_prepare(const PrepareOptions *o, PrepareStats *stats, Error *err) {
    memset(stats, 0, sizeof *stats);
    if (o->n_files < 1) return err_set(err, "no input files");
    if (!(o->val_fraction >= 0 && o->val_fraction < 1))
        return err_set(err, "--val-fraction: %g is not in [0, 1)", o->val_fraction);
    if (o->shard_tokens < 1) return err_set(err, "--shard-tokens: must be positive");
    int bytes = strcmp(o->tokenizer, "bytes") == 0, bos = 0, eos = 1, vocab = DATA_BYTES_VOCAB, rc = -1;
    Tokenizer *tok = NULL;
    char tok_json[4096] = "", tok_cfg[4096] = "";
    if (!bytes) {
        if (path_is_dir(o->tokenizer)) {
            if (path_join(tok_json, sizeof tok_json, o->tokenizer, "tokenizer.json", err)) return -1;
        } else {
            snprintf(tok_json, sizeof tok_json, "%s", o->tokenizer);
        }
        tok = tok_load(tok_json, err);
        if (!tok) return -1;
        bos = tok_bos_id(tok);
        eos = tok_eos_id(tok);
        vocab = tok_vocab_size(tok);
        if (bos < 0) {
            tok_free(tok);
            return err_set(err, "%s: the tokenizer has no bos_token (documents must start with BOS)", tok_json);
        }
        // tokenizer_config.json sits beside tokenizer.json
        const char *slash = strrchr(tok_json, '/');
        int dirlen = slash ? (int)(slash - tok_json) : 1;
        snprintf(tok_cfg, sizeof tok_cfg, "%.*s/tokenizer_config.json", dirlen, slash ? tok_json : ".");
    }
    TokIds ids = {0};
    size_t *doc_start = xcalloc(err, o->n_files + 1, sizeof *doc_start, "document list");
    json_t *meta = NULL;
    if (!doc_start) goto done;
    for (int f = 0; f < o->n_files; f++) {
        size_t len;
        char *text = file_read_all(o->files[f], &len, err);
        if (!text) goto done;
        doc_start[f] = ids.n;
        int bad = ids_push(&ids, bos);
        if (bytes) {
            for (size_t i = 0; i < len && !bad; i++) bad = ids_push(&ids, (unsigned char)text[i] + DATA_BYTES_OFFSET);
        } else if (!bad && tok_encode(tok, text, len, 0, &ids, err)) {
            free(text);
            err_prefix(err, "%s", o->files[f]);
            goto done;
        }
        if (!bad && eos >= 0) bad = ids_push(&ids, eos);
        free(text);
        if (bad) {
            err_set(err, "%s: out of memory", o->files[f]);
            goto done;
        }
    }
    doc_start[o->n_files] = ids.n;
    // the split: whole documents from the end while they fit the validation share; a single
    // document gives the tail of itself, restarted with BOS
    size_t want_val = (size_t)(o->val_fraction * ids.n + 0.5), cut = ids.n;
    for (int f = o->n_files - 1; f > 0 && ids.n - doc_start[f] <= want_val; f--) cut = doc_start[f];
    int *val = ids.v + cut;
    size_t nval = ids.n - cut, ntrain = cut;
    int *tail = NULL;
    if (want_val > 0 && nval == 0) {
        ntrain = ids.n - want_val;
        tail = xmalloc(err, sizeof(int) * (want_val + 1), "validation tokens");
        if (!tail) goto done;
        tail[0] = bos;
        memcpy(tail + 1, ids.v + ntrain, sizeof(int) * want_val);
        val = tail;
        nval = want_val + 1;
    }
    if (make_dirs(o->out, err)) goto done_tail;
    json_t *tr = write_split(o->out, "train", ids.v, ntrain, o->shard_tokens, vocab, err);
    json_t *va = tr ? write_split(o->out, "val", val, nval, o->shard_tokens, vocab, err) : NULL;
    if (!tr || !va) {
        json_decref(tr);
        goto done_tail;
    }
    meta = json_pack("{s:s, s:i, s:s, s:i, s:i, s:i, s:i, s:{s:I, s:o}, s:{s:I, s:o}}", "format", "dsv3-tokens",
                     "version", DATA_VERSION, "tokenizer", bytes ? "bytes" : "tokenizer.json", "vocab_size", vocab,
                     "bos_token_id", bos, "eos_token_id", eos, "documents", o->n_files, "train", "tokens",
                     (json_int_t)ntrain, "shards", tr, "val", "tokens", (json_int_t)nval, "shards", va);
    char path[4096];
    if (!bytes) {
        if (path_join(path, sizeof path, o->out, "tokenizer.json", err) || file_copy(tok_json, path, err)) goto done_tail;
        if (path_exists(tok_cfg) && (path_join(path, sizeof path, o->out, "tokenizer_config.json", err) ||
                                     file_copy(tok_cfg, path, err)))
            goto done_tail;
    }
    char *js = json_dumps(meta, JSON_INDENT(2));
    if (!js || path_join(path, sizeof path, o->out, "data.json", err) || file_write_all(path, js, strlen(js), err)) {
        free(js);
        goto done_tail;
    }
    free(js);
    size_t counts[2] = {json_array_size(tr), json_array_size(va)};
    if (dir_remove_files(o->out, stale_shard, counts, err)) goto done_tail;
    stats->train_tokens = (long long)ntrain;
    stats->val_tokens = (long long)nval;
    stats->documents = o->n_files;
    stats->vocab_size = vocab;
    rc = 0;
done_tail:
    free(tail);
done:
    json_decref(meta);
    free(doc_start);
    ids_free(&ids);
    tok_free(tok);
    return rc;
}

// Reads DIR/data.json; path gets its name for messages.
static json_t *load_meta(const char *dir, char *path, size_t n, Error *err) {
    if (path_join(path, n, dir, "data.json", err)) return NULL;
    if (!path_exists(path)) {
        err_set(err, "%s: missing (make the data with dsv3 prepare)", path);
        return NULL;
    }
    return file_read_json(path, 0, err);
}

int data_split_tokens(const char *dir, const char *split, long long *n, Error *err) {
    char path[4096];
    json_t *meta = load_meta(dir, path, sizeof path, err);
    if (!meta) return -1;
    json_t *v = json_object_get(json_object_get(meta, split), "tokens");
    int rc = json_is_integer(v) ? 0 : err_set(err, "%s: %s.tokens: missing", path, split);
    if (!rc) *n = json_integer_value(v);
    json_decref(meta);
    return rc;
}

// ---- loader ----

static int map_shard(struct DataShard *s, int vocab_limit, Error *err) {
    int fd = open(s->path, O_RDONLY);
    if (fd < 0) return err_set(err, "%s: cannot open", s->path);
    struct stat st;
    if (fstat(fd, &st) || st.st_size < DATA_HEADER_BYTES) {
        close(fd);
        return err_set(err, "%s: shorter than the %d-byte header", s->path, DATA_HEADER_BYTES);
    }
    s->map_bytes = (size_t)st.st_size;
    s->map = mmap(NULL, s->map_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (s->map == MAP_FAILED) {
        s->map = NULL;
        return err_set(err, "%s: cannot map", s->path);
    }
    const unsigned char *h = s->map;
    if (memcmp(h, DATA_MAGIC, 8) != 0) return err_set(err, "%s: not a token shard (bad magic)", s->path);
    if (get_u32(h + 8) != DATA_VERSION)
        return err_set(err, "%s: version %u (this build reads %d)", s->path, get_u32(h + 8), DATA_VERSION);
    uint32_t hb = get_u32(h + 12);
    s->count = get_u64(h + 16);
    if (hb < DATA_HEADER_BYTES || hb % 4 || hb > s->map_bytes || (s->map_bytes - hb) / 4 != s->count ||
        (s->map_bytes - hb) % 4)
        return err_set(err, "%s: header says %llu tokens, the file holds %zu bytes after a %u-byte header", s->path,
                       (unsigned long long)s->count, s->map_bytes > hb ? s->map_bytes - hb : 0, hb);
    s->tokens = (const uint32_t *)(h + hb);
    uint64_t bad = UINT64_MAX;
    for (uint64_t i = 0; i < s->count; i++)
        if (s->tokens[i] >= (uint32_t)vocab_limit) {
            bad = i;
            break;
        }
    if (bad != UINT64_MAX)
        return err_set(err, "%s: token %u at position %llu is outside the model's vocabulary of %d", s->path,
                       s->tokens[bad], (unsigned long long)bad, vocab_limit);
    return 0;
}

static void new_epoch_order(DataLoader *l) {
    for (long i = 0; i < l->n_windows; i++) l->perm[i] = i;
    if (!l->shuffle) return;
    Rng r;  // the order of epoch e depends only on (seed, e)
    rng_seed(&r, l->seed * 0x9E3779B97F4A7C15ULL + (uint64_t)l->epoch + 1);
    for (long i = l->n_windows - 1; i > 0; i--) {
        long j = (long)(rng_next(&r) % (uint64_t)(i + 1)), t = l->perm[i];
        l->perm[i] = l->perm[j];
        l->perm[j] = t;
    }
}

int loader_open(DataLoader *l, const char *dir, const char *split, int T, uint64_t seed, int shuffle,
                int vocab_limit, Error *err) {
    memset(l, 0, sizeof *l);
    char path[4096];
    json_t *meta = load_meta(dir, path, sizeof path, err);
    if (!meta) return -1;
    json_t *shards = json_object_get(json_object_get(meta, split), "shards");
    if (!json_is_array(shards)) {
        json_decref(meta);
        return err_set(err, "%s: %s.shards: missing", path, split);
    }
    l->nshards = (int)json_array_size(shards);
    l->shards = xcalloc(err, l->nshards > 0 ? l->nshards : 1, sizeof *l->shards, "shard list");
    if (!l->shards) {
        json_decref(meta);
        return -1;
    }
    for (int i = 0; i < l->nshards; i++) {
        const char *name = json_string_value(json_array_get(shards, i));
        if (!name || strchr(name, '/')) {
            err_set(err, "%s: %s.shards[%d]: not a file name", path, split, i);
            goto fail;
        }
        if (path_join(l->shards[i].path, sizeof l->shards[i].path, dir, name, err) ||
            map_shard(&l->shards[i], vocab_limit, err))
            goto fail;
        l->shards[i].start = l->total;
        l->total += l->shards[i].count;
    }
    json_decref(meta);
    meta = NULL;
    if (l->total < (uint64_t)T + 1) {
        err_set(err, "%s: the %s split holds %llu tokens, fewer than one window of %d", dir, split,
                (unsigned long long)l->total, T + 1);
        goto fail;
    }
    l->T = T;
    l->seed = seed;
    l->shuffle = shuffle;
    l->n_windows = (long)((l->total - 1) / (uint64_t)T);
    l->perm = xmalloc(err, sizeof(long) * l->n_windows, "window order");
    if (!l->perm) goto fail;
    new_epoch_order(l);
    return 0;
fail:
    json_decref(meta);
    loader_close(l);
    return -1;
}

void loader_close(DataLoader *l) {
    for (int i = 0; l->shards && i < l->nshards; i++)
        if (l->shards[i].map) munmap(l->shards[i].map, l->shards[i].map_bytes);
    free(l->shards);
    free(l->perm);
    memset(l, 0, sizeof *l);
}

// Tokens [start, start + n) of the split's stream, across shard boundaries.
static void read_tokens(const DataLoader *l, uint64_t start, int n, int *out) {
    int s = 0;
    while (s + 1 < l->nshards && l->shards[s + 1].start <= start) s++;
    for (int i = 0; i < n; i++) {
        uint64_t p = start + i;
        while (p >= l->shards[s].start + l->shards[s].count) s++;
        out[i] = (int)l->shards[s].tokens[p - l->shards[s].start];
    }
}

void loader_next_batch(DataLoader *l, int *out, int B) {
    for (int b = 0; b < B; b++) {
        if (l->pos == l->n_windows) {
            l->epoch++;
            l->pos = 0;
            new_epoch_order(l);
        }
        read_tokens(l, (uint64_t)l->perm[l->pos++] * l->T, l->T + 1, out + (size_t)b * (l->T + 1));
    }
}

void loader_rewind(DataLoader *l) {
    l->epoch = 0;
    l->pos = 0;
    new_epoch_order(l);
}

int loader_seek(DataLoader *l, long epoch, long pos, Error *err) {
    if (epoch < 0 || pos < 0 || pos > l->n_windows)
        return err_set(err, "data position epoch %ld, window %ld is outside the data (%ld windows per epoch)", epoch,
                       pos, l->n_windows);
    l->epoch = epoch;
    l->pos = pos;
    new_epoch_order(l);
    return 0;
}
