/*
 * furrow_posix.h: POSIX ports: the connection over a plain TCP socket, the
 * outbox in a file, and a millisecond clock.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Examples of the porting layer as much as ports: a vendor's TCP/IP stack
 * (lwIP, an AT-command modem) fills the same five functions.
 */
#ifndef FURROW_POSIX_H
#define FURROW_POSIX_H

#include "furrow.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A non-blocking TCP connection to host:service (names or numbers). */
typedef struct {
    furrow_port port; /* hand &port to furrow_config */
    const char *host;
    const char *service;
    int fd;           /* -1 when closed */
    uint32_t rng;     /* xorshift state for port.random */
} furrow_posix_socket;

void furrow_posix_socket_init(furrow_posix_socket *s, const char *host, const char *service);

/* The functions behind furrow_posix_socket's port, for ports that wrap a
 * TCP socket in something (furrow_mbedtls). */
int32_t furrow_posix_connect(void *ctx);
void furrow_posix_close(void *ctx);
uint32_t furrow_posix_random(void *ctx);

/* The outbox in a file of page_size * page_count bytes (created erased,
 * 0xFF). With sync, every write and erase is followed by fdatasync, which
 * is what survives a power cut (not only a crash of the process). */
typedef struct {
    furrow_storage storage; /* hand &storage to furrow_config */
    int fd;
    int sync;
} furrow_file_storage;

int32_t furrow_file_storage_open(furrow_file_storage *fs, const char *path, uint32_t page_size,
                                 uint16_t page_count, int sync);
void furrow_file_storage_close(furrow_file_storage *fs);

/* CLOCK_MONOTONIC in milliseconds (wraps at 2^32, as furrow_poll expects),
 * and the wall clock in Unix milliseconds, for reading timestamps. */
uint32_t furrow_posix_now_ms(void);
uint64_t furrow_posix_unix_ms(void);

#ifdef __cplusplus
}
#endif

#endif
