// File helpers. Outputs are written to "path.tmp" and renamed into place only when complete, so a
// failed run never leaves a half-written file under the real name.
#ifndef DSV3_BASE_FILE_H
#define DSV3_BASE_FILE_H

#include <stdio.h>
#include <stddef.h>

#include "base/error.h"

typedef struct AtomicFile {
    FILE *f;
    char path[4096];
    char tmp[4100];
    int drop_cache;  // set after atomic_open for a file read back through mmap (weights): see atomic_commit
} AtomicFile;

int atomic_open(AtomicFile *af, const char *path, Error *err);
int atomic_write(AtomicFile *af, const void *data, size_t n, Error *err);
// Flushes, syncs to disk (so that after a crash the name holds the old file or all of the new
// one), closes and renames into place. With drop_cache the file's pages are then dropped from the
// page cache: the writes left them there as small folios, mapped 4 KB at a time, while a file read
// afresh comes in as 2 MB folios where the kernel gives them (ext4 on the Linux 6.18 here) and is
// mapped 2 MB at a time — FP8 decode of bench/configs/v3-deep.json streaming its mmapped weights
// 12.7% faster (10 of 10 rounds taking turns; BF16 +1%). On failure the temporary file is removed.
int atomic_commit(AtomicFile *af, Error *err);
// Closes and removes the temporary file (safe to call on an already committed/aborted file).
void atomic_abort(AtomicFile *af);

// Writes a whole buffer atomically.
int file_write_all(const char *path, const void *data, size_t n, Error *err);
// Reads a whole file into a NUL-terminated malloc'd buffer; *len gets its length (without NUL).
char *file_read_all(const char *path, size_t *len, Error *err);
// Reads a whole file as JSON (jansson's decoding flags): NULL with "PATH: cannot open: REASON",
// "PATH: is a directory, not a JSON file" or "PATH: line N: invalid JSON: ..." in err.
struct json_t *file_read_json(const char *path, size_t flags, Error *err);
// Copies a whole file (written atomically, like file_write_all).
int file_copy(const char *from, const char *to, Error *err);
// Copies from_dir/name to to_dir/name when it exists (nothing to do is not an error).
int file_copy_if_exists(const char *from_dir, const char *to_dir, const char *name, Error *err);
int path_is_dir(const char *path);
// 1 when dir is a directory holding no entries.
int dir_is_empty(const char *dir);
// Removes the files of dir whose names doomed(name, ctx) says yes to; the others stay.
int dir_remove_files(const char *dir, int (*doomed)(const char *name, void *ctx), void *ctx, Error *err);
// Removes a file or a whole directory tree, like rm -rf (a missing path is not an error).
void path_remove_tree(const char *path);
int path_exists(const char *path);
// Creates a directory and its parents (like mkdir -p).
int make_dirs(const char *path, Error *err);
// Joins dir and name into out (size n); returns -1 with err when it does not fit.
int path_join(char *out, size_t n, const char *dir, const char *name, Error *err);

#endif
