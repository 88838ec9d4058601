#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/bigmem.h"
#include "base/file.h"
#include "base/safetensors.h"

// A header larger than this is not a model header but a corrupt length field.
#define ST_MAX_HEADER (100u << 20)

int64_t st_numel(const int64_t *shape, int ndim) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

static int tensor_cmp(const void *a, const void *b) {
    return strcmp(((const StTensor *)a)->name, ((const StTensor *)b)->name);
}

typedef struct { size_t begin, end; const char *name; } Span;

static int span_cmp(const void *a, const void *b) {
    const Span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

// Parses one header entry into t; data_len is the size of the data section.
static int parse_entry(const char *path, const char *name, json_t *v, const uint8_t *data,
                       size_t data_len, StTensor *t, Error *err) {
    if (!json_is_object(v)) return err_set(err, "%s: tensor %s: header entry is not an object", path, name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd)) return err_set(err, "%s: tensor %s: missing dtype", path, name);
    int dt = dtype_from_name(json_string_value(jd));
    if (dt < 0) return err_set(err, "%s: tensor %s: unsupported dtype %s", path, name, json_string_value(jd));
    if (!json_is_array(js) || json_array_size(js) > ST_MAX_DIMS)
        return err_set(err, "%s: tensor %s: shape is not an array of at most %d dimensions", path, name, ST_MAX_DIMS);
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return err_set(err, "%s: tensor %s: data_offsets is not [begin, end]", path, name);
    t->dtype = (DType)dt;
    t->ndim = (int)json_array_size(js);
    int64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0 || json_integer_value(d) > ((int64_t)1 << 40))
            return err_set(err, "%s: tensor %s: shape[%d] is not a valid size", path, name, i);
        t->shape[i] = json_integer_value(d);
        numel *= t->shape[i];
        if (numel > ((int64_t)1 << 42)) return err_set(err, "%s: tensor %s: shape is too large", path, name);
    }
    json_int_t b = json_integer_value(json_array_get(jo, 0)), e = json_integer_value(json_array_get(jo, 1));
    if (b < 0 || e < b) return err_set(err, "%s: tensor %s: data_offsets [%lld, %lld) are invalid", path, name, (long long)b, (long long)e);
    if ((size_t)e > data_len)
        return err_set(err, "%s: tensor %s: data offsets [%lld, %lld) run past the end of the data (%zu bytes)",
                       path, name, (long long)b, (long long)e, data_len);
    size_t want = (size_t)numel * dtype_size(t->dtype);
    if ((size_t)(e - b) != want)
        return err_set(err, "%s: tensor %s: data_offsets span %lld bytes but %s%s needs %zu", path, name,
                       (long long)(e - b), dtype_name(t->dtype), " of its shape", want);
    t->data = data + b;
    t->nbytes = want;
    return 0;
}

static StLoadMode load_mode = ST_MAP;

void st_set_load_mode(StLoadMode mode) { load_mode = mode; }

// The whole of fd (size bytes) in private anonymous memory, read-only once filled.
static void *read_whole(int fd, const char *path, size_t size, Error *err) {
    void *p = bigmem_alloc(size, "reading it into memory", err);
    if (!p) {
        err_prefix(err, "%s", path);
        return NULL;
    }
    for (size_t got = 0; got < size;) {
        ssize_t r = pread(fd, (char *)p + got, size - got, (off_t)got);
        if (r <= 0) {
            err_set(err, "%s: read failed at byte %zu of %zu: %s", path, got, size, r < 0 ? strerror(errno) : "end of file");
            bigmem_free(p, size);
            return NULL;
        }
        got += (size_t)r;
    }
    mprotect(p, size, PROT_READ);
    return p;
}

int st_open(StFile *f, const char *path, Error *err) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return err_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return err_set(err, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        close(fd);
        return err_set(err, "%s: file is %zu bytes, too short for a safetensors header", path, size);
    }
    void *map;
    if (load_mode == ST_READ) {
        map = read_whole(fd, path, size, err);
        close(fd);
        if (!map) return -1;
    } else {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        close(fd);
        if (map == MAP_FAILED) return err_set(err, "%s: mmap failed: %s", path, strerror(errno));
        // Advice: the pages this process is first to read come into the page cache as 2 MB folios
        // and are mapped 2 MB at a time (see atomic_commit) — on 4 KB pages, v3-deep's FP8 decode
        // ran 12% slower (its block scales read from the mapping every step; with --compute f32,
        // every weight).
        madvise(map, size, MADV_HUGEPAGE);
    }
    f->map = map;
    f->map_size = size;
    f->mapped = load_mode != ST_READ;
    f->path = strdup(path);
    const uint8_t *p = map;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)p[i] << (8 * i);
    if (hlen > ST_MAX_HEADER || hlen > size - 8) {
        err_set(err, "%s: header length %llu exceeds the file (%zu bytes)", path, (unsigned long long)hlen, size);
        goto fail;
    }
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, hlen, 0, &je);
    if (!root || !json_is_object(root)) {
        err_set(err, "%s: header is not a JSON object: %s", path, root ? "wrong type" : je.text);
        json_decref(root);
        goto fail;
    }
    const uint8_t *data = p + 8 + hlen;
    size_t data_len = size - 8 - hlen;
    size_t n = json_object_size(root);
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    Span *spans = calloc(n ? n : 1, sizeof *spans);
    if (!f->tensors || !spans) {
        free(spans);
        json_decref(root);
        err_set(err, "%s: out of memory", path);
        goto fail;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) continue;
        StTensor *t = &f->tensors[f->n];
        if (parse_entry(path, key, v, data, data_len, t, err)) {
            free(spans);
            json_decref(root);
            goto fail;
        }
        t->name = strdup(key);
        t->file = f->path;
        spans[f->n] = (Span){(size_t)((const uint8_t *)t->data - data), (size_t)((const uint8_t *)t->data - data) + t->nbytes, t->name};
        f->n++;
    }
    json_decref(root);
    qsort(spans, f->n, sizeof *spans, span_cmp);
    for (int i = 1; i < f->n; i++) {
        if (spans[i].begin < spans[i - 1].end) {
            err_set(err, "%s: tensor %s: data overlaps tensor %s", path, spans[i].name, spans[i - 1].name);
            free(spans);
            goto fail;
        }
    }
    free(spans);
    qsort(f->tensors, f->n, sizeof *f->tensors, tensor_cmp);
    return 0;
fail:
    st_close(f);
    return -1;
}

void st_close(StFile *f) {
    if (f->tensors)
        for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
    free(f->tensors);
    if (f->map) munmap(f->map, f->map_size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const StTensor *st_find(const StFile *f, const char *name) {
    StTensor key = {.name = (char *)name};
    return bsearch(&key, f->tensors, f->n, sizeof *f->tensors, tensor_cmp);
}

static int model_add_file(StModel *m, const char *path, Error *err) {
    StFile *nf = realloc(m->files, (m->nfiles + 1) * sizeof *nf);
    if (!nf) return err_set(err, "%s: out of memory", path);
    m->files = nf;
    if (st_open(&m->files[m->nfiles], path, err)) return -1;
    m->mapped_bytes += m->files[m->nfiles].map_size;
    m->nfiles++;
    return 0;
}

int st_model_open(StModel *m, const char *dir, Error *err) {
    memset(m, 0, sizeof *m);
    if (!path_is_dir(dir)) return err_set(err, "%s: model directory does not exist", dir);
    m->dir = strdup(dir);
    char path[4096];
    if (path_join(path, sizeof path, dir, "model.safetensors.index.json", err)) return -1;
    if (!path_exists(path)) {
        if (path_join(path, sizeof path, dir, "model.safetensors", err)) return -1;
        if (!path_exists(path))
            return err_set(err, "%s: no model.safetensors or model.safetensors.index.json", dir);
        if (model_add_file(m, path, err)) goto fail;
        return 0;
    }
    json_t *root = file_read_json(path, 0, err);
    if (!root) goto fail;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        err_set(err, "%s: weight_map: missing or not an object", path);
        json_decref(root);
        goto fail;
    }
    const char *key;
    json_t *v;
    // open each shard once, in order of first mention
    json_object_foreach(wm, key, v) {
        if (!json_is_string(v)) {
            err_set(err, "%s: weight_map.%s: not a file name", path, key);
            json_decref(root);
            goto fail;
        }
        const char *fname = json_string_value(v);
        if (strchr(fname, '/') || strcmp(fname, "..") == 0) {
            err_set(err, "%s: weight_map.%s: file name %s is not inside the model directory", path, key, fname);
            json_decref(root);
            goto fail;
        }
        char shard[4096];
        if (path_join(shard, sizeof shard, dir, fname, err)) {
            json_decref(root);
            goto fail;
        }
        int seen = 0;
        for (int i = 0; i < m->nfiles && !seen; i++) seen = strcmp(m->files[i].path, shard) == 0;
        if (!seen && model_add_file(m, shard, err)) {
            json_decref(root);
            goto fail;
        }
        const StFile *sf = NULL;
        for (int i = 0; i < m->nfiles; i++)
            if (strcmp(m->files[i].path, shard) == 0) sf = &m->files[i];
        if (!st_find(sf, key)) {
            err_set(err, "%s: tensor %s: listed in %s but not in the shard", shard, key, path);
            json_decref(root);
            goto fail;
        }
    }
    json_decref(root);
    return 0;
fail:
    st_model_close(m);
    return -1;
}

void st_model_release(const StModel *m, const void *p, size_t n) {
    const char *a = p;
    for (int i = 0; i < m->nfiles; i++) {
        const StFile *f = &m->files[i];
        const char *lo = f->map, *hi = lo + f->map_size;
        if (!f->mapped || a < lo || a + n > hi) continue;
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), b = ((uintptr_t)a + page - 1) & ~(page - 1),
                  e = ((uintptr_t)a + n) & ~(page - 1);
        if (e > b) madvise((void *)b, e - b, MADV_DONTNEED);  // (advice: a failure leaves them resident)
        return;
    }
}

long long st_model_huge_bytes(const StModel *m, long long *resident) {
    const void *maps[m->nfiles > 0 ? m->nfiles : 1];
    for (int i = 0; i < m->nfiles; i++) maps[i] = m->files[i].map;
    return bigmem_huge_bytes(maps, m->nfiles, resident);
}

void st_model_close(StModel *m) {
    for (int i = 0; i < m->nfiles; i++) st_close(&m->files[i]);
    free(m->files);
    free(m->dir);
    memset(m, 0, sizeof *m);
}

const StTensor *st_model_find(const StModel *m, const char *name) {
    for (int i = 0; i < m->nfiles; i++) {
        const StTensor *t = st_find(&m->files[i], name);
        if (t) return t;
    }
    return NULL;
}

static size_t desc_bytes(const StTensorDesc *d) {
    return (size_t)st_numel(d->shape, d->ndim) * dtype_size(d->dtype);
}

// Writes tensors[0..n) into path; a tensor without data is produced by fill(ctx, base + i, ...)
// into one buffer reused from tensor to tensor.
static int write_file(const char *path, const StTensorDesc *tensors, int n, StFill fill, void *ctx, int base,
                      Error *err) {
    json_t *root = json_object();
    json_object_set_new(root, "__metadata__", json_pack("{s:s}", "format", "pt"));
    size_t off = 0, biggest = 0;
    for (int i = 0; i < n; i++) {
        json_t *shape = json_array();
        for (int d = 0; d < tensors[i].ndim; d++) json_array_append_new(shape, json_integer(tensors[i].shape[d]));
        size_t nb = desc_bytes(&tensors[i]);
        json_object_set_new(root, tensors[i].name,
                            json_pack("{s:s,s:o,s:[I,I]}", "dtype", dtype_name(tensors[i].dtype), "shape", shape,
                                      "data_offsets", (json_int_t)off, (json_int_t)(off + nb)));
        off += nb;
        if (!tensors[i].data && nb > biggest) biggest = nb;
    }
    char *hdr = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!hdr) return err_set(err, "%s: cannot encode header", path);
    if (biggest && !fill) {
        free(hdr);
        return err_set(err, "%s: a tensor has no data", path);
    }
    void *buf = biggest ? xmalloc(err, biggest, path) : NULL;
    if (biggest && !buf) {
        free(hdr);
        return -1;
    }
    size_t hlen = strlen(hdr);
    size_t padded = (hlen + 7) & ~(size_t)7;  // keep the data 8-byte aligned
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    AtomicFile af;
    if (atomic_open(&af, path, err)) {
        free(hdr);
        free(buf);
        return -1;
    }
    af.drop_cache = 1;  // (read back through mmap: 2 MB pages, see atomic_commit)
    static const char spaces[8] = "        ";
    int rc = atomic_write(&af, lenb, 8, err) || atomic_write(&af, hdr, hlen, err) ||
             atomic_write(&af, spaces, padded - hlen, err);
    free(hdr);
    for (int i = 0; i < n && !rc; i++) {
        const void *data = tensors[i].data;
        if (!data) {
            rc = fill(ctx, base + i, buf, err);
            data = buf;
        }
        rc = rc || atomic_write(&af, data, desc_bytes(&tensors[i]), err);
    }
    free(buf);
    if (rc) {
        atomic_abort(&af);
        return -1;
    }
    return atomic_commit(&af, err);
}

int st_write(const char *path, const StTensorDesc *tensors, int n, Error *err) {
    return write_file(path, tensors, n, NULL, NULL, 0, err);
}

int st_write_model(const char *dir, const StTensorDesc *tensors, int n, size_t max_shard_bytes, Error *err) {
    return st_write_model_fill(dir, tensors, n, max_shard_bytes, NULL, NULL, err);
}

// After a model of *nshards shards (0: one model.safetensors) is written, whether a file of its
// directory is a weight file of an earlier model there that it did not overwrite: model.safetensors
// beside shards, an index and shards beside one file, shards of another count. Left there, an old
// index would be read instead of the new file (st_model_open prefers it). Other files stay.
static int stale_weights(const char *name, void *nshards) {
    int k, of, end = 0, n = *(const int *)nshards;
    if (strlen(name) == 32 &&  // exactly the names written below: model-00001-of-00003.safetensors
        sscanf(name, "model-%5d-of-%5d.safetensors%n", &k, &of, &end) == 2 && name[end] == 0)
        return of != n;
    return n ? !strcmp(name, "model.safetensors") : !strcmp(name, "model.safetensors.index.json");
}

int st_write_model_fill(const char *dir, const StTensorDesc *tensors, int n, size_t max_shard_bytes, StFill fill,
                        void *ctx, Error *err) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += desc_bytes(&tensors[i]);
    char path[4096];
    if (total <= max_shard_bytes) {
        if (path_join(path, sizeof path, dir, "model.safetensors", err)) return -1;
        int single = 0;
        return write_file(path, tensors, n, fill, ctx, 0, err) || dir_remove_files(dir, stale_weights, &single, err) ? -1 : 0;
    }
    // count shards first: names carry the total ("model-00001-of-00003.safetensors")
    int nshards = 0;
    for (int i = 0; i < n;) {
        size_t sz = 0;
        int j = i;
        while (j < n && (j == i || sz + desc_bytes(&tensors[j]) <= max_shard_bytes)) sz += desc_bytes(&tensors[j++]);
        nshards++;
        i = j;
    }
    json_t *wm = json_object();
    int shard = 0;
    for (int i = 0; i < n;) {
        size_t sz = 0;
        int j = i;
        while (j < n && (j == i || sz + desc_bytes(&tensors[j]) <= max_shard_bytes)) sz += desc_bytes(&tensors[j++]);
        char fname[64];
        snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", ++shard, nshards);
        if (path_join(path, sizeof path, dir, fname, err) || write_file(path, tensors + i, j - i, fill, ctx, i, err)) {
            json_decref(wm);
            return -1;
        }
        for (int k = i; k < j; k++) json_object_set_new(wm, tensors[k].name, json_string(fname));
        i = j;
    }
    json_t *root = json_pack("{s:{s:I},s:o}", "metadata", "total_size", (json_int_t)total, "weight_map", wm);
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(root);
    if (!s) return err_set(err, "%s: cannot encode index", dir);
    int rc = path_join(path, sizeof path, dir, "model.safetensors.index.json", err) ||
             file_write_all(path, s, strlen(s), err) || dir_remove_files(dir, stale_weights, &nshards, err);
    free(s);
    return rc ? -1 : 0;
}
