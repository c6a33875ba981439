/*
 * furrow_outbox.c: readings waiting for their ACK, in a ring of flash
 * pages that survives a power cut.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why a log: flash can only be erased a page at a time and programmed
 * once per erase, so nothing is ever rewritten in place. Records are
 * appended to the head page; when it is full the next page of the ring is
 * erased and opened; a page is free again once the gateway has ACKed every
 * record in it. The ACKed position is recorded with small marker records
 * appended to the log, never by touching the records it covers.
 *
 * Records (integers big-endian), each aligned to the storage's write_align,
 * padding left erased (0xFF):
 *
 *     tag u8 | 0xFF | len u16 | crc32 u32 | body (len bytes)
 *     crc32 (IEEE) covers tag, 0xFF, len and the body
 *
 *     'P' page:    magic "FRW1" | epoch u32 | next u64 | acked u64 | offset u64
 *                  first in every page; epoch grows by one per page opened
 *     'D' reading: seq u64 | timestamp_ms u64 | content_type u8 | payload
 *     'R' report:  seq u64 | timestamp_ms u64 | patch
 *     'A' marker:  acked u64 | offset u64
 *
 * A 'D' body is a TELEMETRY frame body and an 'R' body a REPORT one, so
 * sending a record is one read into the send buffer. Seqs are stored as
 * local numbers: wire seq = local + offset (offset changes only when a
 * gateway turns out to be ahead of this outbox, furrow_outbox_welcome).
 *
 * Recovery scans: the head is the valid page with the highest epoch; the
 * chain is the run of pages before it whose epochs count down by one; the
 * seq counter and the ACKed position are the head's page record updated
 * by the records in the head page (a page record carries both, so a page
 * can be erased without losing them). The first record that is not valid
 * (erased, or torn by a power cut: a bad length or checksum) ends a page;
 * if anything after it in the head page is not erased, the head page is
 * closed and writing resumes in a fresh page. A record is written before
 * furrow_outbox_append() returns and is sent only after that, so a torn
 * record was never sent and its seq is simply given out again.
 */
#include <string.h>

#include "furrow_internal.h"

#define REC_HDR 8u
#define PAGE_BODY 32u
#define MARK_BODY 16u
#define MAGIC 0x46525731u /* "FRW1", read big-endian */

uint32_t furrow_crc32(uint32_t crc, const void *data, size_t n)
{
    /* Four bits at a time: 64 bytes of table instead of 1 KB. */
    static const uint32_t T[16] = {
        0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u,
        0x4DB26158u, 0x5005713Cu, 0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
        0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
    const uint8_t *p = (const uint8_t *)data;
    crc = ~crc;
    while (n-- > 0) {
        crc ^= *p++;
        crc = (crc >> 4) ^ T[crc & 15];
        crc = (crc >> 4) ^ T[crc & 15];
    }
    return ~crc;
}

static uint32_t align(const furrow_outbox *ob, uint32_t n)
{
    uint32_t a = ob->st->write_align;
    return (n + a - 1) & ~(a - 1);
}

/* Where the first record after the page record starts. */
static uint32_t first_rec(const furrow_outbox *ob)
{
    return align(ob, REC_HDR + PAGE_BODY);
}

static uint32_t page_addr(const furrow_outbox *ob, uint32_t page)
{
    return (uint32_t)page * ob->st->page_size;
}

static uint32_t next_page(const furrow_outbox *ob, uint32_t page)
{
    return (page + 1u) % ob->st->page_count;
}

static int32_t rd(const furrow_outbox *ob, uint32_t addr, void *buf, uint32_t len)
{
    return ob->st->read(ob->st->ctx, addr, buf, len) == FURROW_OK ? FURROW_OK : FURROW_E_STORAGE;
}

/* The ACKed position as page records (at +16) and markers (at 0) hold it. */
static void put_pos(const furrow_outbox *ob, uint8_t *p)
{
    furrow_put_be(p, 8, ob->acked);
    furrow_put_be(p + 8, 8, ob->offset);
}

static void get_pos(furrow_outbox *ob, const uint8_t *p)
{
    ob->acked = furrow_be64(p);
    ob->offset = furrow_be64(p + 8);
}

/* Writes one record at addr through a small staging buffer, so that every
 * storage write is write_align-sized and -aligned, whatever the payload. */
typedef struct {
    const furrow_outbox *ob;
    uint32_t addr, fill;
    int32_t err;
    uint8_t buf[64]; /* a multiple of every write_align, > REC_HDR + PAGE_BODY */
} stager;

static void stage_flush(stager *s)
{
    uint32_t n = align(s->ob, s->fill);
    memset(s->buf + s->fill, 0xFF, n - s->fill); /* padding stays erased */
    if (s->err == FURROW_OK && n > 0 &&
        s->ob->st->write(s->ob->st->ctx, s->addr, s->buf, n) != FURROW_OK)
        s->err = FURROW_E_STORAGE;
    s->addr += n;
    s->fill = 0;
}

static int32_t write_record(const furrow_outbox *ob, uint32_t addr, uint8_t tag,
                            const uint8_t *fixed, uint32_t flen, const void *payload, size_t len)
{
    const uint8_t *d = (const uint8_t *)payload;
    uint32_t crc;
    stager s;

    /* Header and fixed part straight into the staging buffer (they fit). */
    s.buf[0] = tag;
    s.buf[1] = 0xFF;
    furrow_put_be(s.buf + 2, 2, flen + len);
    memcpy(s.buf + REC_HDR, fixed, flen);
    crc = furrow_crc32(0, s.buf, 4);
    crc = furrow_crc32(crc, fixed, flen);
    crc = furrow_crc32(crc, payload, len);
    furrow_put_be(s.buf + 4, 4, crc);
    s.ob = ob;
    s.addr = addr;
    s.fill = REC_HDR + flen;
    s.err = FURROW_OK;
    while (len-- > 0) {
        s.buf[s.fill++] = *d++;
        if (s.fill == sizeof s.buf)
            stage_flush(&s);
    }
    stage_flush(&s);
    return s.err;
}

/* Reads and checks the record at addr, which must end by `end`: returns
 * its body length (the body goes to out if it fits cap, else its first
 * cap bytes do), -1 if there is no valid record there (erased, torn,
 * corrupt), or FURROW_E_STORAGE. */
static int32_t read_record(const furrow_outbox *ob, uint32_t addr, uint32_t end, uint8_t *tag,
                           uint8_t *out, size_t cap)
{
    uint8_t hdr[REC_HDR], chunk[64];
    uint32_t len, crc, done, k;

    if (addr + REC_HDR > end)
        return -1;
    if (rd(ob, addr, hdr, REC_HDR) != FURROW_OK)
        return FURROW_E_STORAGE;
    len = (uint32_t)hdr[2] << 8 | hdr[3];
    if (hdr[1] != 0xFF || align(ob, REC_HDR + len) > end - addr)
        return -1;
    crc = furrow_crc32(0, hdr, 4);
    /* The first cap bytes straight into out, the rest through chunk: a
     * record need not fit out to be checked (nor to be skipped). */
    for (done = 0; done < len; done += k) {
        uint8_t *dst = chunk;
        k = len - done;
        if (done < cap) {
            dst = out + done;
            if (k > cap - done)
                k = (uint32_t)(cap - done);
        } else if (k > sizeof chunk) {
            k = sizeof chunk;
        }
        if (rd(ob, addr + REC_HDR + done, dst, k) != FURROW_OK)
            return FURROW_E_STORAGE;
        crc = furrow_crc32(crc, dst, k);
    }
    if (crc != furrow_be32(hdr + 4))
        return -1;
    *tag = hdr[0];
    return (int32_t)len;
}

/* Reads the page record of `page` into body: FURROW_OK if it is valid. */
static int32_t read_page(const furrow_outbox *ob, uint32_t page, uint8_t body[PAGE_BODY])
{
    uint8_t tag = 0;
    uint32_t a = page_addr(ob, page);
    int32_t n = read_record(ob, a, a + ob->st->page_size, &tag, body, PAGE_BODY);
    if (n == FURROW_E_STORAGE)
        return n;
    return (n == (int32_t)PAGE_BODY && tag == 'P' && furrow_be32(body) == MAGIC) ? FURROW_OK : -1;
}

/* Moves the tail forward past pages with nothing left to send: pages
 * outside the chain (erased, or stale: their epoch is not the head's
 * minus their distance to it) and pages whose records are all
 * acknowledged (a page holds seqs below the `next` of the page after it). */
static void advance_tail(furrow_outbox *ob)
{
    uint8_t body[PAGE_BODY];
    uint32_t n = ob->st->page_count;
    while (ob->tail != ob->head) {
        uint32_t nx = next_page(ob, ob->tail);
        uint32_t dist = (ob->head + n - ob->tail) % n;
        if (read_page(ob, ob->tail, body) == FURROW_OK &&
            furrow_be32(body + 4) == ob->epoch - dist &&
            (read_page(ob, nx, body) != FURROW_OK || furrow_be64(body + 8) - 1 > ob->acked))
            break;
        ob->tail = nx;
    }
}

/* Erases the next page and opens it as the head. */
static int32_t open_page(furrow_outbox *ob)
{
    uint32_t nx = next_page(ob, ob->head);
    uint8_t body[PAGE_BODY];
    int32_t r;

    if (nx == ob->tail && ob->tail != ob->head)
        return FURROW_E_FULL;
    if (ob->st->erase(ob->st->ctx, nx) != FURROW_OK)
        return FURROW_E_STORAGE;
    if (ob->cur_page == nx) { /* a stale cursor: start over from the tail */
        ob->cur_page = ob->tail;
        ob->cur_off = 0;
    }
    memcpy(body, "FRW1", 4);
    furrow_put_be(body + 4, 4, ob->epoch + 1u);
    furrow_put_be(body + 8, 8, ob->next);
    put_pos(ob, body + 16);
    /* On failure the head stays where it is: a half-written page record
     * makes that page invalid, and the chain before it is intact. */
    r = write_record(ob, page_addr(ob, nx), 'P', body, PAGE_BODY, NULL, 0);
    if (r != FURROW_OK)
        return r;
    ob->head = nx;
    ob->epoch++;
    ob->head_off = first_rec(ob);
    ob->marked = ob->acked;
    advance_tail(ob);
    return FURROW_OK;
}

/* Appends a record to the head page, opening the next page if needed;
 * FURROW_E_ARG if it could never fit a page. */
static int32_t append(furrow_outbox *ob, uint8_t tag, const uint8_t *fixed, uint32_t flen,
                      const void *payload, size_t len)
{
    uint32_t size = align(ob, REC_HDR + flen + (uint32_t)len);
    int32_t r;

    if (size > ob->st->page_size - first_rec(ob))
        return FURROW_E_ARG;
    if (size > ob->st->page_size - ob->head_off) {
        r = open_page(ob);
        if (r != FURROW_OK)
            return r;
    }
    r = write_record(ob, page_addr(ob, ob->head) + ob->head_off, tag, fixed, flen, payload, len);
    if (r != FURROW_OK) {
        /* Some bytes may be programmed: never write there again, and keep
         * what follows out of this page (recovery stops at a bad record). */
        ob->head_off = ob->st->page_size;
        return r;
    }
    ob->head_off += size;
    return FURROW_OK;
}

/* Records the ACKed position (best effort: the page record of the next
 * page carries it too, and the gateway's last_seq covers a lost one). */
static void mark(furrow_outbox *ob)
{
    uint8_t body[MARK_BODY];
    put_pos(ob, body);
    if (append(ob, 'A', body, MARK_BODY, NULL, 0) == FURROW_OK)
        ob->marked = ob->acked;
}

static int erased(const furrow_outbox *ob, uint32_t addr, uint32_t end)
{
    uint8_t chunk[32];
    while (addr < end) {
        uint32_t k = end - addr, i;
        if (k > sizeof chunk)
            k = sizeof chunk;
        if (rd(ob, addr, chunk, k) != FURROW_OK)
            return 0;
        for (i = 0; i < k; i++)
            if (chunk[i] != 0xFF)
                return 0;
        addr += k;
    }
    return 1;
}

int32_t furrow_outbox_open(furrow_outbox *ob, const furrow_storage *st)
{
    uint8_t body[PAGE_BODY], tag = 0;
    uint32_t off, base, p;
    int32_t r;
    int found = 0;

    if (!ob || !st || !st->read || !st->write || !st->erase || st->page_count < 2 ||
        st->write_align == 0 || st->write_align > 16 ||
        (st->write_align & (st->write_align - 1u)) != 0 || st->page_size < 128 ||
        (st->page_size & (st->write_align - 1u)) != 0 ||
        st->page_size > 0x7FFFFFFFu / st->page_count)
        return FURROW_E_ARG;
    memset(ob, 0, sizeof *ob);
    ob->st = st;

    /* The head: the valid page with the highest epoch; its page record
     * holds the seq counter and the ACKed position as of its opening. */
    for (p = 0; p < st->page_count; p++) {
        r = read_page(ob, p, body);
        if (r == FURROW_E_STORAGE)
            return r;
        if (r == FURROW_OK && (!found || furrow_be32(body + 4) > ob->epoch)) {
            found = 1;
            ob->head = p;
            ob->epoch = furrow_be32(body + 4);
            ob->next = furrow_be64(body + 8);
            get_pos(ob, body + 16);
        }
    }
    if (!found) { /* new (or unreadable) storage: start at page 0 */
        ob->head = ob->tail = st->page_count - 1u;
        ob->next = 1;
        r = open_page(ob);
        ob->cur_page = ob->tail;
        return r;
    }

    /* The head page's records, up to the first that is not valid. */
    base = page_addr(ob, ob->head);
    off = first_rec(ob);
    for (;;) {
        int32_t n = read_record(ob, base + off, base + st->page_size, &tag, body, MARK_BODY);
        if (n == FURROW_E_STORAGE)
            return n;
        if (n < (int32_t)MARK_BODY)
            break; /* not valid (or too short for any record but a page's) */
        if (tag == 'D' || tag == 'R') {
            uint64_t seq = furrow_be64(body);
            if (seq >= ob->next)
                ob->next = seq + 1;
        } else if (tag == 'A') {
            get_pos(ob, body);
        } else {
            break;
        }
        off += align(ob, REC_HDR + (uint32_t)n);
    }
    ob->head_off = off;
    if (!erased(ob, base + off, base + st->page_size))
        ob->head_off = st->page_size; /* torn: continue in a fresh page */
    if (ob->acked >= ob->next)
        ob->acked = ob->next - 1;

    /* The tail: the oldest page of the chain with something to send. */
    ob->marked = ob->acked;
    ob->tail = next_page(ob, ob->head);
    advance_tail(ob);
    ob->cur_page = ob->tail;
    return FURROW_OK;
}

int32_t furrow_outbox_append(furrow_outbox *ob, uint8_t kind, uint64_t timestamp_ms,
                             uint8_t content_type, const void *payload, size_t len,
                             uint64_t *seq)
{
    uint8_t fixed[17];
    uint32_t flen = kind == FURROW_REC_TELEMETRY ? 17u : 16u;
    int32_t r;

    if ((kind != FURROW_REC_TELEMETRY && kind != FURROW_REC_REPORT) || (len > 0 && !payload) ||
        len > 0xFFFFu - flen)
        return FURROW_E_ARG;
    furrow_put_be(fixed, 8, ob->next);
    furrow_put_be(fixed + 8, 8, timestamp_ms);
    fixed[16] = content_type;
    r = append(ob, kind, fixed, flen, payload, len);
    if (r != FURROW_OK)
        return r;
    if (seq)
        *seq = ob->next + ob->offset;
    ob->next++;
    return FURROW_OK;
}

int32_t furrow_outbox_ack(furrow_outbox *ob, uint64_t seq)
{
    uint64_t local;
    if (seq < ob->offset)
        return 0;
    local = seq - ob->offset;
    if (local >= ob->next)
        local = ob->next - 1; /* never beyond what was given out */
    if (local <= ob->acked)
        return 0;
    ob->acked = local;
    advance_tail(ob);
    if (ob->acked - ob->marked >= FURROW_ACK_MARK_EVERY || ob->acked == ob->next - 1)
        mark(ob);
    return 1;
}

int32_t furrow_outbox_welcome(furrow_outbox *ob, uint64_t last_seq)
{
    if (last_seq > ob->next - 1 + ob->offset) {
        /* The gateway took seqs this outbox never gave out: what is
         * pending would be taken for duplicates. Renumber it to follow. */
        ob->offset = last_seq - ob->acked;
        mark(ob);
    } else {
        (void)furrow_outbox_ack(ob, last_seq);
    }
    ob->cur_page = ob->tail;
    ob->cur_off = 0;
    return FURROW_OK;
}

int32_t furrow_outbox_next(furrow_outbox *ob, uint64_t after, uint8_t *dst, size_t cap,
                           furrow_record *rec)
{
    uint8_t tag = 0;
    uint32_t pages = 0;

    if (cap < MARK_BODY)
        return FURROW_E_AGAIN; /* not even a seq fits */
    for (;;) {
        uint32_t end = ob->cur_page == ob->head ? ob->head_off : ob->st->page_size;
        uint32_t off = ob->cur_off ? ob->cur_off : first_rec(ob);
        uint32_t base = page_addr(ob, ob->cur_page);
        int32_t n = read_record(ob, base + off, base + end, &tag, dst, cap);
        uint64_t local;

        if (n == FURROW_E_STORAGE)
            return n;
        if (n < (int32_t)MARK_BODY || (tag != FURROW_REC_TELEMETRY && tag != FURROW_REC_REPORT &&
                                       tag != 'A')) {
            /* The end of this page's records (erased space, or a record
             * torn or damaged: nothing after it in the page is trusted). */
            if (ob->cur_page == ob->head || ++pages > ob->st->page_count) {
                ob->cur_off = off;
                return 0;
            }
            ob->cur_page = next_page(ob, ob->cur_page);
            ob->cur_off = 0;
            continue;
        }
        local = furrow_be64(dst);
        if (tag == 'A' || local <= ob->acked || local + ob->offset <= after) {
            ob->cur_off = off + align(ob, REC_HDR + (uint32_t)n);
            continue;
        }
        rec->body_len = (uint32_t)n;
        if ((size_t)n > cap)
            return FURROW_E_AGAIN; /* the cursor stays on it */
        ob->cur_off = off + align(ob, REC_HDR + (uint32_t)n);
        local += ob->offset;
        furrow_put_be(dst, 8, local);
        rec->kind = tag;
        rec->seq = local;
        return 1;
    }
}

uint64_t furrow_outbox_pending(const furrow_outbox *ob)
{
    return ob->next - 1 - ob->acked;
}

uint64_t furrow_outbox_acked(const furrow_outbox *ob)
{
    return ob->acked + ob->offset;
}
