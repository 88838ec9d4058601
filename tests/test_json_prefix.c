// The JSON-object prefix automaton (src/text/json_prefix.h) against jansson, an independent
// parser: every prefix of a valid object is accepted, however the bytes are split; what it calls
// complete, jansson parses as an object; what jansson parses as an object (within the automaton's
// depth and whitespace limits) it accepts and calls complete.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "test.h"
#include "text/json_prefix.h"

// Feeds s in pieces of 1 .. max_piece bytes (from rng); 1 complete, 0 a valid prefix, -1 refused.
static int feed_split(const char *s, size_t n, Rng *rng, int max_piece) {
    JsonPrefix p;
    json_prefix_init(&p);
    for (size_t i = 0; i < n;) {
        size_t k = 1 + (size_t)(rng_uniform(rng) * max_piece);
        if (k > n - i) k = n - i;
        JsonPrefix copy = p;  // a refused piece leaves the state as it was on the copy's side
        if (json_prefix_feed(&copy, s + i, k)) return -1;
        p = copy;
        i += k;
    }
    return json_prefix_complete(&p);
}

static int jansson_object(const char *s, size_t n) {
    json_t *o = json_loadb(s, n, 0, NULL);
    int ok = o && json_is_object(o);
    json_decref(o);
    return ok;
}

TEST(test_json_prefix_valid_objects) {
    static const char *const good[] = {
        "{}", " \n{ }", "{\"a\": 1}", "{\"a\":-0.5e+10,\"b\":[1,2.25,-3E-2,0]}", "{\"k\": [true, false, null, {}, []]}",
        "{\"s\": \"tab\\tquote\\\" back\\\\ slash\\/ \\u00e9 \\ud83d\\ude00\"}", "{\"\xc3\xa9t\xc3\xa9\": \"\xe2\x82\xac \xf0\x9f\x98\x80\"}",
        "{\"nest\": {\"a\": {\"b\": [[[\"deep\"]]]}}}", "{\"n\": 0, \"m\": 10, \"e\": 1e5, \"z\": 0.0, \"big\": 123456789012345678, \"x\": -9.5E-99}", "{\"\": \"\"}",
        "{} \n",
    };
    Rng rng;
    rng_seed(&rng, 7);
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        size_t n = strlen(good[i]);
        CHECK_MSG(jansson_object(good[i], n), "jansson refuses %s", good[i]);
        for (int split = 1; split <= 8; split++)
            CHECK_MSG(feed_split(good[i], n, &rng, split) == 1, "%s in pieces of up to %d bytes", good[i], split);
        for (size_t k = 0; k < n; k++) {  // every proper prefix is a prefix, complete only before trailing space
            int complete = good[i][n - 1] == '}' ? 0 : k >= (size_t)(strrchr(good[i], '}') - good[i]) + 1;
            CHECK_MSG(feed_split(good[i], k, &rng, 3) == complete, "%.*s (prefix of %s)", (int)k, good[i], good[i]);
        }
    }
}

TEST(test_json_prefix_refuses) {
    static const char *const bad[] = {
        "[1]", "x", "{\"a\":01}", "{\"a\":1,}", "{\"a\" 1}", "{,}", "{\"a\":\"\x01\"}", "{\"a\":\"\\ud800\"}",
        "{\"a\":\"\\udc00\"}", "{\"a\":\"\\ud800\\u0041\"}", "{\"a\":\"\xc0\x80\"}", "{\"a\":\"\xed\xa0\x80\"}",
        "{\"a\":\"\xf4\x90\x80\x80\"}", "{}x", "{} x", "{\"a\":1.}", "{\"a\":-}", "{\"a\":1e}", "{\"a\":.5}", "{\"a\":+1}",
        "{\"a\":tru}", "{\"a\":True}", "{\"a\":\"\\u0000\"}", "{\"\\u0000\":1}", "{\"a\":1e100}", "{\"a\":1234567890123456789}", "{\"a\":-1E+999}", "{'a':1}", "{\"a\":[1 2]}", "{\"a\":\"\\x\"}", "{\"a\":1}}", "{\"a\":[}",
        "{                  }",  // more whitespace in a row than the limit
    };
    Rng rng;
    rng_seed(&rng, 3);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_MSG(feed_split(bad[i], strlen(bad[i]), &rng, 4) != 1, "%s was taken for an object", bad[i]);
    // depth: JSON_PREFIX_MAX_DEPTH containers open, not one more
    char deep[256] = "";
    for (int i = 0; i < JSON_PREFIX_MAX_DEPTH; i++) strcat(deep, i ? "[" : "{\"a\":");
    CHECK(feed_split(deep, strlen(deep), &rng, 2) == 0);
    strcat(deep, "[");
    CHECK(feed_split(deep, strlen(deep), &rng, 2) == -1);
}

// Random strings of JSON-ish fragments: the automaton and jansson agree on which are objects.
TEST(test_json_prefix_agrees_with_jansson) {
    static const char *const frag[] = {
        "{", "}", "[", "]", ":", ",", " ", "\n", "\"k\"", "\"a b\"", "1", "-2", "0", "3.5", "1e3 ", "-0.25E-2 ", "true",
        "false", "null", "\"\\n\"", "\"\\u00e9\"", "\"\\u0000\"", "\"\xc3\xa9\"", "\"", "\\", "e", ".", "-", "01", "\"\\ud83d\\ude00\"",
    };
    int nf = (int)(sizeof frag / sizeof frag[0]), objects = 0, prefixes = 0;
    Rng rng;
    rng_seed(&rng, 11);
    char s[512];
    for (int t = 0; t < 200000; t++) {
        size_t n = 0;
        int pieces = 1 + (int)(rng_uniform(&rng) * 10);
        // start like an object most of the time, so that some strings are objects
        if (rng_uniform(&rng) < 0.9) s[n++] = '{';
        for (int k = 0; k < pieces; k++) {
            const char *f = frag[(int)(rng_uniform(&rng) * nf)];
            size_t fl = strlen(f);
            memcpy(s + n, f, fl);
            n += fl;
        }
        if (rng_uniform(&rng) < 0.5) s[n++] = '}';
        s[n] = 0;
        int mine = feed_split(s, n, &rng, 5), theirs = jansson_object(s, n);
        CHECK_MSG((mine == 1) == theirs, "%s: automaton %d, jansson %s", s, mine, theirs ? "an object" : "not an object");
        objects += theirs;
        prefixes += mine == 0;
    }
    printf("    200000 random strings: %d objects, %d proper prefixes, all agreeing with jansson\n", objects, prefixes);
    CHECK(objects > 500 && prefixes > 1000);
}
