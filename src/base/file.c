#define _GNU_SOURCE  // nftw
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/file.h"

int atomic_open(AtomicFile *af, const char *path, Error *err) {
    memset(af, 0, sizeof *af);
    if (strlen(path) >= sizeof af->path) return err_set(err, "%s: path too long", path);
    strcpy(af->path, path);
    snprintf(af->tmp, sizeof af->tmp, "%s.tmp", path);
    af->f = fopen(af->tmp, "wb");
    if (!af->f) return err_set(err, "%s: cannot create: %s", af->tmp, strerror(errno));
    return 0;
}

int atomic_write(AtomicFile *af, const void *data, size_t n, Error *err) {
    if (n && fwrite(data, 1, n, af->f) != n)
        return err_set(err, "%s: write failed: %s", af->tmp, strerror(errno));
    return 0;
}

int atomic_commit(AtomicFile *af, Error *err) {
    if (!af->f) return err_set(err, "%s: file is not open", af->path);
    int bad = fflush(af->f) != 0 || ferror(af->f) || fdatasync(fileno(af->f)) != 0;
    if (!bad && af->drop_cache) posix_fadvise(fileno(af->f), 0, 0, POSIX_FADV_DONTNEED);  // (advice)
    bad |= fclose(af->f) != 0;
    af->f = NULL;
    if (bad) {
        int e = errno;
        unlink(af->tmp);
        return err_set(err, "%s: write failed: %s", af->tmp, strerror(e));
    }
    if (rename(af->tmp, af->path) != 0) {
        int e = errno;
        unlink(af->tmp);
        return err_set(err, "%s: cannot rename into place: %s", af->path, strerror(e));
    }
    return 0;
}

void atomic_abort(AtomicFile *af) {
    if (af->f) {
        fclose(af->f);
        af->f = NULL;
        unlink(af->tmp);
    }
}

int file_write_all(const char *path, const void *data, size_t n, Error *err) {
    AtomicFile af;
    if (atomic_open(&af, path, err)) return -1;
    if (atomic_write(&af, data, n, err)) {
        atomic_abort(&af);
        return -1;
    }
    return atomic_commit(&af, err);
}

int dir_remove_files(const char *dir, int (*doomed)(const char *name, void *ctx), void *ctx, Error *err) {
    DIR *d = opendir(dir);
    if (!d) return err_set(err, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    char path[4096];
    while (rc == 0 && (e = readdir(d)))
        if (doomed(e->d_name, ctx)) {
            if (path_join(path, sizeof path, dir, e->d_name, err)) rc = -1;
            else if (unlink(path)) rc = err_set(err, "%s: cannot remove: %s", path, strerror(errno));
        }
    closedir(d);
    return rc;
}

json_t *file_read_json(const char *path, size_t flags, Error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && S_ISDIR(sb.st_mode)) {  // (fopen opens one; reading it fails)
        fclose(f);
        err_set(err, "%s: is a directory, not a JSON file", path);
        return NULL;
    }
    json_error_t je;
    json_t *v = json_loadf(f, flags, &je);
    fclose(f);
    if (!v) err_set(err, "%s: line %d: invalid JSON: %s", path, je.line, je.text);
    return v;
}

char *file_read_all(const char *path, size_t *len, Error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        cap *= 2;
        char *nb = realloc(buf, cap + 1);
        if (!nb) free(buf);
        buf = nb;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf) {
        err_set(err, "%s: out of memory reading file", path);
        return NULL;
    }
    if (bad) {
        free(buf);
        err_set(err, "%s: read failed", path);
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

int path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int make_dirs(const char *path, Error *err) {
    char buf[4096];
    if (strlen(path) >= sizeof buf) return err_set(err, "%s: path too long", path);
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return err_set(err, "%s: cannot create directory: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return err_set(err, "%s: cannot create directory: %s", buf, strerror(errno));
    if (!path_is_dir(buf)) return err_set(err, "%s: exists and is not a directory", buf);
    return 0;
}

int path_join(char *out, size_t n, const char *dir, const char *name, Error *err) {
    int w = snprintf(out, n, "%s/%s", dir, name);
    if (w < 0 || (size_t)w >= n) return err_set(err, "%s/%s: path too long", dir, name);
    return 0;
}

int file_copy(const char *from, const char *to, Error *err) {
    size_t n;
    char *data = file_read_all(from, &n, err);
    if (!data) return -1;
    int rc = file_write_all(to, data, n, err);
    free(data);
    return rc;
}

int file_copy_if_exists(const char *from_dir, const char *to_dir, const char *name, Error *err) {
    char from[4096], to[4096];
    if (path_join(from, sizeof from, from_dir, name, err) || path_join(to, sizeof to, to_dir, name, err)) return -1;
    return path_exists(from) ? file_copy(from, to, err) : 0;
}

int dir_is_empty(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int empty = 1;
    while (empty && (e = readdir(d)))
        empty = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
    closedir(d);
    return empty;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

void path_remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) == 0) nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}
