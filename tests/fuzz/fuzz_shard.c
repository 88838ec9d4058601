// A training data split of any bytes: the input is the one token shard of a data directory's
// train split. loader_open accepts it only if its header's sizes match the file and every token
// is inside the vocabulary; then windows read from it must stay in bounds.
#include <string.h>
#include <sys/stat.h>

#include "fuzz_common.h"
#include "train/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char dir[256];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/dsv3-fuzz-shard-%d", (int)getpid());
        mkdir(dir, 0700);
        char meta[512];
        snprintf(meta, sizeof meta, "%s/data.json", dir);
        FILE *f = fopen(meta, "w");
        if (!f) abort();
        fputs("{\"format\": \"dsv3-tokens\", \"version\": 1, \"tokenizer\": \"bytes\", \"vocab_size\": 264,"
              " \"bos_token_id\": 0, \"eos_token_id\": 1, \"documents\": 1,"
              " \"train\": {\"tokens\": 0, \"shards\": [\"train-0.bin\"]}, \"val\": {\"tokens\": 0, \"shards\": []}}",
              f);
        fclose(f);
    }
    char path[512];
    snprintf(path, sizeof path, "%s/train-0.bin", dir);
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
    DataLoader l;
    Error err;
    if (loader_open(&l, dir, "train", 4, 7, 1, 264, &err) == 0) {
        int out[3 * 5];
        for (int i = 0; i < 3; i++) loader_next_batch(&l, out, 3);
        loader_close(&l);
    }
    return 0;
}
