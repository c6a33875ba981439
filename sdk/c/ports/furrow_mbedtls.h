/*
 * furrow_mbedtls.h: the porting layer over mbedTLS on a POSIX TCP socket:
 * TLS 1.2, the gateway's certificate checked against a CA, and a client
 * certificate for mutual TLS (then the token may be empty).
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * TLS lives here, outside the library: furrow_client only sees bytes. On a
 * microcontroller the same shape wraps the vendor's TLS stack (see
 * sdk/c/README.md, "TLS").
 */
#ifndef FURROW_MBEDTLS_H
#define FURROW_MBEDTLS_H

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#include "furrow_posix.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    furrow_port port;         /* hand &port to furrow_config */
    furrow_posix_socket tcp;  /* the socket under it */
    const char *server_name;  /* checked against the gateway's certificate */
    int handshaking;
    int last_error;           /* the last mbedTLS error, for diagnostics */
    mbedtls_ssl_context ssl;
    mbedtls_ssl_config conf;
    mbedtls_x509_crt ca, cert;
    mbedtls_pk_context key;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
} furrow_mbedtls;

/* host/service: where to connect; server_name: the name the gateway's
 * certificate must carry (a DNS name: mbedTLS 2 does not check IP
 * addresses); ca_file: PEM CA of the gateway; cert_file/key_file: PEM
 * client certificate and key for mutual TLS, or NULL. */
int32_t furrow_mbedtls_init(furrow_mbedtls *t, const char *host, const char *service,
                            const char *server_name, const char *ca_file, const char *cert_file,
                            const char *key_file);
void furrow_mbedtls_free(furrow_mbedtls *t);
/* Decrypted bytes mbedTLS holds: a reason to poll again without waiting
 * for the socket. */
size_t furrow_mbedtls_pending(furrow_mbedtls *t);

#ifdef __cplusplus
}
#endif

#endif
