/*
 * test_frame.c: frames and every message: round trips, and each decoding
 * error docs/protocol.md defines, in the order the reference
 * implementation (crates/furrow-proto/tests/vectors.rs) checks them.
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#include "test.h"
#include "furrow.h"

static furrow_bytes B(const char *s)
{
    furrow_bytes b;
    b.data = (const uint8_t *)s;
    b.len = strlen(s);
    return b;
}

/* One valid message of every type 0x01..0x0E, with non-empty strs and
 * payloads. */
static int one_of_each(furrow_msg *out)
{
    int n = 0;
    furrow_msg m;

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_HELLO;
    m.u.hello.version = 1;
    m.u.hello.keepalive_s = 30;
    m.u.hello.device_id = B("pump-17");
    m.u.hello.token = B("k3y");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_WELCOME;
    m.u.welcome.version = 1;
    m.u.welcome.keepalive_s = 30;
    m.u.welcome.max_frame = 65536;
    m.u.welcome.max_inflight = 256;
    m.u.welcome.last_seq = 41;
    m.u.welcome.server_time_ms = 1763683200000ull;
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_TELEMETRY;
    m.u.telemetry.seq = 42;
    m.u.telemetry.timestamp_ms = 1763683200123ull;
    m.u.telemetry.content_type = 1;
    m.u.telemetry.payload = B("{\"t\":21.5}");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_ACK;
    m.u.ack.seq = 42;
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_REJECT;
    m.u.reject.seq = 7;
    m.u.reject.code = 20;
    m.u.reject.reason = B("not json");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_COMMAND;
    m.u.command.command_id = 9;
    m.u.command.name = B("reboot");
    m.u.command.content_type = 1;
    m.u.command.payload = B("{\"in_s\":5}");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_COMMAND_RESULT;
    m.u.command_result.command_id = 9;
    m.u.command_result.status = 1;
    m.u.command_result.content_type = 3;
    m.u.command_result.payload = B("busy");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_PING;
    m.u.ping.nonce = 0xdeadbeef;
    out[n++] = m;
    m.type = FURROW_MSG_PONG;
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_ERROR;
    m.u.error.code = 3;
    m.u.error.message = B("authentication failed");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_GOODBYE;
    m.u.goodbye.code = 1;
    m.u.goodbye.retry_after_ms = 5000;
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_DESIRED;
    m.u.desired.version = 3;
    m.u.desired.document = B("{\"led\":\"on\"}");
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_DESIRED_ACK;
    m.u.desired_ack.version = 3;
    out[n++] = m;
    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_REPORT;
    m.u.report.seq = 43;
    m.u.report.timestamp_ms = 1763683200456ull;
    m.u.report.patch = B("{\"led\":\"on\"}");
    out[n++] = m;
    return n;
}

/* Bytes of the fixed part of a body with a rest field (everything before
 * the rest); the whole body for the others. */
static size_t fixed_part(const furrow_msg *m, size_t body)
{
    switch (m->type) {
    case FURROW_MSG_TELEMETRY: return 17;
    case FURROW_MSG_COMMAND: return 8 + 2 + m->u.command.name.len + 1;
    case FURROW_MSG_COMMAND_RESULT: return 10;
    case FURROW_MSG_DESIRED: return 8;
    case FURROW_MSG_REPORT: return 16;
    default: return body;
    }
}

static int has_rest(uint8_t type)
{
    return type == FURROW_MSG_TELEMETRY || type == FURROW_MSG_COMMAND ||
           type == FURROW_MSG_COMMAND_RESULT || type == FURROW_MSG_DESIRED ||
           type == FURROW_MSG_REPORT;
}

/* A frame of `type` around `body`. */
static size_t frame(uint8_t type, const uint8_t *body, size_t n, uint8_t *out)
{
    out[0] = (uint8_t)((n + 2) >> 24);
    out[1] = (uint8_t)((n + 2) >> 16);
    out[2] = (uint8_t)((n + 2) >> 8);
    out[3] = (uint8_t)(n + 2);
    out[4] = type;
    out[5] = 0;
    if (n)
        memcpy(out + 6, body, n);
    return n + 6;
}

static int32_t parse(uint8_t type, const uint8_t *body, size_t n)
{
    uint8_t buf[1024];
    furrow_msg m;
    size_t len = frame(type, body, n, buf);
    int32_t r = furrow_decode(buf, len, 65536, &m);
    return r == (int32_t)len ? FURROW_OK : r;
}

static size_t hello_body(uint8_t version, const uint8_t *id, size_t id_len, const uint8_t *tok,
                         size_t tok_len, uint8_t *out)
{
    size_t n = 0;
    out[n++] = version;
    out[n++] = 0;
    out[n++] = 30;
    out[n++] = (uint8_t)(id_len >> 8);
    out[n++] = (uint8_t)id_len;
    memcpy(out + n, id, id_len);
    n += id_len;
    out[n++] = (uint8_t)(tok_len >> 8);
    out[n++] = (uint8_t)tok_len;
    memcpy(out + n, tok, tok_len);
    return n + tok_len;
}

static void every_message_round_trips(void)
{
    furrow_msg all[16], d;
    uint8_t buf[512];
    int n = one_of_each(all), i;
    CHECK_EQ(n, 14);
    for (i = 0; i < n; i++) {
        int32_t len = furrow_encode(&all[i], buf, sizeof buf);
        uint8_t again[512];
        CHECK(len > 6);
        CHECK_EQ(buf[4], all[i].type);
        CHECK_EQ(buf[5], 0);
        CHECK_EQ(((uint32_t)buf[0] << 24 | buf[1] << 16 | buf[2] << 8 | buf[3]), len - 4);
        CHECK_EQ(furrow_decode(buf, (size_t)len, 65536, &d), len);
        CHECK_EQ(d.type, all[i].type);
        /* Decoded, re-encoded: the same bytes. */
        CHECK_MEM(again, (size_t)furrow_encode(&d, again, sizeof again), buf, (size_t)len);
    }
}

static void body_too_short_for_every_type(void)
{
    furrow_msg all[16];
    uint8_t buf[512];
    int n = one_of_each(all), i;
    for (i = 0; i < n; i++) {
        int32_t len = furrow_encode(&all[i], buf, sizeof buf);
        size_t cut, fixed = fixed_part(&all[i], (size_t)len - 6);
        for (cut = 0; cut < fixed; cut++) {
            int32_t r = parse(all[i].type, buf + 6, cut);
            /* HELLO's version decides alone once it is there: it is 1 here. */
            CHECK_EQ(r, FURROW_E_SHORT);
        }
    }
}

static void leftover_bytes_for_every_type(void)
{
    furrow_msg all[16];
    uint8_t buf[512];
    int n = one_of_each(all), i;
    for (i = 0; i < n; i++) {
        int32_t len = furrow_encode(&all[i], buf, sizeof buf);
        int32_t want;
        if (has_rest(all[i].type))
            want = FURROW_OK; /* the extra bytes are payload */
        else if (all[i].type == FURROW_MSG_HELLO || all[i].type == FURROW_MSG_WELCOME)
            want = FURROW_E_SHORT; /* 1 to 3 bytes: a cut capabilities field */
        else
            want = FURROW_E_LEFTOVER;
        buf[len] = 0;
        CHECK_EQ(parse(all[i].type, buf + 6, (size_t)len - 6 + 1), want);
        buf[len] = buf[len + 1] = buf[len + 2] = 0xFF;
        CHECK_EQ(parse(all[i].type, buf + 6, (size_t)len - 6 + 3), want);
    }
}

static void body_too_short_table(void)
{
    static const struct {
        uint8_t type;
        uint8_t body[16];
        uint8_t len;
    } cases[] = {
        {FURROW_MSG_HELLO, {0}, 0},
        {FURROW_MSG_HELLO, {1, 0}, 2},
        {FURROW_MSG_HELLO, {1, 0, 30, 0}, 4},
        {FURROW_MSG_HELLO, {1, 0, 30, 0, 3, 'a'}, 6},
        {FURROW_MSG_HELLO, {1, 0, 30, 0, 1, 'a'}, 6},
        {FURROW_MSG_HELLO, {1, 0, 30, 0, 1, 'a', 0, 2, 'k'}, 9},
        {FURROW_MSG_WELCOME, {1, 0, 30, 0, 1, 0, 0, 1, 0}, 9},
        {FURROW_MSG_TELEMETRY, {0, 0, 0, 0, 0, 0, 0, 1}, 8},
        {FURROW_MSG_TELEMETRY, {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0}, 16},
        {FURROW_MSG_ACK, {0, 0, 0, 0, 0, 0, 0}, 7},
        {FURROW_MSG_REJECT, {0, 0, 0, 0, 0, 0, 0, 1, 0, 20}, 10},
        {FURROW_MSG_REJECT, {0, 0, 0, 0, 0, 0, 0, 1, 0, 20, 0, 5, 'x'}, 13},
        {FURROW_MSG_COMMAND, {0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 'x'}, 11},
        {FURROW_MSG_COMMAND, {0, 0, 0, 0, 0, 0, 0, 1, 0xFF, 0xFF}, 10},
        {FURROW_MSG_COMMAND_RESULT, {0, 0, 0, 0, 0, 0, 0, 1, 0}, 9},
        {FURROW_MSG_COMMAND_RESULT, {0, 0, 0, 0}, 4},
        {FURROW_MSG_PING, {0}, 0},
        {FURROW_MSG_PONG, {0, 0, 0, 0, 0, 0, 0}, 7},
        {FURROW_MSG_ERROR, {0}, 1},
        {FURROW_MSG_ERROR, {0, 1, 0, 2, 'x'}, 5},
        {FURROW_MSG_GOODBYE, {0, 0, 0, 0, 0}, 5},
    };
    unsigned i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK_EQ(parse(cases[i].type, cases[i].body, cases[i].len), FURROW_E_SHORT);
}

static void empty_rest_is_allowed(void)
{
    static const uint8_t tel[17] = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    static const uint8_t cmd[11] = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0};
    static const uint8_t res[10] = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0};
    CHECK_EQ(parse(FURROW_MSG_TELEMETRY, tel, sizeof tel), FURROW_OK);
    CHECK_EQ(parse(FURROW_MSG_COMMAND, cmd, sizeof cmd), FURROW_OK);
    CHECK_EQ(parse(FURROW_MSG_COMMAND_RESULT, res, sizeof res), FURROW_OK);
}

static void str_not_utf8_in_every_str_field(void)
{
    static const struct {
        uint8_t b[4];
        uint8_t n;
    } bad[] = {
        {{0xFF}, 1},
        {{'a', 0x80}, 2},             /* stray continuation byte */
        {{0xC3, 0x28}, 2},            /* bad continuation */
        {{0xC0, 0x80}, 2},            /* overlong NUL */
        {{0xED, 0xA0, 0x80}, 3},      /* UTF-16 surrogate */
        {{0xF4, 0x90, 0x80, 0x80}, 4}, /* above U+10FFFF */
        {{0xE2, 0x82}, 2},            /* truncated sequence */
        {{0xE0, 0x80, 0x80}, 3},      /* overlong 3-byte */
        {{0xF0, 0x80, 0x80, 0x80}, 4}, /* overlong 4-byte */
    };
    unsigned i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint8_t body[64];
        size_t n;
        n = hello_body(1, bad[i].b, bad[i].n, (const uint8_t *)"k", 1, body);
        CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_UTF8);
        n = hello_body(1, (const uint8_t *)"dev", 3, bad[i].b, bad[i].n, body);
        CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_UTF8);
        /* REJECT reason */
        memset(body, 0, 8);
        body[7] = 5;
        body[8] = 0;
        body[9] = 20;
        body[10] = 0;
        body[11] = bad[i].n;
        memcpy(body + 12, bad[i].b, bad[i].n);
        CHECK_EQ(parse(FURROW_MSG_REJECT, body, 12u + bad[i].n), FURROW_E_UTF8);
        /* COMMAND name, then anything */
        body[8] = 0;
        body[9] = bad[i].n;
        memcpy(body + 10, bad[i].b, bad[i].n);
        body[10 + bad[i].n] = 0;
        body[11 + bad[i].n] = 0xFF;
        CHECK_EQ(parse(FURROW_MSG_COMMAND, body, 12u + bad[i].n), FURROW_E_UTF8);
        /* ERROR message */
        body[0] = 0;
        body[1] = 1;
        body[2] = 0;
        body[3] = bad[i].n;
        memcpy(body + 4, bad[i].b, bad[i].n);
        CHECK_EQ(parse(FURROW_MSG_ERROR, body, 4u + bad[i].n), FURROW_E_UTF8);
    }
    {
        /* Multi-byte UTF-8 that is valid. */
        const char *ok = "temp\xC3\xA9rature \xE2\x9C\x93 \xF0\x9F\x8C\xA1";
        uint8_t body[64];
        size_t n = strlen(ok);
        memset(body, 0, 8);
        body[7] = 1;
        body[8] = 0;
        body[9] = 20;
        body[10] = 0;
        body[11] = (uint8_t)n;
        memcpy(body + 12, ok, n);
        CHECK_EQ(parse(FURROW_MSG_REJECT, body, 12 + n), FURROW_OK);
    }
}

static void hello_version_decides_alone(void)
{
    static const uint8_t versions[] = {0, 2, 3, 0x7F, 0xFF};
    static const struct {
        uint8_t b[10];
        uint8_t n;
    } garbage[] = {
        {{0}, 0},
        {{0xFF}, 1},
        {{0, 30, 0xFF, 0xFF}, 4},
        {{0, 30, 0, 1, 0xFF, 0, 0}, 7},
        {{0, 30, 0, 1, ' ', 0, 0}, 7},
        {{0, 30, 0, 1, 'a', 0, 0, 1, 2, 3}, 10},
    };
    unsigned v, g;
    for (v = 0; v < sizeof versions; v++) {
        uint8_t body[64];
        size_t n;
        for (g = 0; g < sizeof garbage / sizeof garbage[0]; g++) {
            body[0] = versions[v];
            memcpy(body + 1, garbage[g].b, garbage[g].n);
            CHECK_EQ(parse(FURROW_MSG_HELLO, body, 1u + garbage[g].n), FURROW_E_VERSION);
        }
        n = hello_body(versions[v], (const uint8_t *)"pump-17", 7, (const uint8_t *)"k3y", 3,
                       body);
        CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_VERSION);
    }
    {
        static const uint8_t b[] = {1, 0xFF};
        CHECK_EQ(parse(FURROW_MSG_HELLO, b, 2), FURROW_E_SHORT);
    }
}

static void hello_device_id_and_token(void)
{
    static const char allowed[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";
    uint8_t id[300], body[700], tok[300];
    size_t n;
    int c;
    memset(id, 'z', sizeof id);
    n = hello_body(1, id, 128, (const uint8_t *)"t", 1, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_OK);
    n = hello_body(1, id, 129, (const uint8_t *)"t", 1, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_FIELD);
    n = hello_body(1, id, 0, (const uint8_t *)"t", 1, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_FIELD);
    n = hello_body(1, (const uint8_t *)allowed, strlen(allowed), (const uint8_t *)"t", 1, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_OK);
    for (c = 0x20; c < 0x7F; c++) {
        uint8_t one[3] = {'a', (uint8_t)c, 'b'};
        if (strchr(allowed, c))
            continue;
        n = hello_body(1, one + 1, 1, (const uint8_t *)"t", 1, body);
        CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_FIELD);
        n = hello_body(1, one, 3, (const uint8_t *)"t", 1, body);
        CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_FIELD);
        CHECK(!furrow_valid_device_id(one, 3));
    }
    n = hello_body(1, (const uint8_t *)"caf\xC3\xA9", 5, (const uint8_t *)"t", 1, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_FIELD);
    /* Token: 0 to 256 bytes. */
    memset(tok, 'k', sizeof tok);
    n = hello_body(1, (const uint8_t *)"dev-1", 5, tok, 0, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_OK);
    n = hello_body(1, (const uint8_t *)"dev-1", 5, tok, 256, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_OK);
    n = hello_body(1, (const uint8_t *)"dev-1", 5, tok, 257, body);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n), FURROW_E_FIELD);
    /* Capabilities: absent, or exactly four bytes. */
    n = hello_body(1, (const uint8_t *)"pump-17", 7, (const uint8_t *)"k3y", 3, body);
    memset(body + n, 0xFF, 5);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n + 1), FURROW_E_SHORT);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n + 3), FURROW_E_SHORT);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n + 4), FURROW_OK);
    CHECK_EQ(parse(FURROW_MSG_HELLO, body, n + 5), FURROW_E_LEFTOVER);
}

static void seq_zero_and_status(void)
{
    uint8_t body[32];
    unsigned s;
    memset(body, 0, sizeof body);
    body[17] = '{';
    body[18] = '}';
    CHECK_EQ(parse(FURROW_MSG_TELEMETRY, body, 19), FURROW_E_FIELD);
    CHECK_EQ(parse(FURROW_MSG_REPORT, body, 18), FURROW_E_FIELD);
    body[7] = 1;
    CHECK_EQ(parse(FURROW_MSG_TELEMETRY, body, 19), FURROW_OK);
    CHECK_EQ(parse(FURROW_MSG_REPORT, body, 18), FURROW_OK);
    for (s = 0; s < 256; s++) {
        memset(body, 0, sizeof body);
        body[7] = 77;
        body[8] = (uint8_t)s;
        body[9] = 3;
        body[10] = 'o';
        body[11] = 'k';
        CHECK_EQ(parse(FURROW_MSG_COMMAND_RESULT, body, 12), s <= 2 ? FURROW_OK : FURROW_E_FIELD);
        /* Checked first: with nothing after it, still the status error. */
        if (s > 2)
            CHECK_EQ(parse(FURROW_MSG_COMMAND_RESULT, body, 9), FURROW_E_FIELD);
    }
}

static void header_checks_in_order(void)
{
    static const struct {
        uint8_t b[6];
        int32_t want;
    } cases[] = {
        {{0, 0, 0, 1, 0xFF, 0xFF}, FURROW_E_LENGTH},
        {{0, 0, 0, 0, 0x00, 0x01}, FURROW_E_LENGTH},
        {{0, 0, 0x04, 0x01, 0xFF, 0xFF}, FURROW_E_TOO_LARGE},
        {{0xFF, 0xFF, 0xFF, 0xFF, 0x03, 0x00}, FURROW_E_TOO_LARGE},
        {{0, 0, 0, 2, 0xFF, 0x01}, FURROW_E_FLAGS},
        {{0, 0, 0, 2, 0x00, 0x80}, FURROW_E_FLAGS},
        {{0, 0, 0, 10, 0x1F, 0x01}, FURROW_E_FLAGS},
        {{0, 0, 0, 10, 0x1F, 0x00}, FURROW_E_TYPE},
        {{0, 0, 0, 2, 0x00, 0x00}, FURROW_E_TYPE},
        {{0, 0, 0, 2, 0x13, 0x00}, FURROW_E_TYPE},
    };
    unsigned i, k;
    furrow_msg m;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t got = FURROW_E_AGAIN;
        CHECK_EQ(furrow_frame_check(cases[i].b, 6, 1024), cases[i].want);
        CHECK_EQ(furrow_decode(cases[i].b, 6, 1024, &m), cases[i].want);
        /* The answer does not depend on how the header was split. */
        for (k = 1; k <= 6 && got == FURROW_E_AGAIN; k++)
            got = furrow_decode(cases[i].b, k, 1024, &m);
        CHECK_EQ(got, cases[i].want);
    }
    /* Every unknown type, and every known one waiting for its body. */
    for (i = 0; i < 256; i++) {
        uint8_t f[14] = {0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
        f[4] = (uint8_t)i;
        if (i == 0 || i > 0x12) {
            CHECK_EQ(furrow_frame_check(f, 6, 65536), FURROW_E_TYPE);
        } else {
            CHECK_EQ(furrow_frame_check(f, 6, 65536), 14);
            CHECK_EQ(furrow_decode(f, 13, 65536, &m), FURROW_E_AGAIN);
        }
    }
    /* The limit is a value of the length field: exactly it is accepted. */
    {
        uint8_t f[14] = {0, 0, 0, 10, 4, 0, 0, 0, 0, 0, 0, 0, 0, 42};
        CHECK_EQ(furrow_decode(f, 14, 10, &m), 14);
        CHECK_EQ(m.u.ack.seq, 42);
        CHECK_EQ(furrow_decode(f, 14, 9, &m), FURROW_E_TOO_LARGE);
        CHECK_EQ(furrow_decode(f, 4, 9, &m), FURROW_E_TOO_LARGE); /* from 4 bytes */
        CHECK_EQ(furrow_decode(f, 3, 9, &m), FURROW_E_AGAIN);
    }
    /* A PROXY header read as a frame: far too large. */
    CHECK_EQ(furrow_frame_check((const uint8_t *)"PROXY TCP4", 10, 65536), FURROW_E_TOO_LARGE);
    /* Length 2: type and flags, empty body. */
    {
        uint8_t f[6] = {0, 0, 0, 2, FURROW_MSG_PING, 0};
        CHECK_EQ(furrow_frame_check(f, 6, 65536), 6);
        CHECK_EQ(furrow_decode(f, 6, 65536, &m), FURROW_E_SHORT);
    }
}

static void back_to_back_and_byte_at_a_time(void)
{
    furrow_msg all[16], m;
    uint8_t wire[2048];
    size_t len = 0, off, have;
    int n = one_of_each(all), k, got = 0;
    for (k = 0; k < n; k++)
        len += (size_t)furrow_encode(&all[k], wire + len, sizeof wire - len);
    /* All in one buffer. */
    for (off = 0; off < len;) {
        int32_t r = furrow_decode(wire + off, len - off, 65536, &m);
        CHECK(r > 0);
        if (r <= 0)
            break;
        CHECK_EQ(m.type, all[got].type);
        got++;
        off += (size_t)r;
    }
    CHECK_EQ(got, n);
    /* Arriving one byte at a time: nothing until each frame is whole. */
    got = 0;
    off = 0;
    for (have = 1; have <= len; have++) {
        int32_t r = furrow_decode(wire + off, have - off, 65536, &m);
        if (r == FURROW_E_AGAIN)
            continue;
        CHECK_EQ(r, have - off);
        CHECK_EQ(m.type, all[got].type);
        got++;
        off = have;
    }
    CHECK_EQ(got, n);
}

static void encode_refusals(void)
{
    furrow_msg m;
    uint8_t buf[64];
    static uint8_t big[70000];
    memset(&m, 0, sizeof m);
    CHECK_EQ(furrow_encode(&m, buf, sizeof buf), FURROW_E_ARG); /* type 0 */
    m.type = 0x0F;
    CHECK_EQ(furrow_encode(&m, buf, sizeof buf), FURROW_E_ARG); /* firmware */
    m.type = FURROW_MSG_ERROR;
    m.u.error.message.data = big;
    m.u.error.message.len = sizeof big;
    CHECK_EQ(furrow_encode(&m, buf, sizeof buf), FURROW_E_ARG); /* str > 65535 */
    m.u.error.message.len = 10;
    CHECK_EQ(furrow_encode(&m, buf, 5), FURROW_E_TOO_LARGE);
    CHECK_EQ(furrow_encode(&m, buf, 6 + 2 + 2 + 9), FURROW_E_TOO_LARGE);
    CHECK_EQ(furrow_encode(&m, buf, 6 + 2 + 2 + 10), 20);
}

static void crc32_and_backoff(void)
{
    uint32_t a;
    CHECK_EQ(furrow_crc32(0, "123456789", 9), 0xCBF43926u);
    CHECK_EQ(furrow_crc32(0, "furrow", 6), 0xE41A6585u); /* the CHUNK vector's */
    CHECK_EQ(furrow_crc32(furrow_crc32(0, "1234", 4), "56789", 5), 0xCBF43926u);
    CHECK_EQ(furrow_crc32(0, NULL, 0), 0);
    /* The ceiling doubles from initial to max; the delay is uniform under it. */
    CHECK_EQ(furrow_backoff_delay(100, 1000, 0, 0xFFFFFFFFu), 0xFFFFFFFFu % 101);
    CHECK_EQ(furrow_backoff_delay(100, 1000, 0, 100), 100);
    CHECK_EQ(furrow_backoff_delay(100, 1000, 0, 101), 0);
    CHECK_EQ(furrow_backoff_delay(100, 1000, 1, 200), 200);
    CHECK_EQ(furrow_backoff_delay(100, 1000, 3, 800), 800);
    CHECK_EQ(furrow_backoff_delay(100, 1000, 4, 1000), 1000); /* capped */
    CHECK_EQ(furrow_backoff_delay(100, 1000, 4, 1001), 0);
    CHECK_EQ(furrow_backoff_delay(100, 1000, 1000, 1000), 1000);
    CHECK_EQ(furrow_backoff_delay(0, 1000, 5, 7), 0);
    CHECK_EQ(furrow_backoff_delay(0xFFFFFFFFu, 0xFFFFFFFFu, 3, 12345), 12345);
    for (a = 0; a < 40; a++) {
        uint32_t ceiling = a >= 10 ? 30000u : (200u << a < 30000u ? 200u << a : 30000u);
        CHECK(furrow_backoff_delay(200, 30000, a, 0xFFFFFFFFu) <= ceiling);
        CHECK_EQ(furrow_backoff_delay(200, 30000, a, ceiling), ceiling);
    }
}

static void error_names(void)
{
    int32_t e;
    CHECK(strcmp(furrow_strerror(FURROW_OK), "ok") == 0);
    CHECK(strcmp(furrow_strerror(FURROW_E_STOPPED), "stopped") == 0);
    CHECK(strcmp(furrow_strerror(FURROW_E_LENGTH), "length below 2") == 0);
    CHECK(strcmp(furrow_strerror(FURROW_E_UNEXPECTED), "unexpected message") == 0);
    CHECK(strcmp(furrow_strerror(-13), "unknown error") == 0);
    CHECK(strcmp(furrow_strerror(1), "unknown error") == 0);
    for (e = FURROW_E_UNEXPECTED; e <= 0; e++)
        CHECK(furrow_strerror(e) != NULL && furrow_strerror(e)[0] != '\0');
}

void suite_frame(void)
{
    RUN(every_message_round_trips);
    RUN(body_too_short_for_every_type);
    RUN(leftover_bytes_for_every_type);
    RUN(body_too_short_table);
    RUN(empty_rest_is_allowed);
    RUN(str_not_utf8_in_every_str_field);
    RUN(hello_version_decides_alone);
    RUN(hello_device_id_and_token);
    RUN(seq_zero_and_status);
    RUN(header_checks_in_order);
    RUN(back_to_back_and_byte_at_a_time);
    RUN(encode_refusals);
    RUN(crc32_and_backoff);
    RUN(error_names);
}
