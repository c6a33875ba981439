/*
 * fuzz_client.c: libFuzzer target for the client's state machine: the
 * input is what a (hostile or broken) gateway sends after a valid WELCOME.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * The first input byte picks the read size (1 to 64 bytes per recv) and
 * whether STATE is asked for and granted, so frames split anywhere and the
 * device state paths are explored. The client must never crash, never
 * write outside its buffers (the sanitizers watch), never program a flash
 * byte twice, and never acknowledge in its outbox more than it sent.
 */
#include <stdlib.h>
#include <string.h>

#include "furrow.h"
#include "furrow_storage_ram.h"

typedef struct {
    furrow_port port;
    const uint8_t *in;
    size_t in_len, in_off, chunk;
    size_t sent;
} fport;

static int32_t p_connect(void *ctx)
{
    (void)ctx;
    return FURROW_OK;
}

static int32_t p_send(void *ctx, const uint8_t *buf, size_t len)
{
    fport *p = (fport *)ctx;
    (void)buf;
    p->sent += len;
    return (int32_t)len;
}

static int32_t p_recv(void *ctx, uint8_t *buf, size_t len)
{
    fport *p = (fport *)ctx;
    size_t n = p->in_len - p->in_off;
    if (n == 0)
        return FURROW_E_AGAIN;
    if (n > len)
        n = len;
    if (n > p->chunk)
        n = p->chunk;
    memcpy(buf, p->in + p->in_off, n);
    p->in_off += n;
    return (int32_t)n;
}

static void p_close(void *ctx)
{
    fport *p = (fport *)ctx;
    p->in_off = p->in_len; /* the rest of the stream died with the connection */
}

static uint32_t p_random(void *ctx)
{
    (void)ctx;
    return 12345;
}

static void on_command(void *user, const furrow_command *cmd, furrow_result *res)
{
    (void)user;
    if (cmd->payload.len <= res->capacity) {
        memcpy(res->payload, cmd->payload.data, cmd->payload.len);
        res->len = cmd->payload.len;
        res->status = FURROW_STATUS_SUCCEEDED;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t mem[4 * 512], rx[256], tx[512], stream[4096];
    /* WELCOME: keepalive 30, max_frame 65536, max_inflight 4, last_seq 0. */
    static const uint8_t welcome[] = {0, 0, 0, 0x1f, 2, 0, 1, 0, 30, 0, 1, 0, 0, 0, 4,
                                      0, 0, 0, 0,    0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0,
                                      0, 0, 0, 0,    0};
    furrow_ram_storage rs;
    furrow_config cfg;
    furrow_client c;
    fport p;
    uint32_t now = 1000;
    int i, state;

    if (size < 1 || size > sizeof stream - sizeof welcome)
        return 0;
    state = data[0] & 0x80;
    memcpy(stream, welcome, sizeof welcome);
    stream[sizeof welcome - 1] = state ? 1 : 0; /* capabilities granted */
    memcpy(stream + sizeof welcome, data + 1, size - 1);

    memset(mem, 0xFF, sizeof mem);
    furrow_ram_storage_init(&rs, mem, 512, 4, 4);
    memset(&p, 0, sizeof p);
    p.port.ctx = &p;
    p.port.connect = p_connect;
    p.port.send = p_send;
    p.port.recv = p_recv;
    p.port.close = p_close;
    p.port.random = p_random;
    p.in = stream;
    p.in_len = sizeof welcome + size - 1;
    p.chunk = 1u + (data[0] & 0x3F);

    memset(&cfg, 0, sizeof cfg);
    cfg.device_id = "fuzz-1";
    cfg.token = "t";
    cfg.port = &p.port;
    cfg.storage = &rs.storage;
    cfg.rx_buf = rx;
    cfg.rx_size = sizeof rx;
    cfg.tx_buf = tx;
    cfg.tx_size = sizeof tx;
    cfg.on_command = on_command;
    cfg.capabilities = state ? FURROW_CAP_STATE : 0;
    if (furrow_init(&c, &cfg) != FURROW_OK)
        abort();
    for (i = 0; i < 8; i++)
        (void)furrow_push(&c, 0, FURROW_CT_JSON, "{}", 2, NULL);
    if (state)
        (void)furrow_report(&c, 0, "{}", 2, NULL);
    for (i = 0; i < 200 && p.in_off < p.in_len; i++) {
        (void)furrow_poll(&c, now);
        now += 7;
        if (furrow_outbox_acked(&c.ob) > c.sent && furrow_state(&c) == FURROW_STATE_ONLINE)
            abort(); /* an ACK beyond what was sent took readings out */
    }
    if (rs.violations != 0)
        abort();
    return 0;
}
