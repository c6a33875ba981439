/*
 * furrow_frame.c: furrow/1 frames and messages, encoded and decoded
 * without I/O (docs/protocol.md, "Frames" and "Messages").
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why table-driven: every message body is a fixed sequence of a handful of
 * field kinds (u8, u16, u32, u64, str, rest, an optional u32), so one
 * walker over a per-type field list encodes and decodes all fourteen
 * types, and encode mirrors decode by construction. The spec's special
 * rules are hooks on that walk, in the spec's order: HELLO's version
 * decides alone (F_VER), COMMAND_RESULT's status is checked before what
 * follows it (F_STATUS), and seq 0, the device id and the token length are
 * checked after the body is known to be well-formed, as the reference
 * implementation (crates/furrow-proto) does.
 *
 * Every read is bounds-checked against the frame's end: a malformed frame
 * gives an error code, never a read outside the buffer.
 */
#include <string.h>

#include "furrow_internal.h"

/* Field kinds: integers, then byte ranges (from F_STR on). */
enum { F_END, F_U8, F_U16, F_U32, F_U64, F_CAPS, F_VER, F_STATUS, F_STR, F_REST };

/* Wire bytes of each kind's fixed part (a str's is its u16 count). */
static const uint8_t WIDTH[] = {0, 1, 2, 4, 8, 4, 1, 1, 2, 0};

/* A field: its kind and where it lives in furrow_msg. */
#define FLD(kind, member) kind, (uint8_t)offsetof(furrow_msg, u.member)

/* Every type's field list, F_END-terminated, in one table: a type finds
 * its list by a one-byte offset (LAYOUT) rather than a pointer. */
typedef struct {
    uint8_t hello[11], welcome[15], telemetry[9], u64[3], reject[7], command[9], result[9],
        error[5], goodbye[5], desired[5], report[7];
} field_lists;

static const field_lists LISTS = {
    {FLD(F_VER, hello.version), FLD(F_U16, hello.keepalive_s), FLD(F_STR, hello.device_id),
     FLD(F_STR, hello.token), FLD(F_CAPS, hello.capabilities), F_END},
    {FLD(F_U8, welcome.version), FLD(F_U16, welcome.keepalive_s), FLD(F_U32, welcome.max_frame),
     FLD(F_U16, welcome.max_inflight), FLD(F_U64, welcome.last_seq),
     FLD(F_U64, welcome.server_time_ms), FLD(F_CAPS, welcome.capabilities), F_END},
    {FLD(F_U64, telemetry.seq), FLD(F_U64, telemetry.timestamp_ms),
     FLD(F_U8, telemetry.content_type), FLD(F_REST, telemetry.payload), F_END},
    /* ACK, PING, PONG and DESIRED_ACK: one u64 at the start of the union. */
    {FLD(F_U64, ack.seq), F_END},
    {FLD(F_U64, reject.seq), FLD(F_U16, reject.code), FLD(F_STR, reject.reason), F_END},
    {FLD(F_U64, command.command_id), FLD(F_STR, command.name), FLD(F_U8, command.content_type),
     FLD(F_REST, command.payload), F_END},
    {FLD(F_U64, command_result.command_id), FLD(F_STATUS, command_result.status),
     FLD(F_U8, command_result.content_type), FLD(F_REST, command_result.payload), F_END},
    {FLD(F_U16, error.code), FLD(F_STR, error.message), F_END},
    {FLD(F_U16, goodbye.code), FLD(F_U32, goodbye.retry_after_ms), F_END},
    {FLD(F_U64, desired.version), FLD(F_REST, desired.document), F_END},
    {FLD(F_U64, report.seq), FLD(F_U64, report.timestamp_ms), FLD(F_REST, report.patch), F_END}};

#define AT(list) (uint8_t)offsetof(field_lists, list)

/* Indexed by type - 1, HELLO (0x01) to REPORT (0x0E). */
static const uint8_t LAYOUT[FURROW_MSG_REPORT] = {
    AT(hello), AT(welcome), AT(telemetry), AT(u64),     AT(reject),  AT(command), AT(result),
    AT(u64),   AT(u64),     AT(error),     AT(goodbye), AT(desired), AT(u64),     AT(report)};

/* The field list of type t (1..FURROW_MSG_REPORT). */
static const uint8_t *fields(uint8_t t)
{
    return (const uint8_t *)&LISTS + LAYOUT[t - 1];
}

void furrow_put_be(uint8_t *p, unsigned n, uint64_t v)
{
    while (n-- > 0) {
        p[n] = (uint8_t)v;
        v >>= 8;
    }
}

uint64_t furrow_get_be(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    while (n-- > 0)
        v = (v << 8) | *p++;
    return v;
}

/* Host-order loads and stores of a w-byte integer field of furrow_msg.
 * Fixed-width integers have no padding bits, so a field's bytes are the
 * low-order w bytes of the u64: the first w on a little-endian host, the
 * last w on a big-endian one. memcpy: no alignment or aliasing questions. */
static unsigned low_bytes(unsigned w)
{
    static const uint16_t probe = 1;
    return *(const uint8_t *)&probe ? 0u : 8u - w;
}

static uint64_t load(const uint8_t *src, unsigned w)
{
    uint64_t v = 0;
    memcpy((uint8_t *)&v + low_bytes(w), src, w);
    return v;
}

static void store(uint8_t *dst, uint64_t v, unsigned w)
{
    memcpy(dst, (const uint8_t *)&v + low_bytes(w), w);
}

/* Strict UTF-8 (RFC 3629): no overlongs, no surrogates, nothing above
 * U+10FFFF, no truncated sequence. */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t c = s[i++], cp;
        unsigned more, k;
        if (c < 0x80)
            continue;
        /* A lead byte: C0 and C1 only start overlongs, F5 and up code
         * points above U+10FFFF, and 80..BF are continuations. */
        if (c < 0xC2 || c > 0xF4)
            return 0;
        more = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
        if (n - i < more)
            return 0;
        cp = c & (0x3Fu >> more);
        for (k = 0; k < more; k++) {
            c = s[i++];
            if ((c & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (c & 0x3F);
        }
        /* Overlong below 0x800 (3 bytes) or 0x10000 (4 bytes); C2 already
         * rules it out for 2. */
        if (cp < (1u << (5 * more + 1)) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
    }
    return 1;
}

int furrow_valid_device_id(const uint8_t *id, size_t len)
{
    size_t i;
    if (len == 0 || len > 128)
        return 0;
    for (i = 0; i < len; i++) {
        uint8_t ch = id[i], lower = (uint8_t)(ch | 0x20);
        /* '-' to ':' is - . / 0..9 : (all but '/'), then letters and '_'. */
        if (!((ch >= '-' && ch <= ':' && ch != '/') || (lower >= 'a' && lower <= 'z') || ch == '_'))
            return 0;
    }
    return 1;
}

int32_t furrow_frame_check(const uint8_t *buf, size_t avail, uint32_t max_len)
{
    uint32_t len;
    if (avail < 4)
        return FURROW_E_AGAIN;
    len = furrow_be32(buf);
    if (len < 2)
        return FURROW_E_LENGTH;
    /* Decided on the four length bytes alone: nothing oversized is buffered. */
    if (len > max_len || len > 0x7FFFFFF0u)
        return FURROW_E_TOO_LARGE;
    /* Flags before type, and neither until both bytes are here, so the
     * answer does not depend on how the header was split across reads. */
    if (avail >= FURROW_HEADER_LEN) {
        if (buf[5] != 0)
            return FURROW_E_FLAGS;
        if (buf[4] == 0 || buf[4] > FURROW_MSG_LAST_KNOWN)
            return FURROW_E_TYPE;
    }
    return (int32_t)(len + 4);
}

int32_t furrow_decode(const uint8_t *buf, size_t avail, uint32_t max_len, furrow_msg *m)
{
    int32_t total = furrow_frame_check(buf, avail, max_len);
    const uint8_t *p = buf + FURROW_HEADER_LEN, *end, *f;

    if (total < 0)
        return total;
    if (avail < FURROW_HEADER_LEN || avail < (size_t)total)
        return FURROW_E_AGAIN;
    end = buf + total;
    memset(m, 0, sizeof *m);
    m->type = buf[4];
    if (m->type > FURROW_MSG_REPORT)
        return FURROW_E_UNEXPECTED; /* firmware: outside this library */

    for (f = fields(m->type); *f != F_END; f += 2) {
        uint8_t *dst = (uint8_t *)m + f[1];
        unsigned w = WIDTH[*f];
        size_t left = (size_t)(end - p);
        furrow_bytes b;
        uint64_t v;

        if (*f == F_CAPS) {
            if (left == 0)
                continue; /* absent: a HELLO / WELCOME without capabilities */
            m->has_caps = 1;
        }
        if (left < w)
            return FURROW_E_SHORT;
        v = furrow_get_be(p, w);
        p += w;
        if (*f >= F_STR) {
            if (*f == F_REST)
                v = left; /* w is 0: the rest of the body */
            if ((size_t)(end - p) < v)
                return FURROW_E_SHORT;
            b.data = p;
            b.len = (size_t)v;
            memcpy(dst, &b, sizeof b);
            if (*f == F_STR && !utf8_valid(p, b.len))
                return FURROW_E_UTF8;
            p += b.len;
            continue;
        }
        store(dst, v, w);
        if (*f == F_VER && v != FURROW_PROTOCOL_VERSION)
            return FURROW_E_VERSION; /* whatever follows it */
        if (*f == F_STATUS && v > FURROW_STATUS_UNKNOWN)
            return FURROW_E_FIELD;
    }
    if (p != end)
        return FURROW_E_LEFTOVER;

    switch (m->type) {
    case FURROW_MSG_HELLO:
        if (!furrow_valid_device_id(m->u.hello.device_id.data, m->u.hello.device_id.len) ||
            m->u.hello.token.len > 256)
            return FURROW_E_FIELD;
        break;
    case FURROW_MSG_TELEMETRY:
        if (m->u.telemetry.seq == 0)
            return FURROW_E_FIELD;
        break;
    case FURROW_MSG_REPORT:
        if (m->u.report.seq == 0)
            return FURROW_E_FIELD;
        break;
    default:
        break;
    }
    return total;
}

int32_t furrow_encode(const furrow_msg *m, uint8_t *buf, size_t cap)
{
    uint8_t *p = buf + FURROW_HEADER_LEN;
    const uint8_t *f;
    size_t left, total;

    if (m->type == 0 || m->type > FURROW_MSG_REPORT)
        return FURROW_E_ARG;
    if (cap > 0x7FFFFFF0u)
        cap = 0x7FFFFFF0u; /* the length must fit the return value */
    if (cap < FURROW_HEADER_LEN)
        return FURROW_E_TOO_LARGE;
    left = cap - FURROW_HEADER_LEN;

    for (f = fields(m->type); *f != F_END; f += 2) {
        const uint8_t *src = (const uint8_t *)m + f[1];
        unsigned w = WIDTH[*f];
        furrow_bytes b = {NULL, 0}; /* an integer field: its value, no bytes */
        uint64_t v;

        if (*f == F_CAPS && !m->has_caps)
            continue;
        if (*f >= F_STR) {
            memcpy(&b, src, sizeof b);
            if (*f == F_STR && b.len > 0xFFFF)
                return FURROW_E_ARG;
            v = b.len; /* a str's count (w is 0 for rest) */
        } else {
            v = load(src, w);
        }
        if (left < w || left - w < b.len)
            return FURROW_E_TOO_LARGE;
        furrow_put_be(p, w, v);
        p += w;
        if (b.len > 0)
            memmove(p, b.data, b.len); /* may be in buf already */
        p += b.len;
        left -= w + b.len;
    }
    total = (size_t)(p - buf);
    furrow_put_be(buf, 4, total - 4);
    buf[4] = m->type;
    buf[5] = 0;
    return (int32_t)total;
}
