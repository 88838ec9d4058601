// Learning a byte-level BPE vocabulary under DeepSeek-V3's pre-tokenizer, written as a
// HuggingFace tokenizer.json (+ tokenizer_config.json beside it) that dsv3 and the HuggingFace
// libraries load.
#ifndef DSV3_TEXT_BPE_TRAIN_H
#define DSV3_TEXT_BPE_TRAIN_H

#include <stddef.h>

#include "base/error.h"

// DeepSeek-V3's three Split(Isolated) regexes (SPEC §6), as its tokenizer.json spells them.
extern const char *const DEEPSEEK_V3_SPLIT_REGEX[3];

// The added tokens a trained vocabulary starts with, at ids 0..16: BOS, EOS and pad (special), the
// chat markers <｜User｜>, <｜Assistant｜>, the nine markers of tool calls and their outputs and the
// three of fill in the middle (not special), spelled as DeepSeek-V3's.
#define BPE_TRAIN_N_SPECIAL 17
extern const char *const BPE_TRAIN_SPECIALS[BPE_TRAIN_N_SPECIAL];

typedef struct BpeTrainStats {
    size_t bytes;         // text read
    size_t pieces;        // pre-tokenized pieces counted
    size_t unique;        // distinct pieces
    int merges;           // merges learned
    int vocab_size;       // ids in the written vocabulary
    double seconds_count, seconds_merge;
} BpeTrainStats;

// Learns merges from the files until the vocabulary (specials, 256 bytes, merged tokens) has
// vocab_size ids, or no pair occurs twice; writes out_json and tokenizer_config.json in its
// directory (both atomically). Input that is not valid UTF-8 is repaired as encoding repairs it.
int bpe_train(const char *const *files, int nfiles, int vocab_size, const char *out_json, BpeTrainStats *stats,
              Error *err);

#endif
