// safetensors files, read through mmap and validated before a byte of tensor data is touched;
// a model directory is one model.safetensors or shards listed by model.safetensors.index.json.
#ifndef DSV3_BASE_SAFETENSORS_H
#define DSV3_BASE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base/dtype.h"
#include "base/error.h"

#define ST_MAX_DIMS 8

typedef struct StTensor {
    char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;  // points into the mapping
    size_t nbytes;
    const char *file;  // the file it lives in (for error messages)
} StTensor;

typedef struct StFile {
    char *path;
    void *map;
    size_t map_size;
    int mapped;         // 1: map is the file mmapped (ST_MAP), 0: read into memory of its own (ST_READ)
    int n;
    StTensor *tensors;  // sorted by name
} StFile;

// How st_open brings a file into memory. ST_MAP (the default): mmap it; pages come from the page
// cache on demand and are shared with other processes. ST_READ: read it whole into private
// anonymous memory, on transparent huge pages where the kernel gives them: a full read at open
// and memory of its own, but weights then stream faster (decode reads every active weight once
// per token, and 4 KiB page-cache pages cost it ~10%; a mapped file read afresh into the page
// cache gets 2 MB pages where the kernel gives them — see atomic_commit in base/file.h).
// Process-wide; set it before opening.
typedef enum { ST_MAP, ST_READ } StLoadMode;
void st_set_load_mode(StLoadMode mode);

// Returns 0, or -1 with err filled: "model-00002-of-00002.safetensors: tensor X: data offsets
// [a, b) run past the end of the data (c bytes)".
int st_open(StFile *f, const char *path, Error *err);
void st_close(StFile *f);
const StTensor *st_find(const StFile *f, const char *name);

// A model directory: every tensor of every shard, searchable by name.
typedef struct StModel {
    char *dir;
    int nfiles;
    StFile *files;
    size_t mapped_bytes;
} StModel;

int st_model_open(StModel *m, const char *dir, Error *err);
// The whole pages of [p, p + n) — data of one of m's files — given back to the page cache, where
// the file is mmapped: a later read maps them again from there (the model keeps a copy of its own
// of those bytes, the weight panels, and reads these rarely or never). Nothing for files read
// into memory (their pages would be lost) or addresses outside the files.
void st_model_release(const StModel *m, const void *p, size_t n);
void st_model_close(StModel *m);
// The resident bytes of m's files (*resident) and, returned, how many of them are mapped 2 MB at a
// time (bigmem_huge_bytes); -1 where that cannot be read.
long long st_model_huge_bytes(const StModel *m, long long *resident);
const StTensor *st_model_find(const StModel *m, const char *name);

// Writing: describe the tensors, then st_write lays out the header and data and renames the file
// into place only when all of it is written.
typedef struct StTensorDesc {
    const char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;  // nbytes = product(shape) * dtype_size; NULL: produced by a StFill
} StTensorDesc;

// Produces the bytes of tensor i (of the list given to st_write_model_fill) into buf, which holds
// its product(shape) * dtype_size bytes. Returns 0, or -1 with err filled.
typedef int (*StFill)(void *ctx, int i, void *buf, Error *err);

int st_write(const char *path, const StTensorDesc *tensors, int n, Error *err);
// Writes shards of at most max_shard_bytes each plus model.safetensors.index.json into dir (a
// single model.safetensors when everything fits).
int st_write_model(const char *dir, const StTensorDesc *tensors, int n, size_t max_shard_bytes,
                   Error *err);
// The same, each tensor whose data is NULL produced by fill just before it is written, in order,
// into one buffer reused from tensor to tensor: a converter streams a model through the memory of
// its largest tensor.
int st_write_model_fill(const char *dir, const StTensorDesc *tensors, int n, size_t max_shard_bytes, StFill fill,
                        void *ctx, Error *err);

int64_t st_numel(const int64_t *shape, int ndim);

#endif
