/*
 * posix_socket.c: the porting layer over a plain, non-blocking TCP socket.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why non-blocking: furrow_poll() must never wait, so connect() returns
 * "in progress" and is finished on a later call once the socket is
 * writable; send and recv answer FURROW_E_AGAIN instead of blocking.
 * (getaddrinfo() may still block on DNS; give a numeric address where
 * that matters.)
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "furrow_posix.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

int32_t furrow_posix_connect(void *ctx)
{
    furrow_posix_socket *s = (furrow_posix_socket *)ctx;
    struct addrinfo hints, *ai = NULL;
    struct pollfd p;
    int err = 0, one = 1;
    socklen_t len = sizeof err;

    if (s->fd < 0) {
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        if (getaddrinfo(s->host, s->service, &hints, &ai) != 0 || !ai)
            return FURROW_E_IO;
        s->fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s->fd < 0) {
            freeaddrinfo(ai);
            return FURROW_E_IO;
        }
        (void)fcntl(s->fd, F_SETFL, fcntl(s->fd, F_GETFL) | O_NONBLOCK);
        (void)fcntl(s->fd, F_SETFD, FD_CLOEXEC);
        (void)setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        err = connect(s->fd, ai->ai_addr, ai->ai_addrlen) == 0 ? 0 : errno;
        freeaddrinfo(ai);
        if (err == 0)
            return FURROW_OK;
        if (err != EINPROGRESS && err != EINTR) {
            furrow_posix_close(s);
            return FURROW_E_IO;
        }
        return FURROW_E_AGAIN;
    }
    /* In progress: done once the socket is writable. */
    p.fd = s->fd;
    p.events = POLLOUT;
    p.revents = 0;
    if (poll(&p, 1, 0) == 0)
        return FURROW_E_AGAIN;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        furrow_posix_close(s);
        return FURROW_E_IO;
    }
    return FURROW_OK;
}

static int32_t sock_send(void *ctx, const uint8_t *buf, size_t len)
{
    const furrow_posix_socket *s = (const furrow_posix_socket *)ctx;
    ssize_t n;
    if (len > 0x7FFFFFFF)
        len = 0x7FFFFFFF;
    n = send(s->fd, buf, len, MSG_NOSIGNAL);
    if (n > 0)
        return (int32_t)n;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return FURROW_E_AGAIN;
    return FURROW_E_IO;
}

static int32_t sock_recv(void *ctx, uint8_t *buf, size_t len)
{
    const furrow_posix_socket *s = (const furrow_posix_socket *)ctx;
    ssize_t n;
    if (len > 0x7FFFFFFF)
        len = 0x7FFFFFFF;
    n = recv(s->fd, buf, len, 0);
    if (n > 0)
        return (int32_t)n;
    if (n == 0)
        return FURROW_E_CLOSED;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return FURROW_E_AGAIN;
    return FURROW_E_IO;
}

void furrow_posix_close(void *ctx)
{
    furrow_posix_socket *s = (furrow_posix_socket *)ctx;
    if (s->fd >= 0)
        (void)close(s->fd);
    s->fd = -1;
}

uint32_t furrow_posix_random(void *ctx)
{
    /* xorshift32: jitter and nonces need spread, not secrecy. */
    furrow_posix_socket *s = (furrow_posix_socket *)ctx;
    uint32_t x = s->rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    s->rng = x;
    return x;
}

void furrow_posix_socket_init(furrow_posix_socket *s, const char *host, const char *service)
{
    struct timespec ts;
    memset(s, 0, sizeof *s);
    s->host = host;
    s->service = service;
    s->fd = -1;
    (void)clock_gettime(CLOCK_REALTIME, &ts);
    s->rng = (uint32_t)ts.tv_nsec ^ ((uint32_t)getpid() << 16) ^ (uint32_t)ts.tv_sec;
    if (s->rng == 0)
        s->rng = 0x9E3779B9u;
    s->port.ctx = s;
    s->port.connect = furrow_posix_connect;
    s->port.send = sock_send;
    s->port.recv = sock_recv;
    s->port.close = furrow_posix_close;
    s->port.random = furrow_posix_random;
}

uint32_t furrow_posix_now_ms(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

uint64_t furrow_posix_unix_ms(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}
