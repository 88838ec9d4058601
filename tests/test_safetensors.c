#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "base/bigmem.h"
#include "base/safetensors.h"
#include "test.h"

TEST(test_safetensors_round_trip) {
    char path[512];
    snprintf(path, sizeof path, "%s/rt.safetensors", test_tmpdir());
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[3] = {0x3f80, 0x4000, 0xc040};
    StTensorDesc d[2] = {{"a.weight", DT_F32, 2, {2, 3}, a}, {"b", DT_BF16, 1, {3}, b}};
    Error err = {0};
    CHECK_MSG(st_write(path, d, 2, &err) == 0, "%s", err.msg);
    StFile f;
    CHECK_MSG(st_open(&f, path, &err) == 0, "%s", err.msg);
    const StTensor *t = st_find(&f, "a.weight");
    CHECK(t && t->dtype == DT_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3);
    CHECK(memcmp(t->data, a, sizeof a) == 0);
    t = st_find(&f, "b");
    CHECK(t && t->dtype == DT_BF16 && memcmp(t->data, b, sizeof b) == 0);
    CHECK(st_find(&f, "missing") == NULL);
    st_close(&f);
}

// A written checkpoint leaves the page cache (atomic_commit's drop_cache: read afresh, it comes back
// in 2 MB folios where the kernel gives them) and reads back the same; bigmem_huge_bytes accounts
// for the pages of a mapping, resident and on 2 MB pages.
TEST(test_safetensors_write_leaves_the_page_cache) {
    char path[512];
    snprintf(path, sizeof path, "%s/evict.safetensors", test_tmpdir());
    enum { N = 4 << 20 };  // floats: 16 MB
    float *a = malloc(sizeof(float) * N);
    for (int i = 0; i < N; i++) a[i] = (float)(i % 1000) - 500.0f;
    StTensorDesc d = {"big", DT_F32, 1, {N}, a};
    Error err = {0};
    CHECK_MSG(st_write(path, &d, 1, &err) == 0, "%s", err.msg);
    struct statfs fs;
    int tmpfs = statfs(path, &fs) == 0 && fs.f_type == 0x01021994;  // (TMPFS_MAGIC: its pages are the file)
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    size_t page = (size_t)sysconf(_SC_PAGESIZE), pages = ((size_t)st.st_size + page - 1) / page, cached = 0;
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    CHECK(map != MAP_FAILED);
    unsigned char *in = malloc(pages);
    CHECK(mincore(map, (size_t)st.st_size, in) == 0);
    for (size_t i = 0; i < pages; i++) cached += in[i] & 1;
    munmap(map, (size_t)st.st_size);
    free(in);
    if (!tmpfs) CHECK_MSG(cached * 10 < pages, "%zu of %zu pages of the file just written still in the page cache", cached, pages);
    StFile f;
    CHECK_MSG(st_open(&f, path, &err) == 0, "%s", err.msg);
    const StTensor *t = st_find(&f, "big");
    CHECK(t && memcmp(t->data, a, sizeof(float) * N) == 0);  // (every page read)
    long long resident = -1, huge = bigmem_huge_bytes(&t->data, 1, &resident);
    CHECK(huge >= 0 && resident >= (long long)sizeof(float) * N && huge <= resident);
    printf("    %s: %lld of %lld resident bytes mapped 2 MB at a time%s\n", path, huge, resident,
           tmpfs ? " (tmpfs: the page cache is the file)" : "");
    const void *nowhere[2] = {t->data, (const void *)16};
    CHECK(bigmem_huge_bytes(nowhere, 2, &resident) == -1);  // (no mapping holds the second)
    st_close(&f);
    free(a);
}
