/*
 * test_main.c: runs every suite; prints failures and a summary.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 *   tests VECTORS_FILE              run the unit tests
 *   tests --corpus DIR VECTORS_FILE write fuzzing seeds
 */
#include <stdlib.h>

#include "test.h"

int test_failures;
int test_passed;
const char *test_current = "";

void test_fail(const char *file, int line, const char *what)
{
    test_failures++;
    fprintf(stderr, "FAIL %s: %s:%d: %s\n", test_current, file, line, what);
}

void test_fail_u64(const char *file, int line, const char *what, uint64_t got, uint64_t want)
{
    test_failures++;
    fprintf(stderr, "FAIL %s: %s:%d: %s: got %llu (%lld), want %llu (%lld)\n", test_current,
            file, line, what, (unsigned long long)got, (long long)got, (unsigned long long)want,
            (long long)want);
}

static void dump(const char *label, const uint8_t *p, size_t n)
{
    size_t i;
    fprintf(stderr, "    %s (%lu):", label, (unsigned long)n);
    for (i = 0; i < n && i < 96; i++)
        fprintf(stderr, " %02x", p[i]);
    fprintf(stderr, "%s\n", n > 96 ? " ..." : "");
}

void test_fail_mem(const char *file, int line, const char *what, const uint8_t *got, size_t got_len,
                   const uint8_t *want, size_t want_len)
{
    test_failures++;
    fprintf(stderr, "FAIL %s: %s:%d: %s\n", test_current, file, line, what);
    dump("got ", got, got_len);
    dump("want", want, want_len);
}

void test_failed_names(const char *name)
{
    fprintf(stderr, "  ^ in %s\n", name);
}

uint64_t test_be(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    while (n-- > 0)
        v = v << 8 | *p++;
    return v;
}

long test_unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    int nib = -1;
    for (; *hex; hex++) {
        int v;
        char ch = *hex;
        if (ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n')
            continue;
        if (ch >= '0' && ch <= '9')
            v = ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            v = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F')
            v = ch - 'A' + 10;
        else
            return -1;
        if (nib < 0) {
            nib = v;
        } else {
            if (n >= cap)
                return -1;
            out[n++] = (uint8_t)(nib << 4 | v);
            nib = -1;
        }
    }
    return nib < 0 ? (long)n : -1;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "--corpus") == 0)
        return write_corpus(argv[3], argv[2]);
    if (argc != 2) {
        fprintf(stderr, "usage: tests VECTORS_FILE | tests --corpus DIR VECTORS_FILE\n");
        return 2;
    }
    suite_frame();
    suite_vectors(argv[1]);
    suite_outbox();
    suite_client();
    printf("%d tests passed, %d failed checks\n", test_passed, test_failures);
    return test_failures == 0 ? 0 : 1;
}
