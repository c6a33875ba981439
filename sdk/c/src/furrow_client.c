/*
 * furrow_client.c: the device side of a furrow/1 session, a state machine
 * driven by furrow_poll() (docs/protocol.md, "Session" to "Closing").
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why a poll-driven state machine: a microcontroller's main loop or RTOS
 * task owns the CPU, so the library never waits. Each furrow_poll() does
 * what can be done now (connect, send what is queued, read and handle
 * what arrived, fill the window from the outbox, ping) and says how long
 * until it must run again.
 *
 * The promise it keeps is the gateway's: a reading stays in the outbox
 * until an ACK covers it; after any disconnect the next WELCOME's last_seq
 * says what the gateway already has, and the rest is sent again in order.
 * The gateway stores each seq once, so nothing is lost or stored twice.
 *
 * Buffers: frames are decoded in place in the receive buffer; everything
 * sent is built in the send buffer (readings are read from storage straight
 * into it, command results are written into it by the application). A
 * received frame that needs an answer waits in the receive buffer until
 * the send buffer has room for that answer, so nothing is ever dropped for
 * want of space, and the gateway's flow control does the rest.
 */
#include <string.h>

#include "furrow_internal.h"

#define CLOSE_WAIT_MS 5000u

/* Wrap-safe: whether the clock has reached t. */
static int due(const furrow_client *c, uint32_t t)
{
    return (int32_t)(c->now - t) >= 0;
}

uint32_t furrow_backoff_delay(uint32_t initial_ms, uint32_t max_ms, uint32_t attempt,
                              uint32_t random)
{
    uint32_t ceiling = initial_ms < max_ms ? initial_ms : max_ms;
    while (attempt-- > 0 && ceiling < max_ms)
        ceiling = ceiling > max_ms / 2 ? max_ms : ceiling * 2;
    return ceiling == UINT32_MAX ? random : random % (ceiling + 1);
}

static void notify(const furrow_client *c, furrow_event *ev, uint8_t kind, uint64_t seq,
                   uint16_t code, const furrow_bytes *text)
{
    ev->kind = kind;
    ev->seq = seq;
    ev->code = code;
    if (text)
        ev->text = *text;
    if (c->cfg->on_event)
        c->cfg->on_event(c->cfg->user, ev);
}

static void emit(const furrow_client *c, uint8_t kind, uint64_t seq, uint16_t code,
                 const furrow_bytes *text)
{
    furrow_event ev;
    memset(&ev, 0, sizeof ev);
    notify(c, &ev, kind, seq, code, text);
}

/* Ends the connection and schedules the next attempt (full-jitter
 * backoff, at least the gateway's retry_after). */
static void drop(furrow_client *c, int32_t reason, uint16_t code, uint32_t retry_after,
                 const furrow_bytes *text)
{
    const furrow_config *cfg = c->cfg;
    furrow_event ev;
    uint32_t delay;

    cfg->port->close(cfg->port->ctx);
    /* A session that was welcomed resets the backoff, unless the gateway
     * ended it with ERROR: then reconnecting at once would only repeat it. */
    if (c->welcomed && reason != FURROW_E_GATEWAY)
        c->attempt = 0;
    delay = furrow_backoff_delay(cfg->backoff_initial_ms ? cfg->backoff_initial_ms : 200u,
                                 cfg->backoff_max_ms ? cfg->backoff_max_ms : 30000u,
                                 c->attempt, cfg->port->random(cfg->port->ctx));
    if (c->attempt < 32)
        c->attempt++;
    if (delay < retry_after)
        delay = retry_after;
    c->welcomed = c->blocked = c->bye = 0;
    c->rx_len = c->tx_off = c->tx_len = 0;
    c->deadline = c->now + delay;
    c->state = FURROW_STATE_DISCONNECTED;
    if (c->stop) {
        c->state = FURROW_STATE_STOPPED;
        reason = FURROW_E_STOPPED;
        delay = 0;
    }
    memset(&ev, 0, sizeof ev);
    ev.reason = reason;
    ev.retry_in_ms = delay;
    notify(c, &ev, FURROW_EV_DISCONNECTED, 0, code, text);
}

/* Free space at the end of the send buffer, after moving unsent bytes
 * to the front (usually none: the connection took everything). */
static size_t tx_room(furrow_client *c)
{
    if (c->tx_off > 0) {
        memmove(c->cfg->tx_buf, c->cfg->tx_buf + c->tx_off, c->tx_len - c->tx_off);
        c->tx_len -= c->tx_off;
        c->tx_off = 0;
    }
    return c->cfg->tx_size - c->tx_len;
}

/* Appends a message to the send buffer: FURROW_E_AGAIN if it has no room. */
static int32_t queue(furrow_client *c, const furrow_msg *m)
{
    int32_t n;
    (void)tx_room(c);
    n = furrow_encode(m, c->cfg->tx_buf + c->tx_len, c->cfg->tx_size - c->tx_len);
    if (n == FURROW_E_TOO_LARGE)
        return FURROW_E_AGAIN;
    if (n < 0)
        return n;
    c->tx_len += (uint32_t)n;
    return FURROW_OK;
}

/* PING, PONG, DESIRED_ACK: a u64 body (GOODBYE: all zero). */
static int32_t queue_u64(furrow_client *c, uint8_t type, uint64_t v)
{
    furrow_msg m;
    memset(&m, 0, sizeof m);
    m.type = type;
    m.u.ping.nonce = v;
    return queue(c, &m);
}

static int32_t flush(furrow_client *c)
{
    const furrow_port *port = c->cfg->port;
    while (c->tx_off < c->tx_len) {
        int32_t n = port->send(port->ctx, c->cfg->tx_buf + c->tx_off, c->tx_len - c->tx_off);
        if (n == FURROW_E_AGAIN)
            return FURROW_OK; /* furrow_wants_write() says so */
        if (n <= 0 || (uint32_t)n > c->tx_len - c->tx_off)
            return n < 0 ? n : FURROW_E_IO;
        c->tx_off += (uint32_t)n;
        c->last_tx = c->now;
    }
    return FURROW_OK;
}

static int32_t send_hello(furrow_client *c)
{
    const furrow_config *cfg = c->cfg;
    furrow_msg m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_HELLO;
    m.u.hello.version = FURROW_PROTOCOL_VERSION;
    m.u.hello.keepalive_s = cfg->keepalive_s;
    m.u.hello.device_id.data = (const uint8_t *)cfg->device_id;
    m.u.hello.device_id.len = strlen(cfg->device_id);
    m.u.hello.token.data = (const uint8_t *)cfg->token;
    m.u.hello.token.len = strlen(cfg->token);
    /* Firmware is never asked for; STATE unless an older gateway refused
     * capabilities (docs/protocol.md, "Capabilities"). */
    m.u.hello.capabilities = cfg->capabilities & FURROW_CAP_STATE;
    m.has_caps = m.u.hello.capabilities != 0 && !c->no_caps;
    return queue(c, &m);
}

static void on_welcome(furrow_client *c, const furrow_msg *m)
{
    uint32_t ka = m->u.welcome.keepalive_s ? m->u.welcome.keepalive_s : 1u;
    c->keepalive_ms = ka * 1000u;
    c->window = m->u.welcome.max_inflight ? m->u.welcome.max_inflight : 1u;
    c->max_frame = m->u.welcome.max_frame;
    /* Without the capabilities field, furrow_decode() leaves them 0. */
    c->caps = (uint8_t)(m->u.welcome.capabilities & c->cfg->capabilities & FURROW_CAP_STATE);
    c->no_state = (c->cfg->capabilities & FURROW_CAP_STATE) && !c->caps;
    c->welcomed = 1;
    (void)furrow_outbox_welcome(&c->ob, m->u.welcome.last_seq);
    c->sent = furrow_outbox_acked(&c->ob);
    c->state = FURROW_STATE_ONLINE;
    emit(c, FURROW_EV_CONNECTED, m->u.welcome.last_seq, c->window, NULL);
}

static int remembered(const furrow_client *c, uint64_t id)
{
    unsigned i;
    for (i = 0; i < FURROW_CMD_MEMORY; i++)
        if (c->cmd_ids[i] == id && id != 0)
            return 1;
    return 0;
}

/* furrow_command starts with a COMMAND's fields, in its order: one copy
 * hands them over (a compile error if the layouts ever drift apart). */
#define CMD_OFF(f) (offsetof(furrow_msg, u.command.f) - offsetof(furrow_msg, u.command))
typedef char furrow_command_layout[offsetof(furrow_command, name) == CMD_OFF(name) &&
                                   offsetof(furrow_command, content_type) == CMD_OFF(content_type) &&
                                   offsetof(furrow_command, payload) == CMD_OFF(payload) &&
                                   sizeof(furrow_command) >= sizeof(((furrow_msg *)0)->u.command)
                                       ? 1 : -1];

static int32_t on_command(furrow_client *c, const furrow_msg *m)
{
    furrow_command cmd;
    furrow_result res;
    furrow_msg a;
    int32_t r;

    /* The result is written in place behind a COMMAND_RESULT header
     * (6 + 8 + 1 + 1 bytes), so the whole send buffer must be free. */
    if (tx_room(c) < c->cfg->tx_size)
        return FURROW_E_AGAIN;
    memcpy(&cmd, &m->u.command, sizeof m->u.command);
    cmd.repeated = (uint8_t)remembered(c, cmd.id);
    res.status = FURROW_STATUS_UNKNOWN;
    res.content_type = FURROW_CT_OCTETS;
    res.payload = c->cfg->tx_buf + 16;
    res.capacity = c->cfg->tx_size - 16;
    res.len = 0;
    if (c->cfg->on_command)
        c->cfg->on_command(c->cfg->user, &cmd, &res);
    if (res.status > FURROW_STATUS_UNKNOWN || res.len > res.capacity) {
        res.status = FURROW_STATUS_FAILED; /* the application broke the contract */
        res.len = 0;
    }
    memset(&a, 0, sizeof a);
    a.type = FURROW_MSG_COMMAND_RESULT;
    a.u.command_result.command_id = cmd.id;
    a.u.command_result.status = res.status;
    a.u.command_result.content_type = res.content_type;
    a.u.command_result.payload.data = res.payload;
    a.u.command_result.payload.len = res.len;
    r = queue(c, &a);
    if (r == FURROW_OK && !cmd.repeated) {
        c->cmd_ids[c->cmd_next] = cmd.id;
        c->cmd_next = (uint8_t)((c->cmd_next + 1u) % FURROW_CMD_MEMORY);
    }
    return r;
}

/* Handles one decoded frame: FURROW_OK, FURROW_E_AGAIN (it waits for room
 * in the send buffer, nothing done yet), 1 (the connection ended), or an
 * error that ends it. */
static int32_t handle(furrow_client *c, const furrow_msg *m)
{
    uint64_t seq;

    switch (m->type) {
    case FURROW_MSG_WELCOME:
        if (c->state != FURROW_STATE_HANDSHAKE)
            return FURROW_E_UNEXPECTED;
        on_welcome(c, m);
        return FURROW_OK;
    case FURROW_MSG_ERROR:
        /* A gateway older than capabilities refuses HELLO with them. */
        if (c->state == FURROW_STATE_HANDSHAKE && m->u.error.code == FURROW_CODE_PROTOCOL_ERROR &&
            (c->cfg->capabilities & FURROW_CAP_STATE))
            c->no_caps = 1;
        drop(c, FURROW_E_GATEWAY, m->u.error.code, 0, &m->u.error.message);
        return 1;
    case FURROW_MSG_GOODBYE:
        drop(c, FURROW_E_GOODBYE, m->u.goodbye.code, m->u.goodbye.retry_after_ms, NULL);
        return 1;
    default:
        break;
    }
    if (c->state == FURROW_STATE_HANDSHAKE)
        return FURROW_E_UNEXPECTED;

    switch (m->type) {
    case FURROW_MSG_ACK:
        /* ACK n names a seq this connection sent; never trust more. */
        seq = m->u.ack.seq < c->sent ? m->u.ack.seq : c->sent;
        if (furrow_outbox_ack(&c->ob, seq) > 0)
            emit(c, FURROW_EV_ACKED, seq, 0, NULL);
        return FURROW_OK;
    case FURROW_MSG_REJECT:
        /* Dropped for good; the ACK that follows covers it in the outbox. */
        emit(c, FURROW_EV_REJECTED, m->u.reject.seq, m->u.reject.code, &m->u.reject.reason);
        return FURROW_OK;
    case FURROW_MSG_PING:
        return queue_u64(c, FURROW_MSG_PONG, m->u.ping.nonce);
    case FURROW_MSG_PONG:
        return FURROW_OK;
    case FURROW_MSG_COMMAND:
        return on_command(c, m);
    case FURROW_MSG_DESIRED:
        if (!(c->caps & FURROW_CAP_STATE))
            return FURROW_E_UNEXPECTED;
        if (tx_room(c) < 14)
            return FURROW_E_AGAIN;
        /* Each version once, in order; a repeat is confirmed again. */
        if (m->u.desired.version > c->desired) {
            c->desired = m->u.desired.version;
            emit(c, FURROW_EV_DESIRED, m->u.desired.version, 0, &m->u.desired.document);
        }
        return queue_u64(c, FURROW_MSG_DESIRED_ACK, m->u.desired.version);
    default:
        return FURROW_E_UNEXPECTED; /* a device's message, or firmware */
    }
}

/* Handles every complete frame in the receive buffer. */
static int32_t process(furrow_client *c)
{
    uint8_t *rx = c->cfg->rx_buf;
    uint32_t off = 0;
    int32_t r = FURROW_OK;

    c->blocked = 0;
    while (off < c->rx_len) {
        furrow_msg m;
        /* The receive buffer is the frame size limit. */
        int32_t n = furrow_decode(rx + off, c->rx_len - off, (uint32_t)c->cfg->rx_size - 4, &m);
        if (n == FURROW_E_AGAIN)
            break;
        if (n < 0)
            return n;
        r = handle(c, &m);
        if (r == 1)
            return 1; /* dropped: the buffers are reset */
        if (r == FURROW_E_AGAIN) {
            c->blocked = 1;
            r = FURROW_OK;
            break;
        }
        if (r < 0)
            return r;
        off += (uint32_t)n;
        c->last_rx = c->now;
    }
    if (off > 0) {
        memmove(rx, rx + off, c->rx_len - off);
        c->rx_len -= off;
    }
    return r;
}

static int32_t receive(furrow_client *c)
{
    const furrow_port *port = c->cfg->port;
    int reads;
    for (reads = 0;; reads++) {
        int32_t n = process(c);
        if (n != FURROW_OK || c->blocked)
            return n;
        if (reads == 8) { /* let the application run; come back at once */
            c->work = 1;
            return FURROW_OK;
        }
        n = port->recv(port->ctx, c->cfg->rx_buf + c->rx_len, c->cfg->rx_size - c->rx_len);
        if (n == FURROW_E_AGAIN)
            return FURROW_OK;
        if (n <= 0 || (uint32_t)n > c->cfg->rx_size - c->rx_len)
            return n < 0 ? n : FURROW_E_IO;
        c->rx_len += (uint32_t)n;
    }
}

/* Fills the window: readings from the outbox, read straight into the send
 * buffer behind their frame header. Returns 1 if the send buffer ran out
 * of room before the window or the outbox did. */
static int32_t fill(furrow_client *c)
{
    furrow_record rec;
    if (c->state != FURROW_STATE_ONLINE || c->blocked || c->stop)
        return FURROW_OK;
    (void)tx_room(c);
    while (c->sent - furrow_outbox_acked(&c->ob) < c->window) {
        size_t room = c->cfg->tx_size - c->tx_len;
        uint8_t *p = c->cfg->tx_buf + c->tx_len;
        uint16_t code;
        int32_t r = room > FURROW_HEADER_LEN
                        ? furrow_outbox_next(&c->ob, c->sent, p + FURROW_HEADER_LEN,
                                             room - FURROW_HEADER_LEN, &rec)
                        : FURROW_E_AGAIN;
        if (r == FURROW_E_AGAIN)
            return 1;
        if (r <= 0)
            return r;
        c->sent = rec.seq;
        /* Dropped unsent: a REPORT the gateway did not grant STATE for, or
         * a frame over its max_frame. */
        code = rec.kind == FURROW_REC_REPORT && !(c->caps & FURROW_CAP_STATE)
                   ? FURROW_CODE_PROTOCOL_ERROR
                   : rec.body_len + 2u > c->max_frame ? FURROW_CODE_FRAME_TOO_LARGE : 0;
        if (code != 0) {
            emit(c, FURROW_EV_REJECTED, rec.seq, code, NULL);
            continue;
        }
        furrow_put_be(p, 4, rec.body_len + 2u);
        p[4] = rec.kind == FURROW_REC_REPORT ? FURROW_MSG_REPORT : FURROW_MSG_TELEMETRY;
        p[5] = 0;
        c->tx_len += FURROW_HEADER_LEN + rec.body_len;
    }
    return FURROW_OK;
}

/* Online, the connection is dead 1.5 x keepalive after the last frame
 * received; otherwise the deadline of the state (retry, connect,
 * handshake, closing) holds. */
static uint32_t dead_at(const furrow_client *c)
{
    uint32_t ka = c->keepalive_ms;
    return c->state == FURROW_STATE_ONLINE ? c->last_rx + ka + ka / 2 : c->deadline;
}

/* A PING goes out after keepalive of silence, only online and when
 * nothing else waits to go out. */
static int pings(const furrow_client *c)
{
    return c->state == FURROW_STATE_ONLINE && c->tx_off == c->tx_len;
}

static void session(furrow_client *c)
{
    int32_t r, full;

    /* GOODBYE NORMAL: an all-zero body, like a u64 message's zero. */
    if (c->state == FURROW_STATE_CLOSING && !c->bye &&
        queue_u64(c, FURROW_MSG_GOODBYE, 0) == FURROW_OK)
        c->bye = 1;
    r = flush(c);
    if (r == FURROW_OK)
        r = receive(c);
    if (r == 1)
        return;
    full = FURROW_OK;
    if (r == FURROW_OK)
        r = full = fill(c);
    if (r == 1)
        r = FURROW_OK;
    if (r == FURROW_OK)
        r = flush(c);
    /* A frame that waited for room, or readings that did: room now? */
    if (r == FURROW_OK && c->tx_off == c->tx_len && (c->blocked || full == 1))
        c->work = 1;
    if (r == FURROW_E_CLOSED && c->state == FURROW_STATE_CLOSING)
        r = FURROW_E_STOPPED; /* the gateway closed after our GOODBYE */
    if (r < 0) {
        drop(c, r, 0, 0, NULL);
        return;
    }

    if (due(c, dead_at(c))) {
        drop(c, c->state == FURROW_STATE_ONLINE    ? FURROW_E_KEEPALIVE
                : c->state == FURROW_STATE_CLOSING ? FURROW_E_STOPPED
                                                   : FURROW_E_TIMEOUT,
             0, 0, NULL);
    } else if (pings(c) && due(c, c->last_tx + c->keepalive_ms)) {
        const furrow_port *port = c->cfg->port;
        if (queue_u64(c, FURROW_MSG_PING, port->random(port->ctx)) == FURROW_OK &&
            flush(c) != FURROW_OK)
            drop(c, FURROW_E_IO, 0, 0, NULL);
    }
}

static void connect_step(furrow_client *c)
{
    const furrow_port *port = c->cfg->port;
    int32_t r = port->connect(port->ctx);
    if (r == FURROW_E_AGAIN) {
        if (due(c, c->deadline))
            drop(c, FURROW_E_TIMEOUT, 0, 0, NULL);
        return;
    }
    if (r == FURROW_OK)
        r = send_hello(c);
    if (r != FURROW_OK) {
        drop(c, r < 0 ? r : FURROW_E_IO, 0, 0, NULL);
        return;
    }
    c->state = FURROW_STATE_HANDSHAKE;
    c->last_rx = c->last_tx = c->now;
    session(c);
}

int32_t furrow_init(furrow_client *c, const furrow_config *cfg)
{
    const furrow_port *port;
    size_t id_len, tok_len;

    if (!c || !cfg || !cfg->device_id || !cfg->token || !cfg->port || !cfg->storage ||
        !cfg->rx_buf || !cfg->tx_buf || cfg->rx_size < 64 || cfg->tx_size < 64 ||
        cfg->rx_size > 0x7FFFFFF0u || cfg->tx_size > 0x7FFFFFF0u)
        return FURROW_E_ARG;
    port = cfg->port;
    if (!port->connect || !port->send || !port->recv || !port->close || !port->random)
        return FURROW_E_ARG;
    id_len = strlen(cfg->device_id);
    tok_len = strlen(cfg->token);
    /* HELLO must fit the send buffer: 6 + 1 + 2 + 2 + id + 2 + token + 4. */
    if (!furrow_valid_device_id((const uint8_t *)cfg->device_id, id_len) || tok_len > 256 ||
        17u + id_len + tok_len > cfg->tx_size)
        return FURROW_E_ARG;
    memset(c, 0, sizeof *c);
    c->cfg = cfg;
    c->state = FURROW_STATE_DISCONNECTED;
    return furrow_outbox_open(&c->ob, cfg->storage);
}

uint32_t furrow_poll(furrow_client *c, uint32_t now_ms)
{
    uint32_t t;

    c->now = now_ms;
    c->work = 0;
    if (!c->started) { /* the first poll connects */
        c->started = 1;
        c->deadline = now_ms;
    }
    switch (c->state) {
    case FURROW_STATE_DISCONNECTED:
        if (!due(c, c->deadline))
            break;
        c->state = FURROW_STATE_CONNECTING;
        c->deadline = now_ms + (c->cfg->timeout_ms ? c->cfg->timeout_ms : 10000u);
        connect_step(c);
        break;
    case FURROW_STATE_CONNECTING:
        connect_step(c);
        break;
    case FURROW_STATE_STOPPED:
        return UINT32_MAX;
    default:
        session(c);
        break;
    }

    if (c->work)
        return 0;
    if (c->state == FURROW_STATE_STOPPED)
        return UINT32_MAX;
    t = dead_at(c); /* or the next PING, if earlier */
    if (pings(c) && (int32_t)(c->last_tx + c->keepalive_ms - t) < 0)
        t = c->last_tx + c->keepalive_ms;
    return due(c, t) ? 0 : t - c->now;
}

/* Every record must fit an empty send buffer behind its frame header. */
static int32_t push(furrow_client *c, uint8_t kind, uint64_t timestamp_ms, uint8_t content_type,
                    const void *payload, size_t len, uint64_t *seq)
{
    if (len > c->cfg->tx_size - FURROW_HEADER_LEN - 17u)
        return FURROW_E_ARG;
    return furrow_outbox_append(&c->ob, kind, timestamp_ms, content_type, payload, len, seq);
}

int32_t furrow_push(furrow_client *c, uint64_t timestamp_ms, uint8_t content_type,
                    const void *payload, size_t len, uint64_t *seq)
{
    return push(c, FURROW_REC_TELEMETRY, timestamp_ms, content_type, payload, len, seq);
}

int32_t furrow_report(furrow_client *c, uint64_t timestamp_ms, const void *patch, size_t len,
                      uint64_t *seq)
{
    if (!(c->cfg->capabilities & FURROW_CAP_STATE) || c->no_state)
        return FURROW_E_STATE;
    return push(c, FURROW_REC_REPORT, timestamp_ms, 0, patch, len, seq);
}

void furrow_stop(furrow_client *c)
{
    c->stop = 1;
    if (c->state == FURROW_STATE_ONLINE) {
        /* GOODBYE goes out at the next poll; then read until the gateway
         * has ACKed what it read and closed. */
        c->state = FURROW_STATE_CLOSING;
        c->deadline = c->now + CLOSE_WAIT_MS;
    } else if (c->state != FURROW_STATE_STOPPED && c->state != FURROW_STATE_CLOSING) {
        drop(c, FURROW_E_STOPPED, 0, 0, NULL);
    }
}

int furrow_state(const furrow_client *c)
{
    return c->state;
}

int furrow_wants_write(const furrow_client *c)
{
    return c->state == FURROW_STATE_CONNECTING || c->tx_off < c->tx_len;
}

uint64_t furrow_pending(const furrow_client *c)
{
    return furrow_outbox_pending(&c->ob);
}
