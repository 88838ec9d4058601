// Training data: token shards written by `dsv3 prepare`, and the loader that cuts them into
// fixed-length windows.
//
// A data directory holds data.json (what made it: tokenizer, vocabulary, specials, token counts,
// shard lists), train-NNNNN.bin and val-NNNNN.bin shards, and the tokenizer.json (plus
// tokenizer_config.json) it was made with, when that was a real tokenizer. A shard is a 32-byte
// little-endian header — magic "DSV3TOKS", u32 version (1), u32 header bytes (32), u64 token count,
// u32 vocabulary size of the tokenizer, u32 zero — then the tokens as u32. The documents of a split
// are concatenated, each one starting with BOS (and ending with EOS when the tokenizer has one).
#ifndef DSV3_TRAIN_DATA_H
#define DSV3_TRAIN_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "base/error.h"

#define DATA_MAGIC "DSV3TOKS"
#define DATA_VERSION 1
#define DATA_HEADER_BYTES 32

// `--tokenizer bytes`: every byte b is token b + DATA_BYTES_OFFSET; 0 is BOS, 1 is EOS.
#define DATA_BYTES_OFFSET 2
#define DATA_BYTES_VOCAB (256 + DATA_BYTES_OFFSET)

typedef struct PrepareOptions {
    const char *tokenizer;   // "bytes", a tokenizer.json, or a directory holding one
    const char *out;         // the data directory (created)
    const char *const *files;  // the documents, one per file
    int n_files;
    double val_fraction;     // the share of tokens for validation: whole documents from the end,
                             // or the tail of the last one when a single document is given
    size_t shard_tokens;     // tokens per shard at most
} PrepareOptions;

typedef struct PrepareStats {
    long long train_tokens, val_tokens;
    int documents, vocab_size;
} PrepareStats;

// Tokenises the files and writes the data directory; every file is written atomically.
int data_prepare(const PrepareOptions *o, PrepareStats *stats, Error *err);

// Tokens in DIR's split as data.json records them.
int data_split_tokens(const char *dir, const char *split, long long *n, Error *err);

// Windows of T + 1 tokens over one split: window w holds tokens [w·T, w·T + T] of the split's
// stream, so consecutive windows share one token and every token is predicted once per epoch.
// Training order: a permutation of the windows per epoch, drawn from (seed, epoch); evaluation
// order: the windows in order.
typedef struct DataLoader {
    int nshards;
    struct DataShard {
        char path[4096];
        void *map;
        size_t map_bytes;
        const uint32_t *tokens;
        uint64_t count, start;  // start: index of its first token in the split's stream
    } *shards;
    uint64_t total;   // tokens in the split
    int T;
    int shuffle;
    uint64_t seed;
    long n_windows;   // per epoch
    long epoch, pos;  // the next window is perm[pos] of epoch `epoch`
    long *perm;       // (n_windows)
} DataLoader;

// Opens DIR's split ("train" or "val"); every token must be below vocab_limit (the model's
// vocabulary), else an error names the shard and the position. Fails when the split holds fewer
// than T + 1 tokens.
int loader_open(DataLoader *l, const char *dir, const char *split, int T, uint64_t seed, int shuffle,
                int vocab_limit, Error *err);
void loader_close(DataLoader *l);
// The next B windows into out (B, T + 1); epochs roll over.
void loader_next_batch(DataLoader *l, int *out, int B);
// Back to the start of epoch 0 (evaluation restarts from the first window each time).
void loader_rewind(DataLoader *l);
// Moves to (epoch, pos), as saved from a loader over the same data and seed; an out-of-range
// position is an error.
int loader_seek(DataLoader *l, long epoch, long pos, Error *err);

#endif
