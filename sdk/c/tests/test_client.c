/*
 * test_client.c: the client's state machine, driven through a fake port
 * (scripted bytes in, captured bytes out) and a fake clock: handshake,
 * pipelining, ACK, REJECT, keepalive, GOODBYE, ERROR, backoff, commands,
 * device state, reconnects and resends, malformed input, back-pressure.
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#include "fake.h"
#include "test.h"

static fixture x;

static int take(uint8_t type, furrow_msg *m)
{
    furrow_msg tmp;
    if (!m)
        m = &tmp;
    if (!fake_next(&x.fp, m, NULL, NULL)) {
        test_fail(__FILE__, __LINE__, "the device sent nothing");
        return 0;
    }
    if (m->type != type)
        test_fail_u64(__FILE__, __LINE__, "type of the frame sent", m->type, type);
    return m->type == type;
}

static void push_n(int n)
{
    int i;
    for (i = 0; i < n; i++) {
        char p[16];
        int len = snprintf(p, sizeof p, "{\"i\":%d}", i);
        CHECK_EQ(furrow_push(&x.c, 0, FURROW_CT_JSON, p, (size_t)len, NULL), FURROW_OK);
    }
}

/* Takes `n` TELEMETRY frames with seqs first.., and nothing more. */
static void sent_seqs(uint64_t first, int n)
{
    furrow_msg m;
    int i;
    for (i = 0; i < n; i++)
        if (take(FURROW_MSG_TELEMETRY, &m))
            CHECK_EQ(m.u.telemetry.seq, first + (uint64_t)i);
    CHECK_EQ(fake_pending_frames(&x.fp), 0);
}

static void feed(const furrow_msg *m)
{
    fake_feed_msg(&x.fp, m);
}

static void handshake(void)
{
    furrow_msg m;
    fake_event e;
    fix_init(&x, 0);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_DISCONNECTED);
    fix_poll(&x);
    CHECK_EQ(x.fp.connects, 1);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_HANDSHAKE);
    if (take(FURROW_MSG_HELLO, &m)) {
        CHECK_EQ(m.u.hello.version, 1);
        CHECK_EQ(m.u.hello.keepalive_s, 30);
        CHECK_EQ(m.has_caps, 0);
        CHECK_MEM(m.u.hello.device_id.data, m.u.hello.device_id.len, "pump-17", 7);
        CHECK_MEM(m.u.hello.token.data, m.u.hello.token.len, "k3y", 3);
    }
    /* Nothing more until WELCOME: readings wait. */
    push_n(2);
    fix_poll(&x);
    CHECK_EQ(fake_pending_frames(&x.fp), 0);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_WELCOME;
    m.u.welcome.version = 1;
    m.u.welcome.keepalive_s = 20;
    m.u.welcome.max_frame = 65536;
    m.u.welcome.max_inflight = 7;
    feed(&m);
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_ONLINE);
    CHECK_EQ(fix_events(&x, FURROW_EV_CONNECTED, &e), 1);
    CHECK_EQ(e.seq, 0);
    CHECK_EQ(e.code, 7);
    sent_seqs(1, 2);
    /* The next call is due within the keepalive. */
    CHECK(fix_poll(&x) <= 20000);
    /* With STATE, HELLO carries it; FIRMWARE is never asked for. */
    fix_init(&x, FURROW_CAP_STATE | FURROW_CAP_FIRMWARE);
    fix_poll(&x);
    if (take(FURROW_MSG_HELLO, &m)) {
        CHECK_EQ(m.has_caps, 1);
        CHECK_EQ(m.u.hello.capabilities, FURROW_CAP_STATE);
    }
}

static void pipelining_and_cumulative_acks(void)
{
    fake_event e;
    fix_init(&x, 0);
    push_n(10);
    fix_welcome(&x, 3, 0, 0xFFFFFFFFu);
    sent_seqs(1, 3); /* the window */
    fix_poll(&x);
    CHECK_EQ(fake_pending_frames(&x.fp), 0);
    fix_feed_u64(&x, FURROW_MSG_ACK, 2);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_ACKED, &e), 1);
    CHECK_EQ(e.seq, 2);
    sent_seqs(4, 2);
    fix_feed_u64(&x, FURROW_MSG_ACK, 1); /* backwards: ignored */
    fix_feed_u64(&x, FURROW_MSG_ACK, 5);
    fix_poll(&x);
    sent_seqs(6, 3);
    /* An ACK beyond what was sent is held to what was sent. */
    fix_feed_u64(&x, FURROW_MSG_ACK, 1000);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_ACKED, &e), 3);
    CHECK_EQ(e.seq, 8);
    sent_seqs(9, 2);
    fix_feed_u64(&x, FURROW_MSG_ACK, 10);
    fix_poll(&x);
    CHECK_EQ(furrow_pending(&x.c), 0);
    CHECK_EQ(x.rs.violations, 0);
}

static void resend_after_reconnect(void)
{
    fake_event e;
    fix_init(&x, 0);
    push_n(5);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    sent_seqs(1, 5);
    fix_feed_u64(&x, FURROW_MSG_ACK, 2);
    x.fp.peer_closed = 1;
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_DISCONNECTED);
    CHECK_EQ(fix_events(&x, FURROW_EV_DISCONNECTED, &e), 1);
    CHECK_EQ(e.reason, FURROW_E_CLOSED);
    CHECK_EQ(x.fp.closes, 1);
    /* The gateway stored 3 (its ACK was lost): only 4 and 5 go again. */
    x.now += e.retry_in_ms;
    fix_welcome(&x, 10, 3, 0xFFFFFFFFu);
    sent_seqs(4, 2);
    CHECK_EQ(furrow_pending(&x.c), 2);
    /* A reboot of the device: still there, sent again. */
    fix_reboot(&x);
    CHECK(furrow_pending(&x.c) >= 2); /* ACKs are recorded now and then */
    fix_welcome(&x, 10, 3, 0xFFFFFFFFu);
    CHECK_EQ(furrow_pending(&x.c), 2);
    sent_seqs(4, 2);
}

static void reject_then_ack(void)
{
    furrow_msg m;
    fake_event e;
    fix_init(&x, 0);
    push_n(3);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    sent_seqs(1, 3);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_REJECT;
    m.u.reject.seq = 2;
    m.u.reject.code = FURROW_CODE_INVALID_PAYLOAD;
    m.u.reject.reason.data = (const uint8_t *)"not json";
    m.u.reject.reason.len = 8;
    feed(&m);
    fix_feed_u64(&x, FURROW_MSG_ACK, 3);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_REJECTED, &e), 1);
    CHECK_EQ(e.seq, 2);
    CHECK_EQ(e.code, FURROW_CODE_INVALID_PAYLOAD);
    CHECK(strcmp(e.text, "not json") == 0);
    CHECK_EQ(furrow_pending(&x.c), 0);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_ONLINE);
}

static void ping_pong_and_keepalive(void)
{
    furrow_msg m;
    fake_event e;
    uint32_t t0;
    fix_init(&x, 0);
    x.fp.random_value = 77;
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    fix_feed_u64(&x, FURROW_MSG_PING, 0xDEADBEEFull);
    fix_poll(&x);
    if (take(FURROW_MSG_PONG, &m))
        CHECK_EQ(m.u.ping.nonce, 0xDEADBEEFull);
    /* Silence: a PING after keepalive_s (30 s) of sending nothing. */
    t0 = x.now;
    x.now = t0 + 29999;
    fix_poll(&x);
    CHECK_EQ(fake_pending_frames(&x.fp), 0);
    x.now = t0 + 30000;
    CHECK(fix_poll(&x) <= 15000);
    if (take(FURROW_MSG_PING, &m))
        CHECK_EQ(m.u.ping.nonce, 77);
    /* The gateway answers: alive. */
    fix_feed_u64(&x, FURROW_MSG_PONG, 77);
    x.now = t0 + 40000;
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_ONLINE);
    /* Then nothing at all for 1.5 x keepalive: dead. */
    x.now = t0 + 40000 + 45000;
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DISCONNECTED, &e), 1);
    CHECK_EQ(e.reason, FURROW_E_KEEPALIVE);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_DISCONNECTED);
}

static void keepalive_across_clock_wrap(void)
{
    fix_init(&x, 0);
    x.now = 0xFFFFFFFFu - 10000u;
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    x.now += 30000; /* wraps past zero */
    fix_poll(&x);
    CHECK(take(FURROW_MSG_PING, NULL));
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_ONLINE);
    x.now += 16000;
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_DISCONNECTED);
}

static void goodbye_waits_retry_after(void)
{
    furrow_msg m;
    fake_event e;
    uint32_t t0, wait;
    fix_init(&x, 0);
    x.fp.random_value = 0; /* no jitter: the delay is retry_after alone */
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_GOODBYE;
    m.u.goodbye.code = FURROW_BYE_SERVER_SHUTDOWN;
    m.u.goodbye.retry_after_ms = 5000;
    feed(&m);
    t0 = x.now;
    wait = fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DISCONNECTED, &e), 1);
    CHECK_EQ(e.reason, FURROW_E_GOODBYE);
    CHECK_EQ(e.code, FURROW_BYE_SERVER_SHUTDOWN);
    CHECK_EQ(e.retry_in_ms, 5000);
    CHECK_EQ(wait, 5000);
    x.now = t0 + 4999;
    fix_poll(&x);
    CHECK_EQ(x.fp.connects, 1);
    x.now = t0 + 5000;
    fix_poll(&x);
    CHECK_EQ(x.fp.connects, 2);
    CHECK(take(FURROW_MSG_HELLO, NULL));
}

/* Failed attempts back off with full jitter, growing to the maximum;
 * a welcomed session resets it, unless it ended with ERROR. */
static void backoff_grows_and_resets(void)
{
    fake_event e;
    uint32_t attempt;
    furrow_msg m;
    fix_init(&x, 0);
    x.cfg.backoff_initial_ms = 100;
    x.cfg.backoff_max_ms = 1000;
    x.fp.random_value = 0xFFFFFFFFu;
    x.fp.connect_result = FURROW_E_IO;
    for (attempt = 0; attempt < 8; attempt++) {
        int before = fix_events(&x, FURROW_EV_DISCONNECTED, NULL);
        fix_poll(&x);
        CHECK_EQ(fix_events(&x, FURROW_EV_DISCONNECTED, &e), before + 1);
        CHECK_EQ(e.reason, FURROW_E_IO);
        CHECK_EQ(e.retry_in_ms, furrow_backoff_delay(100, 1000, attempt, 0xFFFFFFFFu));
        /* Not before the delay. */
        if (e.retry_in_ms > 0) {
            x.now += e.retry_in_ms - 1;
            fix_poll(&x);
            CHECK_EQ(x.fp.connects, (int)attempt + 1);
        }
        x.now += 1;
    }
    /* Success, then a broken connection: the backoff starts over. */
    x.fp.connect_result = FURROW_OK;
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    x.fp.peer_closed = 1;
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.retry_in_ms, furrow_backoff_delay(100, 1000, 0, 0xFFFFFFFFu));
    /* ERROR after WELCOME: no reset (it would only repeat). */
    x.now += e.retry_in_ms;
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_ERROR;
    m.u.error.code = FURROW_CODE_INTERNAL;
    feed(&m);
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.reason, FURROW_E_GATEWAY);
    CHECK_EQ(e.code, FURROW_CODE_INTERNAL);
    CHECK_EQ(e.retry_in_ms, furrow_backoff_delay(100, 1000, 1, 0xFFFFFFFFu));
}

static void auth_failed_and_old_gateway(void)
{
    furrow_msg m;
    fake_event e;
    fix_init(&x, 0);
    fix_poll(&x);
    CHECK(take(FURROW_MSG_HELLO, NULL));
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_ERROR;
    m.u.error.code = FURROW_CODE_AUTH_FAILED;
    m.u.error.message.data = (const uint8_t *)"authentication failed";
    m.u.error.message.len = 21;
    feed(&m);
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.reason, FURROW_E_GATEWAY);
    CHECK_EQ(e.code, FURROW_CODE_AUTH_FAILED);
    CHECK(strcmp(e.text, "authentication failed") == 0);

    /* A gateway older than capabilities refuses them: ask without. */
    fix_init(&x, FURROW_CAP_STATE);
    fix_poll(&x);
    if (take(FURROW_MSG_HELLO, &m))
        CHECK_EQ(m.has_caps, 1);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_ERROR;
    m.u.error.code = FURROW_CODE_PROTOCOL_ERROR;
    feed(&m);
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    x.now += e.retry_in_ms;
    fix_poll(&x);
    if (take(FURROW_MSG_HELLO, &m))
        CHECK_EQ(m.has_caps, 0);
}

static void commands_answered(void)
{
    furrow_msg m, r;
    fix_init(&x, 0);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_COMMAND;
    m.u.command.command_id = 9;
    m.u.command.name.data = (const uint8_t *)"reboot";
    m.u.command.name.len = 6;
    m.u.command.content_type = FURROW_CT_JSON;
    m.u.command.payload.data = (const uint8_t *)"{\"in_s\":5}";
    m.u.command.payload.len = 10;
    x.cmd_result = "{\"ok\":true}";
    feed(&m);
    fix_poll(&x);
    CHECK_EQ(x.commands, 1);
    CHECK_EQ(x.last_repeated, 0);
    if (take(FURROW_MSG_COMMAND_RESULT, &r)) {
        CHECK_EQ(r.u.command_result.command_id, 9);
        CHECK_EQ(r.u.command_result.status, FURROW_STATUS_SUCCEEDED);
        CHECK_EQ(r.u.command_result.content_type, FURROW_CT_JSON);
        CHECK_MEM(r.u.command_result.payload.data, r.u.command_result.payload.len,
                  "{\"ok\":true}", 11);
    }
    /* Delivered again (at least once): flagged as a repeat. */
    feed(&m);
    fix_poll(&x);
    CHECK_EQ(x.commands, 2);
    CHECK_EQ(x.last_repeated, 1);
    CHECK(take(FURROW_MSG_COMMAND_RESULT, NULL));
    /* No handler: "unknown command". A status out of range: "failed". */
    x.cfg.on_command = NULL;
    m.u.command.command_id = 10;
    feed(&m);
    fix_poll(&x);
    if (take(FURROW_MSG_COMMAND_RESULT, &r)) {
        CHECK_EQ(r.u.command_result.status, FURROW_STATUS_UNKNOWN);
        CHECK_EQ(r.u.command_result.payload.len, 0);
    }
    fix_init(&x, 0);
    x.cmd_status = 7;
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    feed(&m);
    fix_poll(&x);
    if (take(FURROW_MSG_COMMAND_RESULT, &r))
        CHECK_EQ(r.u.command_result.status, FURROW_STATUS_FAILED);
}

static void device_state(void)
{
    furrow_msg m, r;
    fake_event e;
    uint64_t seq;
    /* Granted: each version once, each confirmed (again, when repeated). */
    fix_init(&x, FURROW_CAP_STATE);
    fix_welcome(&x, 10, 0, FURROW_CAP_STATE);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_DESIRED;
    m.u.desired.version = 5;
    m.u.desired.document.data = (const uint8_t *)"{\"led\":\"on\"}";
    m.u.desired.document.len = 12;
    feed(&m);
    feed(&m);
    m.u.desired.version = 4; /* older: confirmed, not applied */
    feed(&m);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DESIRED, &e), 1);
    CHECK_EQ(e.seq, 5);
    if (take(FURROW_MSG_DESIRED_ACK, &r))
        CHECK_EQ(r.u.desired_ack.version, 5);
    if (take(FURROW_MSG_DESIRED_ACK, &r))
        CHECK_EQ(r.u.desired_ack.version, 5);
    if (take(FURROW_MSG_DESIRED_ACK, &r))
        CHECK_EQ(r.u.desired_ack.version, 4);
    /* Reports share the readings' seqs and window. */
    push_n(1);
    CHECK_EQ(furrow_report(&x.c, 9, "{\"led\":\"on\"}", 12, &seq), FURROW_OK);
    CHECK_EQ(seq, 2);
    fix_poll(&x);
    CHECK(take(FURROW_MSG_TELEMETRY, NULL));
    if (take(FURROW_MSG_REPORT, &r)) {
        CHECK_EQ(r.u.report.seq, 2);
        CHECK_EQ(r.u.report.timestamp_ms, 9);
    }

    /* Not asked for: no reports; DESIRED is a protocol violation. */
    fix_init(&x, 0);
    CHECK_EQ(furrow_report(&x.c, 0, "{}", 2, NULL), FURROW_E_STATE);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    m.u.desired.version = 1;
    feed(&m);
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.reason, FURROW_E_UNEXPECTED);

    /* Asked for, not granted: reports queued before are dropped unsent
     * (with an event), new ones refused. */
    fix_init(&x, FURROW_CAP_STATE);
    CHECK_EQ(furrow_report(&x.c, 0, "{}", 2, NULL), FURROW_OK);
    push_n(1);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    sent_seqs(2, 1);
    CHECK_EQ(fix_events(&x, FURROW_EV_REJECTED, &e), 1);
    CHECK_EQ(e.seq, 1);
    CHECK_EQ(e.code, FURROW_CODE_PROTOCOL_ERROR);
    CHECK_EQ(furrow_report(&x.c, 0, "{}", 2, NULL), FURROW_E_STATE);
    fix_feed_u64(&x, FURROW_MSG_ACK, 2);
    fix_poll(&x);
    CHECK_EQ(furrow_pending(&x.c), 0);
}

static void malformed_input_closes(void)
{
    static const struct {
        uint8_t bytes[16];
        uint8_t len;
        int32_t reason;
    } cases[] = {
        {{0, 0, 0, 10, 4, 1, 0, 0, 0, 0, 0, 0, 0, 1}, 14, FURROW_E_FLAGS},
        {{0, 0, 0, 10, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 14, FURROW_E_TYPE},
        {{0, 0, 0, 1, 4}, 5, FURROW_E_LENGTH},
        {{0, 0, 0x10, 0, 4, 0}, 6, FURROW_E_TOO_LARGE}, /* 4 KiB > the 512-byte buffer */
        {{0, 0, 0, 9, 4, 0, 0, 0, 0, 0, 0, 0, 1}, 13, FURROW_E_SHORT},
        {{0, 0, 0, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0}, 15, FURROW_E_LEFTOVER},
        {{0, 0, 0, 10, 0x0D, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 14, FURROW_E_UNEXPECTED},
        {{0, 0, 0, 2, 0x11, 0}, 6, FURROW_E_UNEXPECTED}, /* firmware */
    };
    unsigned i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_event e;
        fix_init(&x, 0);
        fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
        fake_feed(&x.fp, cases[i].bytes, cases[i].len);
        fix_poll(&x);
        CHECK_EQ(fix_events(&x, FURROW_EV_DISCONNECTED, &e), 1);
        CHECK_EQ(e.reason, cases[i].reason);
        CHECK_EQ(x.fp.closes, 1);
        CHECK_EQ(furrow_state(&x.c), FURROW_STATE_DISCONNECTED);
    }
    /* Before WELCOME only WELCOME, ERROR and GOODBYE may come. */
    {
        fake_event e;
        fix_init(&x, 0);
        fix_poll(&x);
        fix_feed_u64(&x, FURROW_MSG_ACK, 1);
        fix_poll(&x);
        fix_events(&x, FURROW_EV_DISCONNECTED, &e);
        CHECK_EQ(e.reason, FURROW_E_UNEXPECTED);
        /* and WELCOME only once */
        fix_init(&x, 0);
        fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
        fix_feed_u64(&x, FURROW_MSG_ACK, 0);
        {
            furrow_msg m;
            memset(&m, 0, sizeof m);
            m.type = FURROW_MSG_WELCOME;
            m.u.welcome.version = 1;
            feed(&m);
        }
        fix_poll(&x);
        fix_events(&x, FURROW_EV_DISCONNECTED, &e);
        CHECK_EQ(e.reason, FURROW_E_UNEXPECTED);
    }
}

/* Bytes trickle in one at a time and go out three at a time. */
static void split_reads_and_writes(void)
{
    furrow_msg m;
    int i;
    fix_init(&x, 0);
    x.fp.recv_max = 1;
    x.fp.send_max = 3;
    push_n(4);
    fix_poll(&x);
    CHECK(take(FURROW_MSG_HELLO, NULL));
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_WELCOME;
    m.u.welcome.version = 1;
    m.u.welcome.keepalive_s = 30;
    m.u.welcome.max_frame = 65536;
    m.u.welcome.max_inflight = 10;
    feed(&m);
    for (i = 0; i < 3; i++) /* 8 reads per poll */
        fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_HANDSHAKE);
    for (i = 0; i < 20; i++)
        fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_ONLINE);
    sent_seqs(1, 4);
    fix_feed_u64(&x, FURROW_MSG_ACK, 4);
    for (i = 0; i < 20; i++)
        fix_poll(&x);
    CHECK_EQ(furrow_pending(&x.c), 0);
}

/* The send buffer full of readings: a PING waits for room (it stays in
 * the receive buffer), then its PONG goes out behind them. */
static void answers_wait_for_room(void)
{
    furrow_msg m;
    int i;
    fix_init(&x, 0);
    push_n(100); /* 100 x 31 bytes: three times the 1 KiB send buffer */
    fix_welcome(&x, 100, 0, 0xFFFFFFFFu);
    x.fp.send_blocked = 1;
    /* The window is open; the buffer fills and stays full. */
    for (i = 0; i < 3; i++)
        fix_poll(&x);
    CHECK(furrow_wants_write(&x.c));
    fix_feed_u64(&x, FURROW_MSG_PING, 5);
    m.type = 0;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_COMMAND;
    m.u.command.command_id = 1;
    m.u.command.name.data = (const uint8_t *)"x";
    m.u.command.name.len = 1;
    feed(&m);
    fix_poll(&x);
    fix_poll(&x);
    CHECK_EQ(x.commands, 0);
    x.fp.send_blocked = 0;
    for (i = 0; i < 10; i++)
        fix_poll(&x);
    CHECK_EQ(x.commands, 1);
    /* Everything arrives: readings, the PONG, the result, more readings. */
    {
        int tel = 0, pong = 0, res = 0;
        while (fake_next(&x.fp, &m, NULL, NULL)) {
            if (m.type == FURROW_MSG_TELEMETRY) {
                tel++;
                CHECK_EQ(m.u.telemetry.seq, (uint64_t)tel);
            }
            pong += m.type == FURROW_MSG_PONG;
            res += m.type == FURROW_MSG_COMMAND_RESULT;
        }
        CHECK_EQ(tel, 100);
        CHECK_EQ(pong, 1);
        CHECK_EQ(res, 1);
    }
}

/* The socket takes a few bytes at a time: the unsent rest of a frame is
 * kept (and moved to the front of the send buffer), frames stay whole and
 * in order; a DESIRED waits for room for its DESIRED_ACK; a send error
 * ends the connection. */
static void partial_writes_and_send_errors(void)
{
    furrow_msg m;
    fake_event e;
    int i, tel = 0, acks = 0;
    fix_init(&x, FURROW_CAP_STATE);
    push_n(100);
    fix_welcome(&x, 200, 0, FURROW_CAP_STATE);
    x.fp.send_budget = 0;
    for (i = 0; i < 3; i++)
        fix_poll(&x);
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_DESIRED;
    m.u.desired.version = 1;
    m.u.desired.document.data = (const uint8_t *)"{}";
    m.u.desired.document.len = 2;
    feed(&m);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DESIRED, NULL), 0); /* no room for its answer yet */
    for (i = 0; i < 400; i++) {
        x.fp.send_budget = 7; /* a few bytes per poll: frames cut anywhere */
        fix_poll(&x);
    }
    x.fp.send_budget = -1;
    for (i = 0; i < 5; i++)
        fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DESIRED, NULL), 1);
    while (fake_next(&x.fp, &m, NULL, NULL)) {
        if (m.type == FURROW_MSG_TELEMETRY)
            CHECK_EQ(m.u.telemetry.seq, (uint64_t)++tel);
        acks += m.type == FURROW_MSG_DESIRED_ACK;
    }
    CHECK_EQ(tel, 100);
    CHECK_EQ(acks, 1);
    /* A send that fails ends the connection, readings kept. */
    push_n(1);
    x.fp.send_error = FURROW_E_IO;
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DISCONNECTED, &e), 1);
    CHECK_EQ(e.reason, FURROW_E_IO);
    CHECK_EQ(furrow_pending(&x.c), 101);
}

static void stop_says_goodbye_and_waits(void)
{
    furrow_msg m;
    fake_event e;
    fix_init(&x, 0);
    push_n(2);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    sent_seqs(1, 2);
    furrow_stop(&x.c);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_CLOSING);
    fix_poll(&x);
    if (take(FURROW_MSG_GOODBYE, &m))
        CHECK_EQ(m.u.goodbye.code, FURROW_BYE_NORMAL);
    /* The gateway stores, ACKs, closes. */
    fix_feed_u64(&x, FURROW_MSG_ACK, 2);
    x.fp.peer_closed = 1;
    fix_poll(&x);
    CHECK_EQ(furrow_pending(&x.c), 0);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_STOPPED);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.reason, FURROW_E_STOPPED);
    CHECK_EQ(fix_poll(&x), 0xFFFFFFFFu);
    CHECK_EQ(x.fp.connects, 1);
    /* A gateway that never closes: stopped after 5 s anyway. */
    fix_init(&x, 0);
    fix_welcome(&x, 10, 0, 0xFFFFFFFFu);
    furrow_stop(&x.c);
    fix_poll(&x);
    x.now += 5000;
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_STOPPED);
    /* Stopping while offline: at once. */
    fix_init(&x, 0);
    furrow_stop(&x.c);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_STOPPED);
}

static void timeouts(void)
{
    fake_event e;
    /* No WELCOME within the timeout (10 s by default). */
    fix_init(&x, 0);
    fix_poll(&x);
    x.now += 9999;
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_HANDSHAKE);
    x.now += 1;
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.reason, FURROW_E_TIMEOUT);
    /* A connect that never finishes. */
    fix_init(&x, 0);
    x.cfg.timeout_ms = 3000;
    x.fp.connect_result = FURROW_E_AGAIN;
    CHECK_EQ(fix_poll(&x), 3000);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_CONNECTING);
    CHECK(furrow_wants_write(&x.c));
    x.now += 3000;
    fix_poll(&x);
    fix_events(&x, FURROW_EV_DISCONNECTED, &e);
    CHECK_EQ(e.reason, FURROW_E_TIMEOUT);
}

static void limits_and_arguments(void)
{
    furrow_config bad;
    furrow_client c;
    uint8_t big[1100];
    fake_event e;
    fix_init(&x, 0);
    memset(big, 'a', sizeof big);
    /* A reading must fit the send buffer behind its headers. */
    CHECK_EQ(furrow_push(&x.c, 0, 0, big, sizeof x.tx - 23 + 1, NULL), FURROW_E_ARG);
    CHECK_EQ(furrow_push(&x.c, 0, 0, big, 300, NULL), FURROW_OK);
    /* Over the gateway's max_frame: dropped unsent, reported. */
    {
        furrow_msg m;
        fix_poll(&x);
        CHECK(take(FURROW_MSG_HELLO, NULL));
        memset(&m, 0, sizeof m);
        m.type = FURROW_MSG_WELCOME;
        m.u.welcome.version = 1;
        m.u.welcome.keepalive_s = 30;
        m.u.welcome.max_frame = 100;
        m.u.welcome.max_inflight = 10;
        feed(&m);
        fix_poll(&x);
        CHECK_EQ(fix_events(&x, FURROW_EV_REJECTED, &e), 1);
        CHECK_EQ(e.code, FURROW_CODE_FRAME_TOO_LARGE);
        CHECK_EQ(fake_pending_frames(&x.fp), 0);
    }
    /* Configuration checks. */
    bad = x.cfg;
    bad.device_id = "has space";
    CHECK_EQ(furrow_init(&c, &bad), FURROW_E_ARG);
    bad = x.cfg;
    bad.rx_size = 32;
    CHECK_EQ(furrow_init(&c, &bad), FURROW_E_ARG);
    bad = x.cfg;
    bad.port = NULL;
    CHECK_EQ(furrow_init(&c, &bad), FURROW_E_ARG);
    bad = x.cfg;
    bad.tx_size = 64;
    bad.token = "0123456789012345678901234567890123456789012345678";
    CHECK_EQ(furrow_init(&c, &bad), FURROW_E_ARG); /* HELLO would not fit */
    /* Full: pushes are refused until ACKs free a page. */
    fix_init(&x, 0);
    {
        int n = 0;
        while (furrow_push(&x.c, 0, 0, big, 100, NULL) == FURROW_OK)
            n++;
        CHECK(n > 40);
        CHECK_EQ(furrow_push(&x.c, 0, 0, big, 100, NULL), FURROW_E_FULL);
    }
}

static void empty_token_for_mutual_tls(void)
{
    furrow_msg m;
    fix_init(&x, 0);
    x.cfg.token = "";
    CHECK_EQ(furrow_init(&x.c, &x.cfg), FURROW_OK);
    fix_poll(&x);
    if (take(FURROW_MSG_HELLO, &m))
        CHECK_EQ(m.u.hello.token.len, 0);
}

void suite_client(void)
{
    RUN(handshake);
    RUN(pipelining_and_cumulative_acks);
    RUN(resend_after_reconnect);
    RUN(reject_then_ack);
    RUN(ping_pong_and_keepalive);
    RUN(keepalive_across_clock_wrap);
    RUN(goodbye_waits_retry_after);
    RUN(backoff_grows_and_resets);
    RUN(auth_failed_and_old_gateway);
    RUN(commands_answered);
    RUN(device_state);
    RUN(malformed_input_closes);
    RUN(split_reads_and_writes);
    RUN(answers_wait_for_room);
    RUN(partial_writes_and_send_errors);
    RUN(stop_says_goodbye_and_waits);
    RUN(timeouts);
    RUN(limits_and_arguments);
    RUN(empty_token_for_mutual_tls);
}
