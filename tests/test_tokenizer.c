// The tokenizer's pieces, each against values worked out by hand or taken from the JavaScript
// reference: UTF-8 repair, the regex rewrite and splits, the byte alphabet, BPE merging (scan,
// heap and a naive reference), added-token matching, round trips, streaming decode, the chat
// format, the command line and bad input. A small tokenizer.json is built here; the DeepSeek-V3
// one is exercised in test_tokenizer_conformance.c.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "test.h"
#include "text/bpe.h"
#include "text/bpe_train.h"
#include "text/pretok.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

// A failing command: a clean non-zero exit and exactly one line that names every needle.
#define CHECK_FAILS(needle1, needle2, ...)                                                            \
    do {                                                                                              \
        char o_[4096];                                                                                \
        int rc_ = test_run(o_, sizeof o_, __VA_ARGS__);                                               \
        CHECK_MSG(rc_ != 0 && rc_ < 128, "exit %d (want a clean non-zero exit): %s", rc_, o_);        \
        CHECK_MSG(strstr(o_, needle1) && strstr(o_, needle2), "error does not name '%s' and '%s': %s", \
                  needle1, needle2, o_);                                                              \
        CHECK_MSG(test_count_lines(o_) == 1, "want a one-line error, got: %s", o_);                        \
    } while (0)

// ---- a small byte-level tokenizer ----
// ids 0..255: the bytes; 256 "he", 257 "ll", 258 "hell", 259 "Ġw"; added tokens 300 <s> (BOS,
// special), 301 </s> (special), 302 <|a|>, 303 <|ab|>, 304 [L] (lstrip), 305 [R] (rstrip),
// 306 [W] (single_word), 307 "ab", 308 "abc"; DeepSeek-V3's pre-tokenizer.

static void put_bytelevel(char *out, const char *raw) {
    char *o = out;
    for (const unsigned char *p = (const unsigned char *)raw; *p; p++) o += utf8_encode(bytelevel_char(*p), o);
    *o = 0;
}

static json_t *tiny_json(void) {
    json_t *vocab = json_object();
    char key[64];
    for (int b = 0; b < 256; b++) {
        int n = utf8_encode(bytelevel_char((uint8_t)b), key);
        key[n] = 0;
        json_object_set_new(vocab, key, json_integer(b));
    }
    const char *merged[][2] = {{"he", "256"}, {"ll", "257"}, {"hell", "258"}, {" w", "259"}};
    for (int i = 0; i < 4; i++) {
        put_bytelevel(key, merged[i][0]);
        json_object_set_new(vocab, key, json_integer(atoi(merged[i][1])));
    }
    json_t *merges = json_pack("[s, s, s, s]", "h e", "l l", "he ll", "Ġ w");
    json_t *added = json_array();
    const struct {
        int id;
        const char *content;
        int special, lstrip, rstrip, single_word;
    } at[] = {{300, "<s>", 1, 0, 0, 0},   {301, "</s>", 1, 0, 0, 0}, {302, "<|a|>", 0, 0, 0, 0},
              {303, "<|ab|>", 0, 0, 0, 0}, {304, "[L]", 0, 1, 0, 0},  {305, "[R]", 0, 0, 1, 0},
              {306, "[W]", 0, 0, 0, 1},    {307, "ab", 0, 0, 0, 0},   {308, "abc", 0, 0, 0, 0}};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++)
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", at[i].id, "content",
                                               at[i].content, "special", at[i].special, "lstrip", at[i].lstrip,
                                               "rstrip", at[i].rstrip, "single_word", at[i].single_word,
                                               "normalized", 0));
    json_t *steps = json_array();
    for (int i = 0; i < 3; i++)
        json_array_append_new(steps, json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex",
                                               DEEPSEEK_V3_SPLIT_REGEX[i], "behavior", "Isolated", "invert", 0));
    json_array_append_new(steps, json_pack("{s:s, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0, "use_regex", 0));
    return json_pack("{s:s, s:n, s:o, s:n, s:{s:s, s:o}, s:{s:s}, s:{s:s}, s:{s:s, s:o, s:o}}", "version", "1.0",
                     "truncation", "added_tokens", added, "normalizer", "pre_tokenizer", "type", "Sequence",
                     "pretokenizers", steps, "post_processor", "type", "ByteLevel", "decoder", "type", "ByteLevel",
                     "model", "type", "BPE", "vocab", vocab, "merges", merges);
}

// Writes j (stolen) as DIR/tokenizer.json under the scratch directory, with a config when cfg is
// non-NULL; path gets the tokenizer.json path.
static int write_tok(const char *name, json_t *j, const char *cfg, char *path, size_t n) {
    char dir[512], cmd[1100];
    snprintf(dir, sizeof dir, "%s/%s", test_tmpdir(), name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(cmd) != 0) return -1;
    snprintf(path, n, "%s/tokenizer.json", dir);
    int rc = json_dump_file(j, path, 0);
    json_decref(j);
    if (rc || !cfg) return rc;
    char cpath[600];
    snprintf(cpath, sizeof cpath, "%.500s/tokenizer_config.json", dir);
    FILE *f = fopen(cpath, "w");
    if (!f) return -1;
    fputs(cfg, f);
    fclose(f);
    return 0;
}

static const char *TINY_CFG = "{\"add_bos_token\": true, \"bos_token\": \"<s>\", \"eos_token\": {\"content\": \"</s>\"}}";

static Tokenizer *tiny(void) {
    char path[600];
    if (write_tok("tiny", tiny_json(), TINY_CFG, path, sizeof path)) return NULL;
    Error err = {0};
    Tokenizer *t = tok_load(path, &err);
    if (!t) fprintf(stdout, "    tiny tokenizer: %s\n", err.msg);
    return t;
}

// Encodes s and compares with the expected ids (-1 terminated).
static int ids_are(Tokenizer *t, const char *s, int flags, const int *want, char *why, size_t wn) {
    TokIds ids = {0};
    Error err = {0};
    if (tok_encode(t, s, strlen(s), flags, &ids, &err)) {
        snprintf(why, wn, "encode failed: %.900s", err.msg);
        return 0;
    }
    size_t n = 0;
    while (want[n] >= 0) n++;
    int ok = ids.n == n && (n == 0 || memcmp(ids.v, want, n * sizeof *want) == 0);
    if (!ok) {
        int k = snprintf(why, wn, "'%s' -> [", s);
        for (size_t i = 0; i < ids.n && k < (int)wn - 16; i++) k += snprintf(why + k, wn - (size_t)k, " %d", ids.v[i]);
        snprintf(why + k, wn - (size_t)k, " ]");
    }
    ids_free(&ids);
    return ok;
}

#define CHECK_IDS(t, s, flags, ...)                                  \
    do {                                                             \
        const int want_[] = {__VA_ARGS__, -1};                       \
        char why_[1024];                                             \
        CHECK_MSG(ids_are(t, s, flags, want_, why_, sizeof why_), "%s", why_); \
    } while (0)

// ---- UTF-8 ----

TEST(test_tokenizer_utf8_repair_like_whatwg) {
    // the reference (node's TextDecoder) gives a���b�c�� for these bytes: a surrogate's three
    // bytes are three maximal subparts, a truncated 4-byte sequence is one, an overlong pair two
    const char in[] = "a\xed\xa0\x80" "b\xf0\x9f\x98" "c\xc0\xaf";
    ByteBuf out = {0};
    size_t used = utf8_repair((const uint8_t *)in, sizeof in - 1, 1, &out);
    CHECK(used == sizeof in - 1);
    const char want[] = "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c\xEF\xBF\xBD\xEF\xBF\xBD";
    CHECK_MSG(out.n == sizeof want - 1 && memcmp(out.p, want, out.n) == 0, "repaired to '%s'", out.p);
    // valid text passes through untouched, and a split character waits when more may come
    out.n = 0;
    const char valid[] = "x\xe4\xbd\xa0\xf0\x9f\x98\x80\xef\xbf\xbd";
    CHECK(utf8_valid_prefix((const uint8_t *)valid, sizeof valid - 1) == sizeof valid - 1);
    CHECK(utf8_repair((const uint8_t *)"ab\xe4\xbd", 4, 0, &out) == 2 && out.n == 2);
    out.n = 0;
    CHECK(utf8_repair((const uint8_t *)"ab\xe4\xbd", 4, 1, &out) == 4 && out.n == 5);
    out.n = 0;
    // a byte that cannot continue the sequence ends it early: E4 'A' is U+FFFD then A
    CHECK(utf8_repair((const uint8_t *)"\xe4" "A", 2, 0, &out) == 2 && out.n == 4 && out.p[3] == 'A');
    bb_free(&out);
}

// ---- regexes and splits ----

TEST(test_tokenizer_regex_translation_is_javascript) {
    Error err = {0};
    const char *pat = "\\s+(?!\\S)|[^\\s\\p{L}]|\\u4e00.\\uD83D\\uDE00\\d";
    char *s = regex_translate(pat, strlen(pat), &err);
    CHECK_MSG(s != NULL, "%s", err.msg);
    const char *want =
        "[\\t\\n\\x0B\\f\\r \\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}\\x{FEFF}]+"
        "(?![^\\t\\n\\x0B\\f\\r \\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}\\x{FEFF}])"
        "|[^\\t\\n\\x0B\\f\\r \\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}\\x{FEFF}\\p{L}]"
        "|\\x{4E00}[^\\n\\r\\x{2028}\\x{2029}]\\x{1F600}[0-9]";
    CHECK_MSG(strcmp(s, want) == 0, "translated to %s", s);
    free(s);
    CHECK(regex_translate("\\uD83D", 6, &err) == NULL && strstr(err.msg, "\\u"));
    // ECMAScript's \s: U+FEFF is space, U+0085 and U+180E are not (PCRE2's own \s says otherwise)
    Regex re;
    CHECK(regex_compile(&re, "\\s", 2, 0, &err) == 0);
    size_t ms, me;
    CHECK(regex_next(&re, (const uint8_t *)"a\xef\xbb\xbf", 4, 0, &ms, &me, &err) == 1 && ms == 1 && me == 4);
    CHECK(regex_next(&re, (const uint8_t *)"a\xc2\x85\xe1\xa0\x8e", 6, 0, &ms, &me, &err) == 0);
    regex_free(&re);
}

typedef struct Pieces {
    char buf[1024];
    int n;
} Pieces;

static int collect(void *ctx, const uint8_t *s, size_t n, int prefix, Error *err) {
    (void)err;
    Pieces *p = ctx;
    size_t len = strlen(p->buf);
    snprintf(p->buf + len, sizeof p->buf - len, "%s%s%.*s", p->n ? "|" : "", prefix ? "+" : "", (int)n, (const char *)s);
    p->n++;
    return 0;
}

static int split_with(const char *pretok_json, const char *text, Pieces *out, Error *err) {
    json_error_t je;
    json_t *j = json_loads(pretok_json, 0, &je);
    if (!j) return err_set(err, "bad test JSON: %s", je.text);
    PreTokenizer p;
    int rc = pretok_from_json(&p, j, "test", err);
    json_decref(j);
    if (rc) return -1;
    memset(out, 0, sizeof *out);
    rc = pretok_run(&p, (const uint8_t *)text, strlen(text), collect, out, err);
    pretok_free(&p);
    return rc;
}

TEST(test_tokenizer_deepseek_regex_splits) {
    // the pieces the JavaScript reference's pre_tokenizer gives for these texts
    json_t *steps = json_array();
    for (int i = 0; i < 3; i++)
        json_array_append_new(steps, json_pack("{s:s, s:{s:s}, s:s}", "type", "Split", "pattern", "Regex",
                                               DEEPSEEK_V3_SPLIT_REGEX[i], "behavior", "Isolated"));
    json_array_append_new(steps, json_pack("{s:s, s:b}", "type", "ByteLevel", "use_regex", 0));
    json_t *seq = json_pack("{s:s, s:o}", "type", "Sequence", "pretokenizers", steps);
    char *js = json_dumps(seq, 0);
    json_decref(seq);
    const char *cases[][2] = {
        {"Hello world12345 你好!!\n\n  x", "Hello| world|123|45| |你好|!!\n\n| | x"},
        {"it's 2024-12-26: $3.50/kg.\r\n\tend  ", "it|'s| |202|4|-|12|-|26|:| $|3|.|50|/kg|.\r\n|\tend|  "},
        {"日本語のテキスト、カタカナ。한국어", "日本語のテキスト|、|カタカナ|。|한국어"},
        {"a\u00a0\u00a0b \ufeff" "c\xc2\x85" "d", "a|\u00a0|\u00a0b| |\ufeff" "c|\xc2\x85" "d"},
        {"(foo)bar.baz=> x", "(foo|)bar|.baz|=>| x"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Pieces p;
        Error err = {0};
        CHECK_MSG(split_with(js, cases[i][0], &p, &err) == 0, "%s", err.msg);
        CHECK_MSG(strcmp(p.buf, cases[i][1]) == 0, "'%s' split as '%s', want '%s'", cases[i][0], p.buf, cases[i][1]);
    }
    free(js);
}

TEST(test_tokenizer_split_behaviours) {
    // HuggingFace's documented example: "the-final--countdown" split on "-"
    const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    const char *want[] = {"the|final|countdown", "the|-|final|-|-|countdown", "the-|final-|-|countdown",
                          "the|-final|-|-countdown", "the|-|final|--|countdown"};
    for (int i = 0; i < 5; i++) {
        char js[400];
        snprintf(js, sizeof js,
                 "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"String\":\"-\"},"
                 "\"behavior\":\"%s\",\"invert\":false},{\"type\":\"ByteLevel\",\"use_regex\":false}]}",
                 names[i]);
        Pieces p;
        Error err = {0};
        CHECK_MSG(split_with(js, "the-final--countdown", &p, &err) == 0, "%s", err.msg);
        CHECK_MSG(strcmp(p.buf, want[i]) == 0, "%s: '%s', want '%s'", names[i], p.buf, want[i]);
    }
    // invert: the pattern names the pieces to keep, so Removed drops what lies between them
    Pieces p;
    Error err = {0};
    CHECK(split_with("{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"[a-z]+\"},"
                     "\"behavior\":\"Removed\",\"invert\":true},{\"type\":\"ByteLevel\",\"use_regex\":false}]}",
                     "ab, cd!e", &p, &err) == 0);
    CHECK_MSG(strcmp(p.buf, "ab|cd|e") == 0, "invert: '%s'", p.buf);
    // ByteLevel alone: GPT-2's pattern, and add_prefix_space puts a space before the first word
    CHECK(split_with("{\"type\":\"ByteLevel\",\"add_prefix_space\":true}", "Hello world's  123!?", &p, &err) == 0);
    CHECK_MSG(strcmp(p.buf, " Hello| world|'s| | 123|!?") == 0, "GPT-2 split: '%s'", p.buf);
    CHECK(split_with("{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"use_regex\":false}", "Hi", &p, &err) == 0);
    CHECK_MSG(strcmp(p.buf, "+Hi") == 0, "prefix flag: '%s'", p.buf);
}

// ---- the byte alphabet and BPE ----

TEST(test_tokenizer_bytelevel_alphabet) {
    CHECK(bytelevel_char(' ') == 0x120);   // Ġ
    CHECK(bytelevel_char('\n') == 0x10A);  // Ċ
    CHECK(bytelevel_char(0x00) == 0x100);
    CHECK(bytelevel_char(0x7F) == 0x121);
    CHECK(bytelevel_char(0xAD) == 0x143);  // the soft hyphen is the last remapped byte
    CHECK(bytelevel_char('A') == 'A' && bytelevel_char(0xE9) == 0xE9);
    int seen[324] = {0};
    for (int b = 0; b < 256; b++) {
        uint32_t c = bytelevel_char((uint8_t)b);
        CHECK(c < 324 && !seen[c]);
        seen[c] = 1;
        CHECK(bytelevel_byte(c) == b);
    }
    CHECK(bytelevel_byte(0x20) == -1 && bytelevel_byte(324) == -1);
}

// Applies merges the obvious way: find the lowest rank, leftmost, merge, repeat.
static int naive_merge(const BpeModel *m, int32_t *s, int n) {
    for (;;) {
        int best = -1;
        int32_t br = INT32_MAX, bm = 0, mg;
        for (int i = 0; i + 1 < n; i++) {
            int32_t r = bpe_pair_rank(m, s[i], s[i + 1], &mg);
            if (r < br) br = r, best = i, bm = mg;
        }
        if (best < 0) return n;
        s[best] = bm;
        memmove(s + best + 1, s + best + 2, (size_t)(n - best - 2) * sizeof *s);
        n--;
    }
}

TEST(test_tokenizer_bpe_merges_by_rank) {
    BpeModel m;
    bpe_init(&m);
    for (int b = 0; b < 256; b++) m.byte_id[b] = b;
    // "a a" is rank 0 so "aaa" merges on the left: [aa][a]; "b c" beats "a b" by rank
    CHECK(bpe_add_merge(&m, 'a', 'a', 300, 0) == 0 && bpe_add_merge(&m, 'b', 'c', 301, 1) == 0 &&
          bpe_add_merge(&m, 'a', 'b', 302, 2) == 0 && bpe_add_merge(&m, 300, 'a', 303, 3) == 0);
    int32_t w1[] = {'a', 'a', 'a'};
    CHECK(bpe_merge(&m, w1, 3, 0) == 1 && w1[0] == 303);
    int32_t w2[] = {'a', 'b', 'c'};
    CHECK(bpe_merge(&m, w2, 3, 0) == 2 && w2[0] == 'a' && w2[1] == 301);
    int32_t w3[] = {'a', 'b', 'c'};
    CHECK(bpe_merge(&m, w3, 3, 1) == 2 && w3[0] == 'a' && w3[1] == 301);
    // a pair listed again keeps its later rank
    CHECK(bpe_add_merge(&m, 'b', 'c', 301, 9) == 0);
    int32_t mg;
    CHECK(bpe_pair_rank(&m, 'b', 'c', &mg) == 9 && mg == 301);
    bpe_free(&m);

    // random merge tables over a 4-letter alphabet: scan, heap and the naive loop agree
    Rng r;
    rng_seed(&r, 11);
    for (int trial = 0; trial < 20; trial++) {
        bpe_init(&m);
        for (int b = 0; b < 256; b++) m.byte_id[b] = b;
        int next = 256;
        for (int k = 0; k < 60; k++) {
            int32_t a = (int32_t)(rng_next(&r) % 4) + 'a', b = (int32_t)(rng_next(&r) % 4) + 'a';
            if (next > 256 && rng_next(&r) % 2) a = 256 + (int32_t)(rng_next(&r) % (uint64_t)(next - 256));
            if (next > 256 && rng_next(&r) % 2) b = 256 + (int32_t)(rng_next(&r) % (uint64_t)(next - 256));
            CHECK(bpe_add_merge(&m, a, b, next++, k) == 0);
        }
        for (int w = 0; w < 40; w++) {
            int n = 1 + (int)(rng_next(&r) % (w < 30 ? 100 : 600));
            int32_t s0[600], s1[600], s2[600];
            for (int i = 0; i < n; i++) s0[i] = s1[i] = s2[i] = (int32_t)(rng_next(&r) % 4) + 'a';
            int n0 = naive_merge(&m, s0, n), n1 = bpe_merge(&m, s1, n, 0), n2 = bpe_merge(&m, s2, n, 1);
            CHECK_MSG(n0 == n1 && n0 == n2, "trial %d word %d: lengths %d %d %d", trial, w, n0, n1, n2);
            CHECK(memcmp(s0, s1, (size_t)n0 * 4) == 0 && memcmp(s0, s2, (size_t)n0 * 4) == 0);
        }
        bpe_free(&m);
    }
}

// ---- the tokenizer ----

TEST(test_tokenizer_encode_small_vocabulary) {
    Tokenizer *t = tiny();
    CHECK(t);
    CHECK(tok_vocab_size(t) == 309 && tok_bos_id(t) == 300 && tok_eos_id(t) == 301 && tok_pad_id(t) == -1);
    CHECK_IDS(t, "hello", 0, 258, 'o');
    CHECK_IDS(t, "hello world", 0, 258, 'o', 259, 'o', 'r', 'l', 'd');
    CHECK_IDS(t, "hello", TOK_ADD_BOS, 300, 258, 'o');
    CHECK_IDS(t, "hello", TOK_ADD_SPECIAL, 300, 258, 'o');  // add_bos_token in the config
    CHECK_IDS(t, "hello", TOK_ADD_SPECIAL | TOK_ADD_BOS, 300, 258, 'o');
    TokIds none = {0};
    Error err = {0};
    CHECK(tok_encode(t, "", 0, 0, &none, &err) == 0 && none.n == 0);  // empty text, no ids
    // digits come in threes and a byte of a multi-byte character is a token of its own here
    CHECK_IDS(t, "12345\xc3\xa9", 0, '1', '2', '3', '4', '5', 0xc3, 0xa9);
    tok_free(t);
}

TEST(test_tokenizer_added_tokens_matched_first) {
    Tokenizer *t = tiny();
    CHECK(t);
    CHECK_IDS(t, "x<|ab|>y", 0, 'x', 303, 'y');
    CHECK_IDS(t, "<|a|><|ab|></s>", 0, 302, 303, 301);
    CHECK_IDS(t, "<|a", 0, '<', '|', 'a');
    // leftmost-longest: "abc" beats "ab" where both start, and "ab" is taken from inside a word
    CHECK_IDS(t, "xabcd", 0, 'x', 308, 'd');
    CHECK_IDS(t, "xabd", 0, 'x', 307, 'd');
    // lstrip eats the spaces before the token, rstrip those after it
    CHECK_IDS(t, "a  [L]b", 0, 'a', 304, 'b');
    CHECK_IDS(t, "a[R]  \n b", 0, 'a', 305, 'b');
    CHECK_IDS(t, "a [R]", 0, 'a', ' ', 305);
    // single_word: never from inside a word
    CHECK_IDS(t, "a [W] b", 0, 'a', ' ', 306, ' ', 'b');
    CHECK_IDS(t, "a[W]", 0, 'a', '[', 'W', ']');
    // special text inside the text is still matched; the BOS flag adds exactly one
    CHECK_IDS(t, "<s>hello", TOK_ADD_BOS, 300, 300, 258, 'o');
    CHECK(tok_token_id(t, "<|ab|>") == 303 && tok_token_id(t, "he") == 256 && tok_token_id(t, "nope") == -1);
    CHECK(tok_is_special(t, 300) && !tok_is_special(t, 302) && !tok_is_special(t, 'a'));
    tok_free(t);
}

TEST(test_tokenizer_round_trip_random_text) {
    Tokenizer *t = tiny();
    CHECK(t);
    Rng r;
    rng_seed(&r, 5);
    static const uint32_t pool[] = {' ', '\n', '\t', 'a', 'b', 'c', 'h', 'e', 'l', 'o', '1', '7', '!', '<', '|', '>',
                                    '[', 'W', ']', 0xE9, 0x4E2D, 0x6587, 0xAC00, 0x1F600, 0x0301, 0xA0, 0x3000,
                                    0xFEFF, 0x10FFFF, 0xFFFD, 0x7F, 0x01};
    for (int trial = 0; trial < 300; trial++) {
        char s[512];
        size_t n = 0;
        int len = (int)(rng_next(&r) % 60);
        for (int i = 0; i < len; i++) {
            uint32_t cp = pool[rng_next(&r) % (sizeof pool / sizeof pool[0])];
            n += (size_t)utf8_encode(cp, s + n);
        }
        s[n] = 0;
        TokIds ids = {0};
        Error err = {0};
        CHECK_MSG(tok_encode(t, s, n, 0, &ids, &err) == 0, "%s", err.msg);
        size_t dn;
        char *back = tok_decode(t, ids.v, ids.n, 0, &dn, &err);
        CHECK_MSG(back && dn == n && memcmp(back, s, n) == 0, "round trip of '%s' gave '%s'", s, back ? back : err.msg);
        free(back);
        ids_free(&ids);
    }
    // invalid input is repaired first, so it comes back with U+FFFD in place
    TokIds ids = {0};
    Error err = {0};
    CHECK(tok_encode(t, "a\xff" "b", 3, 0, &ids, &err) == 0);
    size_t dn;
    char *back = tok_decode(t, ids.v, ids.n, 0, &dn, &err);
    CHECK(back && strcmp(back, "a\xEF\xBF\xBD" "b") == 0);
    free(back);
    ids_free(&ids);
    tok_free(t);
}

TEST(test_tokenizer_decode_and_stream) {
    Tokenizer *t = tiny();
    CHECK(t);
    Error err = {0};
    size_t n;
    // a lone lead byte decodes to U+FFFD, specials can be skipped, bad ids are errors
    int ids1[] = {0xE4, 'A', 300, 258};
    char *s = tok_decode(t, ids1, 4, 0, &n, &err);
    CHECK(s && strcmp(s, "\xEF\xBF\xBD" "A<s>hell") == 0);
    free(s);
    s = tok_decode(t, ids1, 4, TOK_SKIP_SPECIAL, &n, &err);
    CHECK(s && strcmp(s, "\xEF\xBF\xBD" "Ahell") == 0);
    free(s);
    int bad[] = {5, 309};
    CHECK(tok_decode(t, bad, 2, 0, &n, &err) == NULL && strstr(err.msg, "309") && strstr(err.msg, "out of range"));
    int hole[] = {280};
    CHECK(tok_decode(t, hole, 1, 0, &n, &err) == NULL && strstr(err.msg, "280") && strstr(err.msg, "not in the vocabulary"));

    // "你好😀" one byte per token: text comes out only when a character is complete
    const char *text = "\xe4\xbd\xa0\xe5\xa5\xbd\xf0\x9f\x98\x80!";
    TokStream ts;
    tok_stream_init(&ts, t, 0);
    char got[64] = "";
    int complete_at[11];
    for (int i = 0; text[i]; i++) {
        const char *o;
        size_t on;
        CHECK(tok_stream_push(&ts, (unsigned char)text[i], &o, &on, &err) == 0);
        complete_at[i] = (int)on;
        strncat(got, o, on);
    }
    const char *o;
    size_t on;
    tok_stream_finish(&ts, &o, &on);
    CHECK(on == 0);
    CHECK(strcmp(got, text) == 0);
    int want_at[] = {0, 0, 3, 0, 0, 3, 0, 0, 0, 4, 1};
    CHECK(memcmp(complete_at, want_at, sizeof want_at) == 0);
    // an unfinished character at the end comes out as U+FFFD; a bad id is an error
    CHECK(tok_stream_push(&ts, 0xF0, &o, &on, &err) == 0 && on == 0);
    tok_stream_finish(&ts, &o, &on);
    CHECK(on == 3 && memcmp(o, "\xEF\xBF\xBD", 3) == 0);
    CHECK(tok_stream_push(&ts, 99999, &o, &on, &err) == -1 && strstr(err.msg, "99999"));

    // random ids (bytes, merges, added tokens): the pushes add up to tok_decode exactly
    Rng r;
    rng_seed(&r, 3);
    for (int trial = 0; trial < 200; trial++) {
        int ids[40], k = 1 + (int)(rng_next(&r) % 40);
        for (int i = 0; i < k; i++) {
            int c = (int)(rng_next(&r) % 4);
            ids[i] = c == 0 ? 300 + (int)(rng_next(&r) % 9) : c == 1 ? 256 + (int)(rng_next(&r) % 4)
                                                                      : 0x80 + (int)(rng_next(&r) % 128);
        }
        int flags = trial % 2 ? TOK_SKIP_SPECIAL : 0;
        char *whole = tok_decode(t, ids, (size_t)k, flags, &n, &err);
        CHECK(whole);
        ByteBuf acc = {0};
        tok_stream_free(&ts);
        tok_stream_init(&ts, t, flags);
        for (int i = 0; i < k; i++) {
            CHECK(tok_stream_push(&ts, ids[i], &o, &on, &err) == 0);
            CHECK(utf8_valid_prefix((const uint8_t *)o, on) == on);
            bb_append(&acc, o, on);
        }
        tok_stream_finish(&ts, &o, &on);
        bb_append(&acc, o, on);
        CHECK_MSG(acc.n == n && memcmp(acc.p, whole, n) == 0, "trial %d: stream differs from decode", trial);
        bb_free(&acc);
        free(whole);
    }
    tok_stream_free(&ts);
    tok_free(t);
}

TEST(test_tokenizer_chat_format) {
    Tokenizer *t = tiny();
    CHECK(t);
    Error err = {0};
    ChatMessage msgs[] = {{.role = "system", .content = "S1"}, {.role = "user", .content = "hi"}, {.role = "system", .content = "S2"}, {.role = "assistant", .content = "yo"}, {.role = "user", .content = "again"}};
    char *s = tok_chat_render(t, msgs, 5, 1, &err);
    CHECK(s);
    const char *want = "<s>S1\n\nS2<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜><｜User｜>again<｜Assistant｜>";
    CHECK_MSG(strcmp(s, want) == 0, "rendered '%s'", s);
    free(s);
    s = tok_chat_render(t, msgs + 1, 1, 0, &err);
    CHECK(s && strcmp(s, "<s><｜User｜>hi") == 0);
    free(s);
    ChatMessage bad[] = {{.role = "robot", .content = "x"}};
    CHECK(tok_chat_render(t, bad, 1, 1, &err) == NULL && strstr(err.msg, "robot"));
    // a tokenizer without fill in the middle's tokens cannot build its prompt: an error naming one
    TokIds fim = {0};
    CHECK(tok_fim_encode(t, "a", 1, "b", 1, &fim, &err) == -1 && strstr(err.msg, FIM_BEGIN) && fim.n == 0);
    ChatMessage no_content[] = {{.role = "assistant"}};
    CHECK(tok_chat_render(t, no_content, 1, 1, &err) == NULL && strstr(err.msg, "no content"));
    // tool calls, tool outputs, and the tools' description after the system prompt
    ChatToolCall calls[] = {{.name = "f", .arguments = "{\"a\": 1}"}, {.name = "g", .arguments = "{}"}};
    ChatMessage conv[] = {{.role = "system", .content = "S"},
                          {.role = "user", .content = "q"},
                          {.role = "assistant", .tool_calls = calls, .n_tool_calls = 2},
                          {.role = "tool", .content = "1"},
                          {.role = "tool", .content = "2"},
                          {.role = "assistant", .content = "done"},
                          {.role = "user", .content = "more"},
                          {.role = "assistant", .content = "ok", .tool_calls = calls + 1, .n_tool_calls = 1},
                          {.role = "tool", .content = "3"}};
    s = tok_chat_render_tools(t, conv, 9, "TOOLS", 1, &err);
    CHECK(s);
    want = "<s>S\n\nTOOLS<｜User｜>q<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n"
           "```json\n{\"a\": 1}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{}\n```"
           "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>1"
           "<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>2<｜tool▁output▁end｜><｜tool▁outputs▁end｜>done"
           "<｜end▁of▁sentence｜><｜User｜>more<｜Assistant｜>ok<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
           "<｜tool▁sep｜>g\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
           "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>3<｜tool▁output▁end｜><｜tool▁outputs▁end｜>";
    CHECK_MSG(strcmp(s, want) == 0, "rendered '%s'", s);
    free(s);
    s = tok_chat_render_tools(t, conv + 1, 1, "TOOLS", 1, &err);  // no system prompt: the tools alone
    CHECK(s && strcmp(s, "<s>TOOLS<｜User｜>q<｜Assistant｜>") == 0);
    free(s);
    // the BOS text becomes the BOS token once, and nothing else is added
    TokIds ids = {0};
    CHECK(tok_chat_encode(t, msgs + 1, 1, 0, &ids, &err) == 0);
    CHECK(ids.n > 2 && ids.v[0] == 300 && ids.v[1] == '<');
    ids_free(&ids);
    tok_free(t);
}

TEST(test_tokenizer_template_post_processor) {
    // no config: the post-processor's template says what TOK_ADD_SPECIAL adds
    json_t *j = tiny_json();
    json_object_set_new(j, "post_processor",
                        json_pack("{s:s, s:[{s:{s:s}}, {s:{s:s}}, {s:{s:s}}], s:{s:{s:[i]}, s:{s:[i]}}}", "type",
                                  "TemplateProcessing", "single", "SpecialToken", "id", "<s>", "Sequence", "id", "A",
                                  "SpecialToken", "id", "</s>", "special_tokens", "<s>", "ids", 300, "</s>", "ids",
                                  301));
    char path[600];
    CHECK(write_tok("tpl", j, NULL, path, sizeof path) == 0);
    Error err = {0};
    Tokenizer *t = tok_load(path, &err);
    CHECK_MSG(t, "%s", err.msg);
    CHECK_IDS(t, "hello", TOK_ADD_SPECIAL, 300, 258, 'o', 301);
    CHECK_IDS(t, "hello", 0, 258, 'o');
    CHECK(tok_bos_id(t) == -1);
    TokIds ids = {0};
    CHECK(tok_encode(t, "x", 1, TOK_ADD_BOS, &ids, &err) == -1 && strstr(err.msg, "BOS"));
    ids_free(&ids);
    tok_free(t);
}

// ---- the command line ----

static int write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, n, f);
    fclose(f);
    return w == n ? 0 : -1;
}

TEST(test_tokenizer_cli_tokenize_lines) {
    char path[600], in[600], o[4096];
    CHECK(write_tok("cli", tiny_json(), TINY_CFG, path, sizeof path) == 0);
    snprintf(in, sizeof in, "%s/cli/in.txt", test_tmpdir());
    CHECK(write_file(in, "hello\n\nhe\xff\n", 10) == 0);
    // one output line per input line, the newline itself not encoded; no BOS unless asked
    int rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s --lines < %s", test_bin(), path, in);
    CHECK_MSG(rc == 0 && strcmp(o, "258 111\n\n256 239 191 189\n") == 0, "got: %s", o);
    rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s --lines --bos < %s", test_bin(), path, in);
    CHECK_MSG(rc == 0 && strcmp(o, "300 258 111\n300\n300 256 239 191 189\n") == 0, "got: %s", o);
    // without --lines the whole input is one text, newlines included
    rc = test_run(o, sizeof o, "printf 'hello\\nhe' | %s tokenize --tokenizer %s", test_bin(), path);
    CHECK_MSG(rc == 0 && strcmp(o, "258 111 10 256\n") == 0, "got: %s", o);
    // a directory is taken as a model directory
    char dir[600];
    snprintf(dir, sizeof dir, "%s/cli", test_tmpdir());
    rc = test_run(o, sizeof o, "printf 'hello' | %s tokenize --tokenizer %s", test_bin(), dir);
    CHECK_MSG(rc == 0 && strcmp(o, "258 111\n") == 0, "got: %s", o);
    // and back
    rc = test_run(o, sizeof o, "printf '258 111\\n\\n300 256\\n' | %s detokenize --tokenizer %s --lines", test_bin(), path);
    CHECK_MSG(rc == 0 && strcmp(o, "hello\n\n<s>he\n") == 0, "got: %s", o);
    rc = test_run(o, sizeof o, "printf '300 258 111 10\\n  259 ' | %s detokenize --tokenizer %s --skip-special",
                  test_bin(), path);
    CHECK_MSG(rc == 0 && strcmp(o, "hello\n w") == 0, "got: %s", o);
}

TEST(test_tokenizer_bad_input_errors) {
    char path[600], dir[600];
    const char *B = test_bin();
    // malformed JSON
    snprintf(dir, sizeof dir, "%s/bad_json", test_tmpdir());
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "mkdir -p %s && printf '{\"model\": {' > %s/tokenizer.json", dir, dir);
    CHECK(system(cmd) == 0);
    CHECK_FAILS("bad_json/tokenizer.json", "invalid JSON", "echo hi | %s tokenize --tokenizer %s/tokenizer.json", B, dir);
    CHECK_FAILS("none", "cannot open", "echo hi | %s tokenize --tokenizer %s/none", B, test_tmpdir());

    // a merge naming a symbol that is not in the vocabulary, and one whose result is not
    json_t *j = tiny_json();
    json_array_append_new(json_object_get(json_object_get(j, "model"), "merges"), json_string("q zz"));
    CHECK(write_tok("bad_merge", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("model.merges[4]", "symbol 'zz' is not in the vocabulary", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_array_append_new(json_object_get(json_object_get(j, "model"), "merges"), json_string("q z"));
    CHECK(write_tok("bad_merge2", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("model.merges[4]", "merged token 'qz'", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_array_append_new(json_object_get(json_object_get(j, "model"), "merges"), json_integer(7));
    CHECK(write_tok("bad_merge3", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("model.merges[4]", "expected", "echo hi | %s tokenize --tokenizer %s", B, path);

    // unsupported components are named, not silently ignored
    j = tiny_json();
    json_object_set_new(j, "normalizer", json_pack("{s:s}", "type", "NFC"));
    CHECK(write_tok("bad_norm", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("normalizer", "'NFC'", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_array_insert_new(json_object_get(json_object_get(j, "pre_tokenizer"), "pretokenizers"), 0,
                          json_pack("{s:s}", "type", "Metaspace"));
    CHECK(write_tok("bad_pre", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("pre_tokenizer.pretokenizers[0]", "'Metaspace'", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_object_set_new(json_object_get(j, "model"), "type", json_string("Unigram"));
    CHECK(write_tok("bad_model", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("model.type", "'Unigram'", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_object_set_new(json_object_get(j, "decoder"), "type", json_string("WordPiece"));
    CHECK(write_tok("bad_dec", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("decoder", "'WordPiece'", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_object_set_new(json_array_get(json_object_get(json_object_get(j, "pre_tokenizer"), "pretokenizers"), 2),
                        "pattern", json_pack("{s:s}", "Regex", "[a-"));
    CHECK(write_tok("bad_regex", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("pre_tokenizer.pretokenizers[2].pattern", "regex '[a-'", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_object_del(json_object_get(json_object_get(j, "model"), "vocab"), "a");
    CHECK(write_tok("bad_byte", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("model.vocab", "no token for byte 0x61", "echo hi | %s tokenize --tokenizer %s", B, path);
    j = tiny_json();
    json_object_set_new(json_object_get(json_object_get(j, "model"), "vocab"), "zz", json_integer(-3));
    CHECK(write_tok("bad_id", j, NULL, path, sizeof path) == 0);
    CHECK_FAILS("model.vocab", "'zz'", "echo hi | %s tokenize --tokenizer %s", B, path);

    // the config names a BOS the tokenizer does not have
    CHECK(write_tok("bad_cfg", tiny_json(), "{\"bos_token\": \"<nope>\", \"add_bos_token\": true}", path, sizeof path) == 0);
    CHECK_FAILS("tokenizer_config.json", "bos_token: '<nope>'", "echo hi | %s tokenize --tokenizer %s", B, path);

    CHECK(write_tok("bad_cfg2", tiny_json(), "{\"bos_token\": ", path, sizeof path) == 0);
    CHECK_FAILS("bad_cfg2/tokenizer_config.json", "invalid JSON", "echo hi | %s tokenize --tokenizer %s", B, path);

    // detokenize: an id out of range, a malformed id; nothing is printed but the error
    CHECK(write_tok("detok", tiny_json(), TINY_CFG, path, sizeof path) == 0);
    CHECK_FAILS("token id 4000 is out of range", "0..308", "echo '104 4000' | %s detokenize --tokenizer %s", B, path);
    CHECK_FAILS("line 2", "token id 999999", "printf '104\\n999999\\n' | %s detokenize --tokenizer %s --lines", B, path);
    CHECK_FAILS("item 2", "'x7'", "echo '104 x7' | %s detokenize --tokenizer %s", B, path);
    CHECK_FAILS("--tokenizer", "required", "echo 1 | %s detokenize", B);

    // tokenizer train
    CHECK_FAILS("--vocab-size 100", "at least", "%s tokenizer train --vocab-size 100 --out %s/t.json %s", B, test_tmpdir(), path);
    CHECK_FAILS("missing.txt", "cannot open", "%s tokenizer train --vocab-size 300 --out %s/t.json %s/missing.txt", B,
                test_tmpdir(), test_tmpdir());
    CHECK_FAILS("no input files", "FILES", "%s tokenizer train --vocab-size 300 --out %s/t.json", B, test_tmpdir());
}

TEST(test_tokenizer_train_small_corpus) {
    char txt[600], out[600], o[4096];
    snprintf(txt, sizeof txt, "%s/train.txt", test_tmpdir());
    snprintf(out, sizeof out, "%s/trained_small/tokenizer.json", test_tmpdir());
    FILE *f = fopen(txt, "w");
    CHECK(f);
    // " the" is by far the most frequent piece, so its pair ("Ġ t" or "t h"/"h e") merges first
    for (int i = 0; i < 400; i++) fprintf(f, "the cat and the hat and the bat %d 你好 😀\n", i * 37);
    fclose(f);
    char cmd[1400];  // the output's directory is made when missing
    snprintf(cmd, sizeof cmd, "rm -rf %s/trained_small", test_tmpdir());
    CHECK(system(cmd) == 0);
    int rc = test_run(o, sizeof o, "%s tokenizer train --vocab-size 300 --out %s %s", test_bin(), out, txt);
    CHECK_MSG(rc == 0 && strstr(o, "300 ids"), "train: %s", o);
    Error err = {0};
    Tokenizer *t = tok_load(out, &err);
    CHECK_MSG(t, "%s", err.msg);
    CHECK(tok_vocab_size(t) == 300 && tok_bos_id(t) == 0 && tok_eos_id(t) == 1 && tok_pad_id(t) == 2);
    CHECK(tok_token_id(t, "<｜User｜>") == 3 && tok_token_id(t, "<｜Assistant｜>") == 4 && tok_is_special(t, 2) &&
          !tok_is_special(t, 3));
    // the tool-call markers are one token each, as in DeepSeek-V3's tokenizer (not special: they
    // are text of the answer), and the chat format's text around them encodes to them
    CHECK(tok_token_id(t, "<｜tool▁calls▁begin｜>") == 5 && tok_token_id(t, "<｜tool▁output▁end｜>") == 13 &&
          !tok_is_special(t, 5));
    TokIds calls = {0};
    const char *call = "x<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f";
    CHECK(tok_encode(t, call, strlen(call), 0, &calls, &err) == 0);
    int markers = 0;
    for (size_t i = 0; i < calls.n; i++) markers += calls.v[i] == 5 || calls.v[i] == 7 || calls.v[i] == 9;
    CHECK_MSG(markers == 3, "%d of the 3 markers encoded as their ids", markers);
    ids_free(&calls);
    // so are fill in the middle's: BOS, <｜fim▁begin｜>, the prefix, <｜fim▁hole｜>, the suffix, <｜fim▁end｜>
    int fb = tok_token_id(t, FIM_BEGIN), fh = tok_token_id(t, FIM_HOLE), fe = tok_token_id(t, FIM_END);
    CHECK(fh == 14 && fb == 15 && fe == 16 && !tok_is_special(t, fb));
    TokIds fim = {0}, pre = {0}, suf = {0};
    CHECK(tok_fim_encode(t, "the cat", 7, " and the hat", 12, &fim, &err) == 0);
    CHECK(tok_encode(t, "the cat", 7, 0, &pre, &err) == 0 && tok_encode(t, " and the hat", 12, 0, &suf, &err) == 0);
    CHECK(fim.n == 4 + pre.n + suf.n && fim.v[0] == 0 && fim.v[1] == fb && fim.v[2 + pre.n] == fh && fim.v[fim.n - 1] == fe);
    CHECK(!memcmp(fim.v + 2, pre.v, pre.n * sizeof(int)) && !memcmp(fim.v + 3 + pre.n, suf.v, suf.n * sizeof(int)));
    ids_free(&fim), ids_free(&pre), ids_free(&suf);
    // merges: the words got shorter, and decoding gives the text back byte for byte
    size_t len;
    char *text = test_read_file(txt, &len);
    CHECK(text);
    TokIds ids = {0};
    CHECK(tok_encode(t, text, len, TOK_ADD_SPECIAL, &ids, &err) == 0);
    CHECK(ids.v[0] == 0);
    CHECK_MSG(ids.n < len / 3, "%zu tokens for %zu bytes", ids.n, len);
    size_t dn;
    char *back = tok_decode(t, ids.v, ids.n, TOK_SKIP_SPECIAL, &dn, &err);
    CHECK(back && dn == len && memcmp(back, text, len) == 0);
    CHECK(tok_token_id(t, "Ġthe") >= 0 || tok_token_id(t, "the") >= 0);
    free(back);
    free(text);
    ids_free(&ids);
    tok_free(t);
    // the file carries DeepSeek-V3's pre-tokenizer and HF's BPE fields
    json_error_t je;
    json_t *j = json_load_file(out, 0, &je);
    CHECK(j);
    json_t *steps = json_object_get(json_object_get(j, "pre_tokenizer"), "pretokenizers");
    CHECK(json_array_size(steps) == 4);
    for (int i = 0; i < 3; i++)
        CHECK(strcmp(json_string_value(json_object_get(json_object_get(json_array_get(steps, (size_t)i), "pattern"),
                                                       "Regex")),
                     DEEPSEEK_V3_SPLIT_REGEX[i]) == 0);
    CHECK(json_array_size(json_object_get(json_object_get(j, "model"), "merges")) == 300 - BPE_TRAIN_N_SPECIAL - 256);
    json_decref(j);
}
