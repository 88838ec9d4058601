// A small test harness: TEST(name) registers a function; CHECK* record a failure with its place
// and return from the test; SKIP records that the test could not run, and why, and returns. A
// skipped test is never counted as passed: the runner's last line is
// "N passed, N failed, N skipped".
#ifndef DSV3_TESTS_TEST_H
#define DSV3_TESTS_TEST_H

#include <math.h>
#include <stddef.h>

typedef void (*TestFn)(void);
void test_register(const char *file, const char *name, TestFn fn);
void test_fail(const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void test_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define TEST(name)                                                                         \
    static void name(void);                                                                \
    __attribute__((constructor)) static void name##_register(void) {                       \
        test_register(__FILE__, #name, name);                                              \
    }                                                                                      \
    static void name(void)

#define SKIP(...)               \
    do {                        \
        test_skip(__VA_ARGS__); \
        return;                 \
    } while (0)

#define CHECK(cond)                                                \
    do {                                                           \
        if (!(cond)) {                                             \
            test_fail(__FILE__, __LINE__, "CHECK(%s)", #cond);     \
            return;                                                \
        }                                                          \
    } while (0)

#define CHECK_MSG(cond, ...)                          \
    do {                                              \
        if (!(cond)) {                                \
            test_fail(__FILE__, __LINE__, __VA_ARGS__); \
            return;                                   \
        }                                             \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                    \
    do {                                                                                         \
        double a_ = (a), b_ = (b);                                                               \
        if (!(fabs(a_ - b_) <= (tol))) {                                                         \
            test_fail(__FILE__, __LINE__, "%s = %.9g, %s = %.9g, |diff| %.3g > %.3g", #a, a_, #b, \
                      b_, fabs(a_ - b_), (double)(tol));                                         \
            return;                                                                              \
        }                                                                                        \
    } while (0)

// |a - b|, infinite when either is NaN: fmax drops a NaN, so a running maximum of plain |a - b|
// would hide one.
static inline double test_absdiff(double a, double b) {
    double d = fabs(a - b);
    return d == d ? d : INFINITY;
}

// Runs a shell command; captures stdout+stderr (truncated to n-1 bytes) into out (may be NULL).
// Returns the exit status (or -1 if it could not run / was killed by a signal: 128+sig).
int test_run(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// Newlines in s: a one-line error message has exactly one.
int test_count_lines(const char *s);
// The dsv3 binary under test ($DSV3, default build/dsv3) and a scratch directory for this run.
// A tiny V3-style config.json over the byte vocabulary (264 ids): q_lora, noaux_tc in 2 groups, MTP.
extern const char *const TEST_TINY_V3_CONFIG;
const char *test_bin(void);
const char *test_tmpdir(void);
// A directory holding doc0..2.txt, config.json (the tiny V3 config) and data/ (`dsv3 prepare
// --tokenizer bytes`, 30% held out), made once per run of the test binary.
const char *test_train_corpus(void);
// The first line of golden model NAME's tokens.txt (tests/data/NAME), "5,17,3", into ids (n bytes);
// returns its number of tokens, 0 when the file is missing.
int test_golden_ids(const char *name, char *ids, size_t n);
// Writes text to path (tests check what they read back).
void test_write_text(const char *path, const char *text);
// Directory of committed test data (tests/data).
const char *test_datadir(void);
// Reads a whole file into a malloc'd buffer; NULL if missing.
void *test_read_file(const char *path, size_t *len);

#endif
