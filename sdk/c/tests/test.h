/*
 * test.h: a minimal test runner: checks that report file and line and
 * count failures, and a registry the runner walks.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why not cmocka: nothing to install or link, and the tests build with the
 * same flags as the library (-std=c99 -pedantic), sanitizers included.
 */
#ifndef FURROW_TEST_H
#define FURROW_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

extern int test_failures;
extern const char *test_current;

void test_fail(const char *file, int line, const char *what);
void test_fail_u64(const char *file, int line, const char *what, uint64_t got, uint64_t want);
void test_fail_mem(const char *file, int line, const char *what, const uint8_t *got, size_t got_len,
                   const uint8_t *want, size_t want_len);

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond))                                                                           \
            test_fail(__FILE__, __LINE__, #cond);                                              \
    } while (0)

#define CHECK_EQ(got, want)                                                                    \
    do {                                                                                       \
        uint64_t got_ = (uint64_t)(got), want_ = (uint64_t)(want);                             \
        if (got_ != want_)                                                                     \
            test_fail_u64(__FILE__, __LINE__, #got " == " #want, got_, want_);                 \
    } while (0)

#define CHECK_MEM(got, got_len, want, want_len)                                                \
    do {                                                                                       \
        size_t gl_ = (size_t)(got_len), wl_ = (size_t)(want_len);                              \
        if (gl_ != wl_ || (wl_ > 0 && memcmp((got), (want), wl_) != 0))                        \
            test_fail_mem(__FILE__, __LINE__, #got " == " #want, (const uint8_t *)(got), gl_,  \
                          (const uint8_t *)(want), wl_);                                       \
    } while (0)

/* n bytes big-endian at p. */
uint64_t test_be(const uint8_t *p, unsigned n);

/* Hex text ("00 0a ff") to bytes: returns the count, or -1. */
long test_unhex(const char *hex, uint8_t *out, size_t cap);

/* The suites (tests/test_*.c). */
void suite_frame(void);
void suite_vectors(const char *path);
void suite_outbox(void);
void suite_client(void);

/* Writes every vector of the file as a fuzzing seed into dir. */
int write_corpus(const char *vectors, const char *dir);

#define RUN(fn)                                                                                \
    do {                                                                                       \
        int before_ = test_failures;                                                           \
        test_current = #fn;                                                                    \
        fn();                                                                                  \
        if (test_failures == before_)                                                          \
            test_passed++;                                                                     \
        else                                                                                   \
            test_failed_names(#fn);                                                            \
    } while (0)

extern int test_passed;
void test_failed_names(const char *name);

#endif
