/*
 * fake.c: the scripted port and the client fixture (see fake.h).
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#include <string.h>

#include "fake.h"
#include "test.h"

static int32_t f_connect(void *ctx)
{
    fake_port *f = (fake_port *)ctx;
    f->connects++;
    if (f->connect_result == FURROW_OK)
        f->connected = 1;
    return f->connect_result;
}

static int32_t f_send(void *ctx, const uint8_t *buf, size_t len)
{
    fake_port *f = (fake_port *)ctx;
    if (!f->connected)
        return FURROW_E_IO;
    if (f->send_error)
        return f->send_error;
    if (f->send_blocked || f->send_budget == 0)
        return FURROW_E_AGAIN;
    if (f->send_max && len > f->send_max)
        len = f->send_max;
    if (f->send_budget > 0 && len > (size_t)f->send_budget)
        len = (size_t)f->send_budget;
    if (f->send_budget > 0)
        f->send_budget -= (long)len;
    if (len > sizeof f->out - f->out_len)
        return FURROW_E_IO;
    memcpy(f->out + f->out_len, buf, len);
    f->out_len += len;
    return (int32_t)len;
}

static int32_t f_recv(void *ctx, uint8_t *buf, size_t len)
{
    fake_port *f = (fake_port *)ctx;
    size_t avail = f->in_len - f->in_off;
    if (!f->connected)
        return FURROW_E_IO;
    if (avail == 0)
        return f->peer_closed ? FURROW_E_CLOSED : FURROW_E_AGAIN;
    if (len > avail)
        len = avail;
    if (f->recv_max && len > f->recv_max)
        len = f->recv_max;
    memcpy(buf, f->in + f->in_off, len);
    f->in_off += len;
    if (f->in_off == f->in_len)
        f->in_off = f->in_len = 0;
    return (int32_t)len;
}

static void f_close(void *ctx)
{
    fake_port *f = (fake_port *)ctx;
    f->closes++;
    f->connected = 0;
    f->in_len = f->in_off = 0;
    f->peer_closed = 0;
}

static uint32_t f_random(void *ctx)
{
    return ((fake_port *)ctx)->random_value;
}

void fake_init(fake_port *f)
{
    memset(f, 0, sizeof *f);
    f->port.ctx = f;
    f->port.connect = f_connect;
    f->port.send = f_send;
    f->port.recv = f_recv;
    f->port.close = f_close;
    f->port.random = f_random;
    f->random_value = 0xFFFFFFFFu;
    f->send_budget = -1;
}

void fake_feed(fake_port *f, const void *bytes, size_t n)
{
    if (n > sizeof f->in - f->in_len) {
        CHECK(!"fake port input overflow");
        return;
    }
    memcpy(f->in + f->in_len, bytes, n);
    f->in_len += n;
}

void fake_feed_msg(fake_port *f, const furrow_msg *m)
{
    uint8_t buf[2048];
    int32_t n = furrow_encode(m, buf, sizeof buf);
    CHECK(n > 0);
    if (n > 0)
        fake_feed(f, buf, (size_t)n);
}

int fake_next(fake_port *f, furrow_msg *m, uint8_t *frame, size_t *len)
{
    int32_t n;
    if (f->out_read >= f->out_len)
        return 0;
    n = furrow_decode(f->out + f->out_read, f->out_len - f->out_read, 1u << 20, m);
    if (n == FURROW_E_AGAIN)
        return 0;
    CHECK(n > 0); /* the device sends only well-formed frames */
    if (n <= 0) {
        f->out_read = f->out_len;
        return 0;
    }
    if (frame)
        memcpy(frame, f->out + f->out_read, (size_t)n);
    if (len)
        *len = (size_t)n;
    f->out_read += (size_t)n;
    return 1;
}

int fake_pending_frames(const fake_port *f)
{
    size_t off = f->out_read;
    int count = 0;
    while (off < f->out_len) {
        int32_t n = furrow_frame_check(f->out + off, f->out_len - off, 1u << 20);
        if (n <= 0 || (size_t)n > f->out_len - off)
            break;
        off += (size_t)n;
        count++;
    }
    return count;
}

static void on_event(void *user, const furrow_event *ev)
{
    fixture *x = (fixture *)user;
    fake_event *e;
    size_t n;
    if (x->nev >= (int)(sizeof x->ev / sizeof x->ev[0]))
        return;
    e = &x->ev[x->nev++];
    e->kind = ev->kind;
    e->reason = ev->reason;
    e->code = ev->code;
    e->retry_in_ms = ev->retry_in_ms;
    e->seq = ev->seq;
    n = ev->text.len;
    if (n > sizeof e->text - 1)
        n = sizeof e->text - 1;
    if (n > 0)
        memcpy(e->text, ev->text.data, n);
    e->text[n] = '\0';
}

static void on_command(void *user, const furrow_command *cmd, furrow_result *res)
{
    fixture *x = (fixture *)user;
    x->commands++;
    x->last_repeated = cmd->repeated;
    res->status = x->cmd_status;
    if (x->cmd_result) {
        size_t n = strlen(x->cmd_result);
        CHECK(n <= res->capacity);
        memcpy(res->payload, x->cmd_result, n);
        res->len = n;
        res->content_type = FURROW_CT_JSON;
    }
}

void fix_init(fixture *x, uint32_t caps)
{
    memset(x, 0, sizeof *x);
    memset(x->mem, 0xFF, sizeof x->mem);
    fake_init(&x->fp);
    furrow_ram_storage_init(&x->rs, x->mem, 1024, 8, 4);
    x->cfg.device_id = "pump-17";
    x->cfg.token = "k3y";
    x->cfg.keepalive_s = 30;
    x->cfg.capabilities = caps;
    x->cfg.port = &x->fp.port;
    x->cfg.storage = &x->rs.storage;
    x->cfg.rx_buf = x->rx;
    x->cfg.rx_size = sizeof x->rx;
    x->cfg.tx_buf = x->tx;
    x->cfg.tx_size = sizeof x->tx;
    x->cfg.on_event = on_event;
    x->cfg.on_command = on_command;
    x->cfg.user = x;
    x->cmd_status = FURROW_STATUS_SUCCEEDED;
    x->now = 1000;
    CHECK_EQ(furrow_init(&x->c, &x->cfg), FURROW_OK);
}

void fix_reboot(fixture *x)
{
    furrow_ram_storage_init(&x->rs, x->mem, 1024, 8, 4);
    CHECK_EQ(furrow_init(&x->c, &x->cfg), FURROW_OK);
}

uint32_t fix_poll(fixture *x)
{
    return furrow_poll(&x->c, x->now);
}

void fix_welcome(fixture *x, uint16_t max_inflight, uint64_t last_seq, uint32_t caps)
{
    furrow_msg m;
    int i;
    for (i = 0; i < 10 && furrow_state(&x->c) != FURROW_STATE_HANDSHAKE; i++)
        fix_poll(x);
    CHECK_EQ(furrow_state(&x->c), FURROW_STATE_HANDSHAKE);
    CHECK(fake_next(&x->fp, &m, NULL, NULL));
    CHECK_EQ(m.type, FURROW_MSG_HELLO);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_WELCOME;
    m.u.welcome.version = 1;
    m.u.welcome.keepalive_s = 30;
    m.u.welcome.max_frame = 65536;
    m.u.welcome.max_inflight = max_inflight;
    m.u.welcome.last_seq = last_seq;
    m.u.welcome.server_time_ms = 1763683200000ull;
    if (caps != 0xFFFFFFFFu) {
        m.has_caps = 1;
        m.u.welcome.capabilities = caps;
    }
    fake_feed_msg(&x->fp, &m);
    fix_poll(x);
    CHECK_EQ(furrow_state(&x->c), FURROW_STATE_ONLINE);
}

int fix_events(const fixture *x, uint8_t kind, fake_event *last)
{
    int i, n = 0;
    for (i = 0; i < x->nev; i++)
        if (x->ev[i].kind == kind) {
            n++;
            if (last)
                *last = x->ev[i];
        }
    return n;
}

void fix_feed_u64(fixture *x, uint8_t type, uint64_t v)
{
    furrow_msg m;
    memset(&m, 0, sizeof m);
    m.type = type;
    m.u.ack.seq = v;
    fake_feed_msg(&x->fp, &m);
}
