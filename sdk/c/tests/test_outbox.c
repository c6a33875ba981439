/*
 * test_outbox.c: the outbox on flash-like storage: order, ACKs, the ring
 * wrapping, a full outbox, reboots, markers, renumbering, a torn write at
 * every byte offset of the last record (for every write_align), damage in
 * the middle, and the file storage.
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#define _POSIX_C_SOURCE 200809L

#include <stdlib.h>
#include <unistd.h>

#include "furrow_posix.h"
#include "furrow_storage_ram.h"
#include "test.h"

#define PAGE 256u
#define PAGES 6u

static uint8_t mem[PAGE * 64];
static furrow_ram_storage rs;
static furrow_outbox ob;

/* Bytes a reading `n` takes in storage. */
static uint32_t rec_size(uint64_t n, uint32_t align)
{
    char p[32];
    uint32_t len = (uint32_t)snprintf(p, sizeof p, "{\"n\":%llu}", (unsigned long long)n);
    return (8u + 17u + len + align - 1u) & ~(align - 1u);
}

static void fresh(uint8_t align)
{
    memset(mem, 0xFF, sizeof mem);
    furrow_ram_storage_init(&rs, mem, PAGE, PAGES, align);
    CHECK_EQ(furrow_outbox_open(&ob, &rs.storage), FURROW_OK);
}

static void reboot(void)
{
    uint8_t align = rs.storage.write_align;
    uint32_t violations = rs.violations;
    furrow_ram_storage_init(&rs, mem, rs.storage.page_size, rs.storage.page_count, align);
    rs.violations = violations;
    CHECK_EQ(furrow_outbox_open(&ob, &rs.storage), FURROW_OK);
}

static int32_t push(uint64_t n, uint64_t *seq)
{
    char p[32];
    int len = snprintf(p, sizeof p, "{\"n\":%llu}", (unsigned long long)n);
    return furrow_outbox_append(&ob, FURROW_REC_TELEMETRY, 1000 + n, FURROW_CT_JSON, p,
                                (size_t)len, seq);
}

/* Reads the next record to send after `after`; checks it is reading n. */
static int next_is(uint64_t after, uint64_t want_seq, uint64_t n)
{
    uint8_t body[256];
    char p[32];
    furrow_record rec;
    int len = snprintf(p, sizeof p, "{\"n\":%llu}", (unsigned long long)n);
    int32_t r = furrow_outbox_next(&ob, after, body, sizeof body, &rec);
    CHECK_EQ(r, 1);
    if (r != 1)
        return 0;
    CHECK_EQ(rec.kind, FURROW_REC_TELEMETRY);
    CHECK_EQ(rec.seq, want_seq);
    CHECK_EQ(rec.body_len, 17u + (unsigned)len);
    CHECK_EQ(test_be(body, 8), want_seq);
    CHECK_EQ(test_be(body + 8, 8), 1000 + n);
    CHECK_EQ(body[16], FURROW_CT_JSON);
    CHECK_MEM(body + 17, rec.body_len - 17, p, (size_t)len);
    return 1;
}

static int none_after(uint64_t after)
{
    uint8_t body[256];
    furrow_record rec;
    int32_t r = furrow_outbox_next(&ob, after, body, sizeof body, &rec);
    CHECK_EQ(r, 0);
    return r == 0;
}

static void order_ack_and_reboot(void)
{
    uint64_t seq = 0, i;
    fresh(4);
    for (i = 1; i <= 3; i++) {
        CHECK_EQ(push(i, &seq), FURROW_OK);
        CHECK_EQ(seq, i);
    }
    CHECK_EQ(furrow_outbox_pending(&ob), 3);
    for (i = 1; i <= 3; i++)
        next_is(i - 1, i, i);
    none_after(3);
    CHECK_EQ(furrow_outbox_ack(&ob, 2), 1);
    CHECK_EQ(furrow_outbox_ack(&ob, 2), 0);
    CHECK_EQ(furrow_outbox_ack(&ob, 1), 0);
    CHECK_EQ(furrow_outbox_pending(&ob), 1);
    CHECK_EQ(furrow_outbox_acked(&ob), 2);
    reboot();
    /* Acked 2 was not marked (not drained, fewer than FURROW_ACK_MARK_EVERY):
     * 1 and 2 may come back; the gateway's last_seq drops them. */
    CHECK(furrow_outbox_pending(&ob) >= 1 && furrow_outbox_pending(&ob) <= 3);
    furrow_outbox_welcome(&ob, 2);
    CHECK_EQ(furrow_outbox_pending(&ob), 1);
    next_is(0, 3, 3);
    none_after(3);
    CHECK_EQ(push(4, &seq), FURROW_OK);
    CHECK_EQ(seq, 4);
    /* Drained: marked, so a reboot knows without the gateway. */
    CHECK_EQ(furrow_outbox_ack(&ob, 4), 1);
    reboot();
    CHECK_EQ(furrow_outbox_pending(&ob), 0);
    CHECK_EQ(furrow_outbox_acked(&ob), 4);
    CHECK_EQ(push(5, &seq), FURROW_OK);
    CHECK_EQ(seq, 5); /* the counter survived */
    CHECK_EQ(rs.violations, 0);
}

static void ack_beyond_what_was_given_out(void)
{
    uint64_t seq;
    fresh(1);
    CHECK_EQ(push(1, &seq), FURROW_OK);
    CHECK_EQ(furrow_outbox_ack(&ob, 1000), 1);
    CHECK_EQ(furrow_outbox_acked(&ob), 1);
    CHECK_EQ(furrow_outbox_pending(&ob), 0);
    CHECK_EQ(push(2, &seq), FURROW_OK);
    CHECK_EQ(seq, 2);
}

static void full_then_freed(void)
{
    uint64_t seq = 0, n = 0, i;
    fresh(8);
    while (push(n + 1, &seq) == FURROW_OK)
        n++;
    CHECK(n > 20);
    CHECK_EQ(push(n + 1, &seq), FURROW_E_FULL);
    CHECK_EQ(furrow_outbox_pending(&ob), n);
    /* Nothing lost across a reboot while full. */
    reboot();
    furrow_outbox_welcome(&ob, 0);
    for (i = 1; i <= n; i++)
        next_is(i - 1, i, i);
    none_after(n);
    /* ACK the first page's worth: room again. */
    CHECK_EQ(furrow_outbox_ack(&ob, n / 3), 1);
    CHECK_EQ(push(n + 1, &seq), FURROW_OK);
    CHECK_EQ(seq, n + 1);
    reboot();
    furrow_outbox_welcome(&ob, n / 3);
    for (i = n / 3 + 1; i <= n + 1; i++)
        next_is(i - 1, i, i);
    CHECK_EQ(rs.violations, 0);
}

/* A long run over the ring, with reboots, against a model: the records
 * come back in order, none lost, none out of order, seqs never reused
 * once sent. */
static void ring_wraps_many_times(void)
{
    uint64_t seq, sent;
    unsigned step, rng = 12345;
    int failures = test_failures;
    unsigned aligns[] = {1, 2, 4, 8, 16}, a;
    for (a = 0; a < sizeof aligns / sizeof aligns[0]; a++) {
        uint64_t produced = 0, acked = 0;
        fresh((uint8_t)aligns[a]);
        for (step = 0; step < 3000; step++) {
            rng = rng * 1103515245u + 12345u;
            switch ((rng >> 16) % 8) {
            case 0: case 1: case 2: case 3:
                if (push(produced + 1, &seq) == FURROW_OK) {
                    produced++;
                    CHECK_EQ(seq, produced);
                }
                break;
            case 4: case 5:
                if (produced > acked) {
                    acked += 1 + (rng >> 8) % (produced - acked);
                    furrow_outbox_ack(&ob, acked);
                }
                break;
            case 6:
                reboot();
                furrow_outbox_welcome(&ob, acked);
                break;
            default:
                /* Send everything pending, in order. */
                furrow_outbox_welcome(&ob, acked);
                for (sent = acked; sent < produced; sent++)
                    if (!next_is(sent, sent + 1, sent + 1))
                        break;
                none_after(produced);
                break;
            }
            CHECK_EQ(furrow_outbox_pending(&ob), produced - acked);
            if (test_failures != failures)
                return;
        }
        CHECK(produced > 500);
        CHECK_EQ(rs.violations, 0);
    }
}

/* Cuts the power after every possible number of bytes of the last
 * append (and of an append that opens a new page), then reboots: the
 * torn record is skipped, everything before it is intact, and the outbox
 * takes new records, which survive the next reboot. */
static void torn_write_at_every_offset(void)
{
    static uint8_t snapshot[sizeof mem];
    unsigned aligns[] = {1, 4, 8, 16}, a;
    int opens_page, failures = test_failures;
    for (a = 0; a < sizeof aligns / sizeof aligns[0]; a++) {
        for (opens_page = 0; opens_page <= 1; opens_page++) {
            uint64_t n = 0, seq = 0, k, good;
            uint32_t written, before, head;
            int garbled;
            fresh((uint8_t)aligns[a]);
            /* Some history: readings, an ACK, a marker. */
            for (n = 1; n <= 4; n++)
                CHECK_EQ(push(n, &seq), FURROW_OK);
            furrow_outbox_ack(&ob, 4);
            n = 5;
            CHECK_EQ(push(n++, &seq), FURROW_OK);
            if (opens_page) /* fill the page: the next append opens one */
                while (ob.head_off + rec_size(n + 1, aligns[a]) <= PAGE)
                    CHECK_EQ(push(n++, &seq), FURROW_OK);
            else if (ob.head_off + rec_size(n, aligns[a]) > PAGE)
                continue; /* this one would open a page: covered by the other case */
            good = n - 1;
            memcpy(snapshot, mem, sizeof mem);
            /* How many bytes the last append programs. */
            rs.write_budget = 1 << 30;
            CHECK_EQ(push(n, &seq), FURROW_OK);
            written = (uint32_t)((1 << 30) - rs.write_budget);
            CHECK(written > 0);
            for (k = 0; k < written; k++) {
                for (garbled = 0; garbled <= 1; garbled++) {
                    memcpy(mem, snapshot, sizeof mem);
                    reboot();
                    before = ob.head_off;
                    head = ob.head;
                    rs.write_budget = (int32_t)k;
                    CHECK(push(n, &seq) != FURROW_OK);
                    rs.write_budget = -1;
                    if (garbled && !opens_page && before + k < PAGE) {
                        /* The next byte half-programmed: some bits cleared. */
                        mem[head * PAGE + before + k] &= 0x5A;
                    }
                    reboot();
                    /* 1..4 acked; 5..good pending, intact, in order. */
                    CHECK_EQ(furrow_outbox_pending(&ob), good - 4);
                    furrow_outbox_welcome(&ob, 4);
                    for (seq = 4; seq < good; seq++)
                        if (!next_is(seq, seq + 1, seq + 1))
                            break;
                    none_after(good);
                    /* The torn seq is given out again; it survives a reboot. */
                    CHECK_EQ(push(n, &seq), FURROW_OK);
                    CHECK_EQ(seq, good + 1);
                    reboot();
                    furrow_outbox_welcome(&ob, good);
                    next_is(good, good + 1, n);
                    none_after(good + 1);
                    CHECK_EQ(rs.violations, 0);
                    if (test_failures != failures) {
                        fprintf(stderr, "  align %u, page open %d, cut after %llu of %u bytes%s\n",
                                aligns[a], opens_page, (unsigned long long)k, written,
                                garbled ? ", garbled" : "");
                        return;
                    }
                }
            }
        }
    }
}

static void damage_in_an_older_page(void)
{
    uint64_t seq = 0, n, first1 = 0, first2, last = 0;
    uint32_t off;
    int got = 0;
    fresh(4);
    for (n = 1; ob.head != 2; n++) {
        CHECK_EQ(push(n, &seq), FURROW_OK);
        if (ob.head == 1 && !first1)
            first1 = n;
    }
    first2 = seq;
    for (; n < first2 + 5; n++)
        CHECK_EQ(push(n, &seq), FURROW_OK);
    last = seq;
    /* Flip a bit inside the second record of page 1. */
    off = 40 + rec_size(first1, 4) + 10;
    mem[1 * PAGE + off] ^= 0x01;
    reboot();
    furrow_outbox_welcome(&ob, 0);
    /* Page 0 whole, page 1 up to the damage (its first record), then page
     * 2: nothing after a damaged record in its page is trusted. */
    seq = 0;
    for (;;) {
        uint8_t body[256];
        furrow_record rec;
        if (furrow_outbox_next(&ob, seq, body, sizeof body, &rec) != 1)
            break;
        CHECK(rec.seq > seq);
        CHECK(rec.seq <= first1 || rec.seq >= first2);
        seq = rec.seq;
        got++;
    }
    CHECK_EQ(seq, last); /* the newest came back */
    CHECK_EQ((uint64_t)got, first1 + 1 + last - first2);
}

static void renumbered_when_the_gateway_is_ahead(void)
{
    uint64_t seq;
    fresh(4);
    CHECK_EQ(push(1, &seq), FURROW_OK);
    CHECK_EQ(push(2, &seq), FURROW_OK);
    CHECK_EQ(push(3, &seq), FURROW_OK);
    /* A gateway that has stored up to 100 for this id (the device lost its
     * storage): what is pending follows 100. */
    furrow_outbox_welcome(&ob, 100);
    CHECK_EQ(furrow_outbox_pending(&ob), 3);
    next_is(100, 101, 1);
    next_is(101, 102, 2);
    next_is(102, 103, 3);
    CHECK_EQ(push(4, &seq), FURROW_OK);
    CHECK_EQ(seq, 104);
    CHECK_EQ(furrow_outbox_ack(&ob, 102), 1);
    CHECK_EQ(furrow_outbox_pending(&ob), 2);
    /* The numbering survives a reboot. */
    reboot();
    furrow_outbox_welcome(&ob, 102);
    CHECK_EQ(furrow_outbox_pending(&ob), 2);
    next_is(102, 103, 3);
    next_is(103, 104, 4);
    /* A gateway behind (its database restored from a backup): no change. */
    furrow_outbox_welcome(&ob, 50);
    next_is(102, 103, 3);
    CHECK_EQ(rs.violations, 0);
}

static void small_buffers_and_reports(void)
{
    uint8_t body[256];
    furrow_record rec;
    uint64_t seq;
    fresh(4);
    CHECK_EQ(push(1, &seq), FURROW_OK);
    CHECK_EQ(furrow_outbox_append(&ob, FURROW_REC_REPORT, 7, 0, "{\"a\":1}", 7, &seq), FURROW_OK);
    CHECK_EQ(seq, 2);
    CHECK_EQ(furrow_outbox_next(&ob, 0, body, 20, &rec), FURROW_E_AGAIN);
    CHECK_EQ(rec.body_len, 24);
    CHECK_EQ(furrow_outbox_next(&ob, 0, body, 24, &rec), 1);
    CHECK_EQ(rec.seq, 1);
    CHECK_EQ(furrow_outbox_next(&ob, 1, body, sizeof body, &rec), 1);
    CHECK_EQ(rec.kind, FURROW_REC_REPORT);
    CHECK_EQ(rec.body_len, 16 + 7);
    CHECK_MEM(body + 16, 7, "{\"a\":1}", 7);
    /* A record that could never fit a page; a bad kind. */
    CHECK_EQ(furrow_outbox_append(&ob, FURROW_REC_TELEMETRY, 0, 0, body, PAGE, NULL),
             FURROW_E_ARG);
    CHECK_EQ(furrow_outbox_append(&ob, 'X', 0, 0, body, 1, NULL), FURROW_E_ARG);
    CHECK_EQ(furrow_outbox_append(&ob, FURROW_REC_TELEMETRY, 0, 0, NULL, 1, NULL), FURROW_E_ARG);
    CHECK_EQ(furrow_outbox_append(&ob, FURROW_REC_TELEMETRY, 0, 0, NULL, 0, &seq), FURROW_OK);
    CHECK_EQ(seq, 3);
}

static void bad_storage_refused(void)
{
    furrow_ram_storage bad;
    furrow_outbox o;
    furrow_ram_storage_init(&bad, mem, 256, 1, 4); /* one page */
    CHECK_EQ(furrow_outbox_open(&o, &bad.storage), FURROW_E_ARG);
    furrow_ram_storage_init(&bad, mem, 256, 4, 3); /* align not a power of two */
    CHECK_EQ(furrow_outbox_open(&o, &bad.storage), FURROW_E_ARG);
    furrow_ram_storage_init(&bad, mem, 100, 4, 4); /* too small */
    CHECK_EQ(furrow_outbox_open(&o, &bad.storage), FURROW_E_ARG);
    furrow_ram_storage_init(&bad, mem, 260, 4, 8); /* not a multiple */
    CHECK_EQ(furrow_outbox_open(&o, &bad.storage), FURROW_E_ARG);
    furrow_ram_storage_init(&bad, mem, 256, 4, 32);
    CHECK_EQ(furrow_outbox_open(&o, &bad.storage), FURROW_E_ARG);
    /* Zeroed memory (RAM at boot) reads as no outbox: one is made. */
    memset(mem, 0, sizeof mem);
    furrow_ram_storage_init(&bad, mem, 256, 4, 4);
    CHECK_EQ(furrow_outbox_open(&o, &bad.storage), FURROW_OK);
    CHECK_EQ(furrow_outbox_pending(&o), 0);
    /* Storage that fails. */
    bad.write_budget = 0;
    CHECK_EQ(furrow_outbox_append(&o, FURROW_REC_TELEMETRY, 0, 0, "x", 1, NULL),
             FURROW_E_STORAGE);
}

static void file_storage(void)
{
    char path[] = "/tmp/furrow-outbox-XXXXXX";
    furrow_file_storage fs;
    uint64_t seq, i;
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    close(fd);
    CHECK_EQ(furrow_file_storage_open(&fs, path, 512, 4, 0), FURROW_OK);
    CHECK_EQ(furrow_outbox_open(&ob, &fs.storage), FURROW_OK);
    for (i = 1; i <= 40; i++)
        CHECK_EQ(push(i, &seq), FURROW_OK);
    CHECK_EQ(furrow_outbox_ack(&ob, 25), 1);
    furrow_file_storage_close(&fs);
    /* The process restarts: a new open of the same file. */
    CHECK_EQ(furrow_file_storage_open(&fs, path, 512, 4, 1), FURROW_OK);
    CHECK_EQ(furrow_outbox_open(&ob, &fs.storage), FURROW_OK);
    furrow_outbox_welcome(&ob, 25);
    for (i = 25; i < 40; i++)
        next_is(i, i + 1, i + 1);
    none_after(40);
    CHECK_EQ(push(41, &seq), FURROW_OK);
    CHECK_EQ(seq, 41);
    furrow_file_storage_close(&fs);
    unlink(path);
}

void suite_outbox(void)
{
    RUN(order_ack_and_reboot);
    RUN(ack_beyond_what_was_given_out);
    RUN(full_then_freed);
    RUN(ring_wraps_many_times);
    RUN(torn_write_at_every_offset);
    RUN(damage_in_an_older_page);
    RUN(renumbered_when_the_gateway_is_ahead);
    RUN(small_buffers_and_reports);
    RUN(bad_storage_refused);
    RUN(file_storage);
}
