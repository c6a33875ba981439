/*
 * test_vectors.c: byte-for-byte agreement with the Rust reference
 * (crates/furrow-proto) on the protocol's test vectors, read from the one
 * shared file docs/test-vectors.txt (path given by the Makefile).
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Each vector is decoded and its fields checked, and the message it
 * describes is encoded and compared with its bytes. The client's own
 * output is checked against them too: the HELLO it sends, the TELEMETRY
 * and REPORT it reads back from its outbox, its DESIRED_ACK; and the
 * WELCOME, ACK, DESIRED and REJECT vectors are fed to it.
 *
 * Firmware vectors (offer, chunk_request, chunk, cancel, hello_fw) are
 * outside this library (it never asks for capability FIRMWARE): they are
 * skipped, after checking only that their frame headers are well-formed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "fake.h"
#include "test.h"

typedef struct {
    char name[32];
    uint8_t bytes[256];
    size_t len;
    int used;
} vector;

static vector vectors[32];
static int nvectors;

static const char *const FIRMWARE[] = {"offer", "chunk_request", "chunk", "cancel", "hello_fw"};

static int load(const char *path)
{
    char line[2048];
    FILE *f = fopen(path, "r");
    int lineno = 0;
    if (!f) {
        fprintf(stderr, "cannot open %s: %s\n", path, strerror(errno));
        return 0;
    }
    while (fgets(line, sizeof line, f)) {
        char *colon, *s = line;
        long n;
        lineno++;
        while (*s == ' ' || *s == '\t')
            s++;
        if (*s == '#' || *s == '\n' || *s == '\r' || *s == '\0')
            continue;
        colon = strchr(s, ':');
        if (!colon || colon == s || (size_t)(colon - s) >= sizeof vectors[0].name ||
            nvectors == (int)(sizeof vectors / sizeof vectors[0])) {
            fprintf(stderr, "%s:%d: not `name: hex`\n", path, lineno);
            fclose(f);
            return 0;
        }
        memcpy(vectors[nvectors].name, s, (size_t)(colon - s));
        vectors[nvectors].name[colon - s] = '\0';
        n = test_unhex(colon + 1, vectors[nvectors].bytes, sizeof vectors[0].bytes);
        if (n <= 0) {
            fprintf(stderr, "%s:%d: bad hex\n", path, lineno);
            fclose(f);
            return 0;
        }
        vectors[nvectors].len = (size_t)n;
        nvectors++;
    }
    fclose(f);
    return 1;
}

static vector *find(const char *name)
{
    int i;
    for (i = 0; i < nvectors; i++)
        if (strcmp(vectors[i].name, name) == 0) {
            vectors[i].used = 1;
            return &vectors[i];
        }
    fprintf(stderr, "FAIL: vector %s missing from the file\n", name);
    test_failures++;
    return NULL;
}

static furrow_bytes str(const char *s)
{
    furrow_bytes b;
    b.data = (const uint8_t *)s;
    b.len = strlen(s);
    return b;
}

static int bytes_eq(furrow_bytes b, const char *s)
{
    return b.len == strlen(s) && memcmp(b.data, s, b.len) == 0;
}

/* Encode `m` and compare with the vector; decode the vector and compare
 * every field with `m`. */
static void both_ways(const char *name, const furrow_msg *m)
{
    uint8_t buf[256];
    furrow_msg d;
    int32_t n;
    vector *v = find(name);
    if (!v)
        return;
    test_current = name;
    n = furrow_encode(m, buf, sizeof buf);
    CHECK_MEM(buf, n > 0 ? (size_t)n : 0, v->bytes, v->len);
    /* And into a buffer exactly its size, and one byte short. */
    CHECK_EQ(furrow_encode(m, buf, v->len), v->len);
    CHECK_EQ(furrow_encode(m, buf, v->len - 1), FURROW_E_TOO_LARGE);

    n = furrow_decode(v->bytes, v->len, 65536, &d);
    CHECK_EQ(n, v->len);
    CHECK_EQ(d.type, m->type);
    CHECK_EQ(d.has_caps, m->has_caps);
    switch (m->type) {
    case FURROW_MSG_HELLO:
        CHECK_EQ(d.u.hello.version, m->u.hello.version);
        CHECK_EQ(d.u.hello.keepalive_s, m->u.hello.keepalive_s);
        CHECK(bytes_eq(d.u.hello.device_id, "pump-17"));
        CHECK(bytes_eq(d.u.hello.token, "k3y"));
        CHECK_EQ(d.u.hello.capabilities, m->u.hello.capabilities);
        break;
    case FURROW_MSG_WELCOME:
        CHECK_EQ(d.u.welcome.version, 1);
        CHECK_EQ(d.u.welcome.keepalive_s, 30);
        CHECK_EQ(d.u.welcome.max_frame, 65536);
        CHECK_EQ(d.u.welcome.max_inflight, 256);
        CHECK_EQ(d.u.welcome.last_seq, 41);
        CHECK_EQ(d.u.welcome.server_time_ms, 1763683200000ull);
        CHECK_EQ(d.u.welcome.capabilities, m->u.welcome.capabilities);
        break;
    case FURROW_MSG_TELEMETRY:
        CHECK_EQ(d.u.telemetry.seq, 42);
        CHECK_EQ(d.u.telemetry.timestamp_ms, 1763683200123ull);
        CHECK_EQ(d.u.telemetry.content_type, FURROW_CT_JSON);
        CHECK(bytes_eq(d.u.telemetry.payload, "{\"t\":21.5}"));
        break;
    case FURROW_MSG_ACK:
        CHECK_EQ(d.u.ack.seq, 42);
        break;
    case FURROW_MSG_DESIRED:
        CHECK_EQ(d.u.desired.version, 3);
        CHECK(bytes_eq(d.u.desired.document, "{\"led\":\"on\"}"));
        break;
    case FURROW_MSG_DESIRED_ACK:
        CHECK_EQ(d.u.desired_ack.version, 3);
        break;
    case FURROW_MSG_REPORT:
        CHECK_EQ(d.u.report.seq, 43);
        CHECK_EQ(d.u.report.timestamp_ms, 1763683200456ull);
        CHECK(bytes_eq(d.u.report.patch, "{\"led\":\"on\"}"));
        break;
    case FURROW_MSG_REJECT:
        CHECK_EQ(d.u.reject.seq, 44);
        CHECK_EQ(d.u.reject.code, FURROW_CODE_STATE_TOO_LARGE);
        CHECK(bytes_eq(d.u.reject.reason, "state too large"));
        break;
    default:
        CHECK(!"a vector of an unexpected type");
    }
    /* Every cut of a vector is incomplete, never an error or a frame. */
    for (n = 0; n < (int32_t)v->len; n++)
        CHECK_EQ(furrow_decode(v->bytes, (size_t)n, 65536, &d), FURROW_E_AGAIN);
}

static void messages(void)
{
    furrow_msg m;

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_HELLO;
    m.u.hello.version = 1;
    m.u.hello.keepalive_s = 30;
    m.u.hello.device_id = str("pump-17");
    m.u.hello.token = str("k3y");
    both_ways("hello", &m);
    m.has_caps = 1;
    m.u.hello.capabilities = FURROW_CAP_STATE;
    both_ways("hello_caps", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_WELCOME;
    m.u.welcome.version = 1;
    m.u.welcome.keepalive_s = 30;
    m.u.welcome.max_frame = 65536;
    m.u.welcome.max_inflight = 256;
    m.u.welcome.last_seq = 41;
    m.u.welcome.server_time_ms = 1763683200000ull;
    both_ways("welcome", &m);
    m.has_caps = 1;
    m.u.welcome.capabilities = FURROW_CAP_STATE;
    both_ways("welcome_caps", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_TELEMETRY;
    m.u.telemetry.seq = 42;
    m.u.telemetry.timestamp_ms = 1763683200123ull;
    m.u.telemetry.content_type = FURROW_CT_JSON;
    m.u.telemetry.payload = str("{\"t\":21.5}");
    both_ways("telemetry", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_ACK;
    m.u.ack.seq = 42;
    both_ways("ack", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_DESIRED;
    m.u.desired.version = 3;
    m.u.desired.document = str("{\"led\":\"on\"}");
    both_ways("desired", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_DESIRED_ACK;
    m.u.desired_ack.version = 3;
    both_ways("desired_ack", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_REPORT;
    m.u.report.seq = 43;
    m.u.report.timestamp_ms = 1763683200456ull;
    m.u.report.patch = str("{\"led\":\"on\"}");
    both_ways("report", &m);

    memset(&m, 0, sizeof m);
    m.type = FURROW_MSG_REJECT;
    m.u.reject.seq = 44;
    m.u.reject.code = FURROW_CODE_STATE_TOO_LARGE;
    m.u.reject.reason = str("state too large");
    both_ways("reject_state", &m);
}

/* The firmware vectors: outside this library, skipped; their headers are
 * well-formed frames of known types, which decoding refuses as unexpected. */
static void firmware_skipped(void)
{
    unsigned i;
    for (i = 0; i < sizeof FIRMWARE / sizeof FIRMWARE[0]; i++) {
        vector *v = find(FIRMWARE[i]);
        furrow_msg d;
        if (!v)
            continue;
        test_current = FIRMWARE[i];
        CHECK_EQ(furrow_frame_check(v->bytes, v->len, 65536), v->len);
        if (strcmp(FIRMWARE[i], "hello_fw") != 0)
            CHECK_EQ(furrow_decode(v->bytes, v->len, 65536, &d), FURROW_E_UNEXPECTED);
    }
}

static int take(fixture *x, const char *name, uint8_t type)
{
    furrow_msg m;
    uint8_t frame[512];
    size_t len = 0;
    vector *v = find(name);
    if (!fake_next(&x->fp, &m, frame, &len)) {
        CHECK(!"the device sent nothing");
        return 0;
    }
    CHECK_EQ(m.type, type);
    if (v)
        CHECK_MEM(frame, len, v->bytes, v->len);
    return 1;
}

/* The client itself speaks the vectors: its HELLO; after the WELCOME
 * vector (last_seq 41) its first reading goes out as seq 42, byte for byte
 * the TELEMETRY vector; the ACK vector acknowledges it. */
static void client_speaks_the_vectors(void)
{
    static fixture x;
    fake_event e;
    vector *w;

    test_current = "client_speaks_the_vectors";
    fix_init(&x, 0);
    CHECK_EQ(furrow_push(&x.c, 1763683200123ull, FURROW_CT_JSON, "{\"t\":21.5}", 10, NULL),
             FURROW_OK);
    fix_poll(&x);
    CHECK(take(&x, "hello", FURROW_MSG_HELLO));
    w = find("welcome");
    if (w)
        fake_feed(&x.fp, w->bytes, w->len);
    fix_poll(&x);
    CHECK_EQ(furrow_state(&x.c), FURROW_STATE_ONLINE);
    CHECK_EQ(fix_events(&x, FURROW_EV_CONNECTED, &e), 1);
    CHECK_EQ(e.seq, 41);
    CHECK(take(&x, "telemetry", FURROW_MSG_TELEMETRY));
    w = find("ack");
    if (w)
        fake_feed(&x.fp, w->bytes, w->len);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_ACKED, &e), 1);
    CHECK_EQ(e.seq, 42);
    CHECK_EQ(furrow_pending(&x.c), 0);

    /* With STATE: HELLO carries it; DESIRED is answered with the
     * DESIRED_ACK vector; a report goes out as the REPORT vector (seq 43,
     * after the reading above got 42); the REJECT vector is reported. */
    fix_init(&x, FURROW_CAP_STATE);
    CHECK_EQ(furrow_push(&x.c, 1763683200123ull, FURROW_CT_JSON, "{\"t\":21.5}", 10, NULL),
             FURROW_OK);
    CHECK_EQ(furrow_report(&x.c, 1763683200456ull, "{\"led\":\"on\"}", 12, NULL), FURROW_OK);
    fix_poll(&x);
    CHECK(take(&x, "hello_caps", FURROW_MSG_HELLO));
    w = find("welcome_caps");
    if (w)
        fake_feed(&x.fp, w->bytes, w->len);
    w = find("desired");
    if (w)
        fake_feed(&x.fp, w->bytes, w->len);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_DESIRED, &e), 1);
    CHECK_EQ(e.seq, 3);
    CHECK(strcmp(e.text, "{\"led\":\"on\"}") == 0);
    CHECK(take(&x, "desired_ack", FURROW_MSG_DESIRED_ACK));
    CHECK(take(&x, "telemetry", FURROW_MSG_TELEMETRY));
    CHECK(take(&x, "report", FURROW_MSG_REPORT));
    w = find("reject_state");
    if (w)
        fake_feed(&x.fp, w->bytes, w->len);
    fix_poll(&x);
    CHECK_EQ(fix_events(&x, FURROW_EV_REJECTED, &e), 1);
    CHECK_EQ(e.seq, 44);
    CHECK_EQ(e.code, FURROW_CODE_STATE_TOO_LARGE);
    CHECK(strcmp(e.text, "state too large") == 0);
}

void suite_vectors(const char *path)
{
    int i, before = test_failures;
    nvectors = 0;
    if (!load(path)) {
        test_failures++;
        return;
    }
    messages();
    firmware_skipped();
    client_speaks_the_vectors();
    /* A vector this suite does not know is a vector it does not check. */
    for (i = 0; i < nvectors; i++)
        if (!vectors[i].used) {
            fprintf(stderr, "FAIL: vector %s is not checked by the C tests\n", vectors[i].name);
            test_failures++;
        }
    if (test_failures == before)
        test_passed++;
    else
        test_failed_names("suite_vectors");
}

/* Seeds for both fuzzers: each vector behind the first byte they read as
 * settings (0: the default frame limit, reads of one byte, no STATE;
 * 0xA0: reads of 33 bytes, STATE), alone and all together. */
static int write_seed(const char *dir, const char *name, uint8_t first, const uint8_t *p,
                      size_t n)
{
    char file[512];
    FILE *f;
    size_t dl = strlen(dir), nl = strlen(name);
    if (dl + nl + 8 > sizeof file)
        return 1;
    memcpy(file, dir, dl);
    file[dl] = '/';
    memcpy(file + dl + 1, name, nl);
    sprintf(file + dl + 1 + nl, ".%02x", first);
    f = fopen(file, "wb");
    if (!f || fwrite(&first, 1, 1, f) != 1 || fwrite(p, 1, n, f) != n) {
        fprintf(stderr, "cannot write %s\n", file);
        if (f)
            fclose(f);
        return 1;
    }
    fclose(f);
    return 0;
}

int write_corpus(const char *path, const char *dir)
{
    static uint8_t all[8192];
    size_t len = 0;
    int i, bad = 0;
    if (!load(path))
        return 1;
    for (i = 0; i < nvectors; i++) {
        bad |= write_seed(dir, vectors[i].name, 0x00, vectors[i].bytes, vectors[i].len);
        bad |= write_seed(dir, vectors[i].name, 0xA0, vectors[i].bytes, vectors[i].len);
        if (len + vectors[i].len <= sizeof all) {
            memcpy(all + len, vectors[i].bytes, vectors[i].len);
            len += vectors[i].len;
        }
    }
    bad |= write_seed(dir, "all", 0x00, all, len);
    return bad;
}
