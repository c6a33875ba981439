/*
 * posix_mbedtls.c: furrow_port over mbedTLS (TLS 1.2) on a non-blocking
 * POSIX socket.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * connect() is a small state machine of its own: the TCP connect (the
 * plain socket port's), then the TLS handshake, each step answering
 * FURROW_E_AGAIN while it waits, so furrow_poll() never blocks. mbedTLS
 * reports "want read / want write" for the same reason; both map to
 * FURROW_E_AGAIN. Every reconnect resets the TLS session on the same
 * configuration (no allocation per connection beyond what mbedTLS does).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include <mbedtls/net_sockets.h>
#include <mbedtls/version.h>

#include "furrow_mbedtls.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static int bio_send(void *ctx, const unsigned char *buf, size_t len)
{
    const furrow_mbedtls *t = (const furrow_mbedtls *)ctx;
    ssize_t n = send(t->tcp.fd, buf, len, MSG_NOSIGNAL);
    if (n >= 0)
        return (int)n;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return MBEDTLS_ERR_SSL_WANT_WRITE;
    return MBEDTLS_ERR_NET_SEND_FAILED;
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len)
{
    const furrow_mbedtls *t = (const furrow_mbedtls *)ctx;
    ssize_t n = recv(t->tcp.fd, buf, len, 0);
    if (n >= 0)
        return (int)n; /* 0: the peer closed */
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return MBEDTLS_ERR_SSL_WANT_READ;
    return MBEDTLS_ERR_NET_RECV_FAILED;
}

static int want(int r)
{
    return r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE;
}

static void tls_close(void *ctx)
{
    furrow_mbedtls *t = (furrow_mbedtls *)ctx;
    if (t->tcp.fd >= 0 && !t->handshaking)
        (void)mbedtls_ssl_close_notify(&t->ssl); /* best effort */
    furrow_posix_close(&t->tcp);
    t->handshaking = 0;
}

static int32_t tls_connect(void *ctx)
{
    furrow_mbedtls *t = (furrow_mbedtls *)ctx;
    int r;
    if (!t->handshaking) {
        int32_t c = furrow_posix_connect(&t->tcp);
        if (c != FURROW_OK)
            return c;
        if (mbedtls_ssl_session_reset(&t->ssl) != 0 ||
            mbedtls_ssl_set_hostname(&t->ssl, t->server_name) != 0) {
            furrow_posix_close(&t->tcp);
            return FURROW_E_IO;
        }
        mbedtls_ssl_set_bio(&t->ssl, t, bio_send, bio_recv, NULL);
        t->handshaking = 1;
    }
    r = mbedtls_ssl_handshake(&t->ssl);
    if (want(r))
        return FURROW_E_AGAIN;
    if (r != 0) {
        t->last_error = r;
        tls_close(t);
        return FURROW_E_IO;
    }
    t->handshaking = 0;
    return FURROW_OK;
}

static int32_t tls_send(void *ctx, const uint8_t *buf, size_t len)
{
    furrow_mbedtls *t = (furrow_mbedtls *)ctx;
    int r = mbedtls_ssl_write(&t->ssl, buf, len);
    if (r > 0)
        return r;
    if (want(r))
        return FURROW_E_AGAIN;
    t->last_error = r;
    return FURROW_E_IO;
}

static int32_t tls_recv(void *ctx, uint8_t *buf, size_t len)
{
    furrow_mbedtls *t = (furrow_mbedtls *)ctx;
    int r = mbedtls_ssl_read(&t->ssl, buf, len);
    if (r > 0)
        return r;
    if (want(r))
        return FURROW_E_AGAIN;
    if (r == 0 || r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY)
        return FURROW_E_CLOSED;
    t->last_error = r;
    return FURROW_E_IO;
}

static uint32_t tls_random(void *ctx)
{
    furrow_mbedtls *t = (furrow_mbedtls *)ctx;
    return furrow_posix_random(&t->tcp);
}

int32_t furrow_mbedtls_init(furrow_mbedtls *t, const char *host, const char *service,
                            const char *server_name, const char *ca_file, const char *cert_file,
                            const char *key_file)
{
    static const char pers[] = "furrow-device";
    int r;

    memset(t, 0, sizeof *t);
    furrow_posix_socket_init(&t->tcp, host, service);
    t->server_name = server_name;
    mbedtls_ssl_init(&t->ssl);
    mbedtls_ssl_config_init(&t->conf);
    mbedtls_x509_crt_init(&t->ca);
    mbedtls_x509_crt_init(&t->cert);
    mbedtls_pk_init(&t->key);
    mbedtls_entropy_init(&t->entropy);
    mbedtls_ctr_drbg_init(&t->drbg);

    r = mbedtls_ctr_drbg_seed(&t->drbg, mbedtls_entropy_func, &t->entropy,
                              (const unsigned char *)pers, sizeof pers - 1);
    if (r == 0)
        r = mbedtls_x509_crt_parse_file(&t->ca, ca_file);
    if (r == 0 && cert_file)
        r = mbedtls_x509_crt_parse_file(&t->cert, cert_file);
    if (r == 0 && key_file)
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
        r = mbedtls_pk_parse_keyfile(&t->key, key_file, NULL, mbedtls_ctr_drbg_random, &t->drbg);
#else
        r = mbedtls_pk_parse_keyfile(&t->key, key_file, NULL);
#endif
    if (r == 0)
        r = mbedtls_ssl_config_defaults(&t->conf, MBEDTLS_SSL_IS_CLIENT,
                                        MBEDTLS_SSL_TRANSPORT_STREAM, MBEDTLS_SSL_PRESET_DEFAULT);
    if (r == 0) {
        mbedtls_ssl_conf_authmode(&t->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
        mbedtls_ssl_conf_ca_chain(&t->conf, &t->ca, NULL);
        mbedtls_ssl_conf_rng(&t->conf, mbedtls_ctr_drbg_random, &t->drbg);
        if (cert_file && key_file)
            r = mbedtls_ssl_conf_own_cert(&t->conf, &t->cert, &t->key);
    }
    if (r == 0)
        r = mbedtls_ssl_setup(&t->ssl, &t->conf);
    if (r != 0) {
        t->last_error = r;
        furrow_mbedtls_free(t);
        return FURROW_E_ARG;
    }
    t->port.ctx = t;
    t->port.connect = tls_connect;
    t->port.send = tls_send;
    t->port.recv = tls_recv;
    t->port.close = tls_close;
    t->port.random = tls_random;
    return FURROW_OK;
}

void furrow_mbedtls_free(furrow_mbedtls *t)
{
    furrow_posix_close(&t->tcp);
    mbedtls_ssl_free(&t->ssl);
    mbedtls_ssl_config_free(&t->conf);
    mbedtls_x509_crt_free(&t->ca);
    mbedtls_x509_crt_free(&t->cert);
    mbedtls_pk_free(&t->key);
    mbedtls_ctr_drbg_free(&t->drbg);
    mbedtls_entropy_free(&t->entropy);
}

size_t furrow_mbedtls_pending(furrow_mbedtls *t)
{
    return mbedtls_ssl_get_bytes_avail(&t->ssl);
}
