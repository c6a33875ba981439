/*
 * device.c: an example Furrow device on POSIX: readings from a counter,
 * commands answered, the outbox in a file, plain TCP or mutual TLS.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * It shows the shape of firmware on the library: static buffers, a port, a
 * storage, callbacks, and a main loop that calls furrow_poll() and sleeps
 * for what it returns (here in poll(2); on an RTOS, a task delay or an
 * event wait). It is also what sdk/c/tests/gateway_test.py drives against
 * a real gateway, and what measures throughput (--count N without --rate).
 *
 *   device --host 127.0.0.1 --port 7700 --id pump-17 --token T --count 1000
 *   device ... --tls --ca ca.pem --cert pump-17.pem --key pump-17.key
 *
 * Output: one line per event on stderr; on stdout, lines a script can
 * read: "CONNECTED ...", "COMMAND ...", "RESULT ...".
 */
#define _POSIX_C_SOURCE 200809L

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "furrow.h"
#include "furrow_posix.h"
#include "furrow_storage_ram.h"
#ifdef FURROW_EXAMPLE_TLS
#include "furrow_mbedtls.h"
#endif

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

typedef struct {
    char token[257];
    int quiet;
    int commands_answered;
    uint64_t last_acked;
    uint16_t window;
} app_state;

static void on_event(void *user, const furrow_event *ev)
{
    app_state *app = (app_state *)user;
    switch (ev->kind) {
    case FURROW_EV_CONNECTED:
        app->window = ev->code;
        printf("CONNECTED last_seq=%llu max_inflight=%u\n", (unsigned long long)ev->seq,
               (unsigned)ev->code);
        fflush(stdout);
        break;
    case FURROW_EV_DISCONNECTED:
        fprintf(stderr, "device: disconnected: %s (code %u%s%.*s), retry in %lu ms\n",
                furrow_strerror(ev->reason), (unsigned)ev->code, ev->text.len ? ": " : "",
                (int)ev->text.len, (const char *)ev->text.data, (unsigned long)ev->retry_in_ms);
        break;
    case FURROW_EV_ACKED:
        app->last_acked = ev->seq;
        break;
    case FURROW_EV_REJECTED:
        fprintf(stderr, "device: seq %llu rejected (code %u): %.*s\n",
                (unsigned long long)ev->seq, (unsigned)ev->code, (int)ev->text.len,
                (const char *)ev->text.data);
        break;
    case FURROW_EV_DESIRED:
        fprintf(stderr, "device: desired state v%llu: %.*s\n", (unsigned long long)ev->seq,
                (int)ev->text.len, (const char *)ev->text.data);
        break;
    default:
        break;
    }
}

/* The value of "token" in a small JSON object, without a JSON parser. */
static int json_token(const furrow_bytes *b, char *out, size_t cap)
{
    const char *s = (const char *)b->data, *end = s + b->len;
    const char *k;
    size_t n = 0;
    for (k = s; k + 7 <= end; k++)
        if (memcmp(k, "\"token\"", 7) == 0)
            break;
    if (k + 7 > end)
        return 0;
    for (k += 7; k < end && (*k == ' ' || *k == ':'); k++) {
    }
    if (k >= end || *k++ != '"')
        return 0;
    while (k < end && *k != '"' && n + 1 < cap)
        out[n++] = *k++;
    if (k >= end || n == 0)
        return 0;
    out[n] = '\0';
    return 1;
}

static void on_command(void *user, const furrow_command *cmd, furrow_result *res)
{
    app_state *app = (app_state *)user;
    printf("COMMAND id=%llu name=%.*s repeated=%u\n", (unsigned long long)cmd->id,
           (int)cmd->name.len, (const char *)cmd->name.data, (unsigned)cmd->repeated);
    fflush(stdout);
    app->commands_answered++;
    if (cmd->name.len == 4 && memcmp(cmd->name.data, "echo", 4) == 0 &&
        cmd->payload.len <= res->capacity) {
        /* Answer with the arguments, as they came. */
        memcpy(res->payload, cmd->payload.data, cmd->payload.len);
        res->len = cmd->payload.len;
        res->content_type = cmd->content_type;
        res->status = FURROW_STATUS_SUCCEEDED;
    } else if (cmd->name.len == 12 && memcmp(cmd->name.data, "furrow.token", 12) == 0) {
        /* A rotated token: used from the next connection on (the config
         * points at app->token). A real device persists it first. */
        char fresh[sizeof app->token];
        if (json_token(&cmd->payload, fresh, sizeof fresh)) {
            memcpy(app->token, fresh, sizeof fresh);
            res->status = FURROW_STATUS_SUCCEEDED;
            res->content_type = FURROW_CT_JSON;
            memcpy(res->payload, "{}", 2);
            res->len = 2;
        } else {
            res->status = FURROW_STATUS_FAILED;
        }
    }
    /* Anything else: the preset answer, unknown command. */
}

static void usage(void)
{
    fprintf(stderr,
            "usage: device --host H --port P --id ID [--token T] [--outbox FILE] [--sync]\n"
            "              [--pages N] [--page-size BYTES] [--count N] [--rate PER_S]\n"
            "              [--keepalive S] [--backoff-max MS] [--timeout-ms MS] [--state]\n"
            "              [--exit-after-commands N] [--quiet]\n"
#ifdef FURROW_EXAMPLE_TLS
            "              [--tls --ca CA.pem [--cert C.pem --key K.pem] [--server-name N]]\n"
#endif
    );
    exit(2);
}

int main(int argc, char **argv)
{
    static uint8_t rx[4096], tx[16384];
    const char *host = "127.0.0.1", *service = "7700", *id = NULL, *outbox = NULL;
    const char *ca = NULL, *cert = NULL, *key = NULL, *server_name = "localhost";
    long count = 0, rate = 0, exit_after_commands = -1;
    unsigned long timeout_ms = 60000, pages = 64, page_size = 16384;
    int tls = 0, sync = 0, i, fd;
    static app_state app;
    furrow_config cfg;
    furrow_client client;
    furrow_posix_socket sock;
#ifdef FURROW_EXAMPLE_TLS
    static furrow_mbedtls tls_port;
#endif
    furrow_file_storage fs;
    furrow_ram_storage rs;
    uint8_t *ram = NULL;
    uint32_t start, first_push = 0, done_at = 0;
    long pushed = 0;
    int32_t r;
    char payload[64];

    memset(&cfg, 0, sizeof cfg);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1;
        if (!strcmp(a, "--host") && v) host = v;
        else if (!strcmp(a, "--port") && v) service = v;
        else if (!strcmp(a, "--id") && v) id = v;
        else if (!strcmp(a, "--token") && v) snprintf(app.token, sizeof app.token, "%s", v);
        else if (!strcmp(a, "--outbox") && v) outbox = v;
        else if (!strcmp(a, "--pages") && v) pages = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--page-size") && v) page_size = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--count") && v) count = strtol(v, NULL, 10);
        else if (!strcmp(a, "--rate") && v) rate = strtol(v, NULL, 10);
        else if (!strcmp(a, "--keepalive") && v) cfg.keepalive_s = (uint16_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--backoff-max") && v) cfg.backoff_max_ms = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--timeout-ms") && v) timeout_ms = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--exit-after-commands") && v) exit_after_commands = strtol(v, NULL, 10);
        else if (!strcmp(a, "--ca") && v) ca = v;
        else if (!strcmp(a, "--cert") && v) cert = v;
        else if (!strcmp(a, "--key") && v) key = v;
        else if (!strcmp(a, "--server-name") && v) server_name = v;
        else {
            takes = 0;
            if (!strcmp(a, "--sync")) sync = 1;
            else if (!strcmp(a, "--tls")) tls = 1;
            else if (!strcmp(a, "--state")) cfg.capabilities = FURROW_CAP_STATE;
            else if (!strcmp(a, "--quiet")) app.quiet = 1;
            else usage();
        }
        i += takes;
    }
    if (!id || pages < 2 || pages > 65535 || count < 0)
        usage();

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    /* The outbox: a file (survives a restart of this process), or RAM. */
    if (outbox) {
        r = furrow_file_storage_open(&fs, outbox, (uint32_t)page_size, (uint16_t)pages, sync);
        if (r != FURROW_OK) {
            fprintf(stderr, "device: cannot open outbox %s\n", outbox);
            return 1;
        }
        cfg.storage = &fs.storage;
    } else {
        ram = (uint8_t *)calloc(pages, page_size); /* the example may; the library never does */
        if (!ram)
            return 1;
        furrow_ram_storage_init(&rs, ram, (uint32_t)page_size, (uint16_t)pages, 4);
        cfg.storage = &rs.storage;
    }

    furrow_posix_socket_init(&sock, host, service);
    cfg.port = &sock.port;
    if (tls) {
#ifdef FURROW_EXAMPLE_TLS
        if (!ca || furrow_mbedtls_init(&tls_port, host, service, server_name, ca, cert, key) !=
                       FURROW_OK) {
            fprintf(stderr, "device: TLS setup failed (CA %s, certificate %s, key %s)\n",
                    ca ? ca : "missing", cert ? cert : "none", key ? key : "none");
            return 1;
        }
        cfg.port = &tls_port.port;
#else
        fprintf(stderr, "device: built without TLS; use device_tls\n");
        return 2;
#endif
    }
    (void)cert;
    (void)key;
    (void)server_name;
    (void)ca;

    cfg.device_id = id;
    cfg.token = app.token;
    cfg.rx_buf = rx;
    cfg.rx_size = sizeof rx;
    cfg.tx_buf = tx;
    cfg.tx_size = sizeof tx;
    cfg.on_event = on_event;
    cfg.on_command = on_command;
    cfg.user = &app;
    cfg.backoff_initial_ms = 100;

    r = furrow_init(&client, &cfg);
    if (r != FURROW_OK) {
        fprintf(stderr, "device: init: %s\n", furrow_strerror(r));
        return 1;
    }
    if (!app.quiet)
        fprintf(stderr, "device: %s, %llu readings pending in the outbox\n", id,
                (unsigned long long)furrow_pending(&client));

    start = furrow_posix_now_ms();
    for (;;) {
        uint32_t now = furrow_posix_now_ms(), wait;
        struct pollfd p;
        int state;

        if (stop_requested == 1) {
            stop_requested = 2;
            furrow_stop(&client);
        }
        /* Produce readings: at --rate, or as fast as the outbox takes them
         * (kept a few windows ahead of the gateway, not all at once). */
        while (pushed < count && stop_requested == 0) {
            uint64_t ahead = furrow_pending(&client);
            int n;
            if (rate > 0 && (uint64_t)pushed * 1000u >= (uint64_t)rate * (uint32_t)(now - start))
                break;
            if (rate <= 0 && ahead >= 4u * (app.window ? app.window : 256u))
                break;
            n = snprintf(payload, sizeof payload, "{\"n\":%ld}", pushed + 1);
            r = furrow_push(&client, furrow_posix_unix_ms(), FURROW_CT_JSON, payload, (size_t)n,
                            NULL);
            if (r == FURROW_E_FULL)
                break; /* the outbox waits for ACKs */
            if (r != FURROW_OK) {
                fprintf(stderr, "device: push: %s\n", furrow_strerror(r));
                return 1;
            }
            if (pushed++ == 0)
                first_push = now;
        }
        if (count > 0 && pushed == count && furrow_pending(&client) == 0 && !done_at &&
            stop_requested == 0) {
            uint32_t ms = now - first_push;
            done_at = now;
            printf("RESULT acked=%ld elapsed_ms=%lu rate=%.0f max_inflight=%u\n", count,
                   (unsigned long)ms, ms ? (double)count * 1000.0 / ms : 0.0,
                   (unsigned)app.window);
            fflush(stdout);
            stop_requested = 1;
            continue;
        }
        if (exit_after_commands >= 0 && app.commands_answered >= exit_after_commands &&
            !furrow_wants_write(&client) && stop_requested == 0) {
            stop_requested = 1; /* the answer is out: say GOODBYE */
            continue;
        }

        wait = furrow_poll(&client, now);
        state = furrow_state(&client);
        if (state == FURROW_STATE_STOPPED)
            break;
        if ((uint32_t)(now - start) > timeout_ms) {
            fprintf(stderr, "device: timed out after %lu ms with %llu readings unacknowledged\n",
                    timeout_ms, (unsigned long long)furrow_pending(&client));
            return 3;
        }
        if (rate > 0 && pushed < count && wait > 1)
            wait = 1; /* produce on time */
        if (rate <= 0 && pushed < count && furrow_pending(&client) < 4u * app.window)
            wait = 0;
        if (wait > 100)
            wait = 100;
        fd = sock.fd;
#ifdef FURROW_EXAMPLE_TLS
        if (tls) {
            fd = tls_port.tcp.fd;
            if (furrow_mbedtls_pending(&tls_port) > 0)
                wait = 0;
        }
#endif
        p.fd = fd;
        p.events = POLLIN;
        p.revents = 0;
        if (state == FURROW_STATE_CONNECTING) {
            if (wait > 2)
                wait = 2; /* TLS handshakes wait for reads too: look again soon */
            if (!tls)
                p.events |= POLLOUT;
        } else if (furrow_wants_write(&client)) {
            p.events |= POLLOUT;
        }
        (void)poll(&p, fd >= 0 ? 1 : 0, (int)wait);
    }

    if (!app.quiet)
        fprintf(stderr, "device: stopped, %llu readings pending\n",
                (unsigned long long)furrow_pending(&client));
    if (outbox)
        furrow_file_storage_close(&fs);
    free(ram);
#ifdef FURROW_EXAMPLE_TLS
    if (tls)
        furrow_mbedtls_free(&tls_port);
#endif
    return (count > 0 && !done_at) ? 4 : 0;
}
