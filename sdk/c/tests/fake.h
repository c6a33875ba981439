/*
 * fake.h: a scripted port and a client fixture for the state machine tests.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * The fake port is the gateway's side of the wire as data: the test feeds
 * the bytes the gateway "sends" (fake_feed), reads back what the device
 * sent (fake_next), decides what connect() answers, cuts reads and writes
 * into small pieces, and blocks sends. The clock is whatever the test
 * passes to furrow_poll.
 */
#ifndef FURROW_FAKE_H
#define FURROW_FAKE_H

#include "furrow.h"
#include "furrow_storage_ram.h"

typedef struct {
    furrow_port port;
    uint8_t in[65536];
    size_t in_len, in_off;
    uint8_t out[262144];
    size_t out_len, out_read;
    int32_t connect_result; /* what connect() answers */
    int connects, closes, connected;
    int peer_closed;        /* recv answers FURROW_E_CLOSED once in is drained */
    size_t recv_max, send_max; /* 0: no limit */
    int send_blocked;       /* send answers FURROW_E_AGAIN */
    long send_budget;       /* bytes send takes before answering FURROW_E_AGAIN; < 0: no limit */
    int32_t send_error;     /* send answers this error, when set */
    uint32_t random_value;
} fake_port;

void fake_init(fake_port *f);
void fake_feed(fake_port *f, const void *bytes, size_t n);
void fake_feed_msg(fake_port *f, const furrow_msg *m);
/* The next frame the device sent, decoded into m (its bytes to frame, if
 * given, with its length in *len): 1 if there is one, 0 if not. */
int fake_next(fake_port *f, furrow_msg *m, uint8_t *frame, size_t *len);
/* Frames the device sent that were not read yet. */
int fake_pending_frames(const fake_port *f);

/* Events the client reported, kept for checks. */
typedef struct {
    uint8_t kind;
    int32_t reason;
    uint16_t code;
    uint32_t retry_in_ms;
    uint64_t seq;
    char text[64];
} fake_event;

typedef struct {
    fake_port fp;
    furrow_ram_storage rs;
    uint8_t mem[8 * 1024];
    uint8_t rx[512], tx[1024];
    furrow_config cfg;
    furrow_client c;
    fake_event ev[256];
    int nev;
    /* The command callback: how to answer. */
    uint8_t cmd_status;
    const char *cmd_result;
    int commands, last_repeated;
    uint32_t now;
} fixture;

/* A fixture for device pump-17 / token k3y / keepalive 30, no capabilities
 * (caps may add STATE), with fresh RAM storage. */
void fix_init(fixture *x, uint32_t caps);
/* Re-initializes the client over the same storage (a reboot). */
void fix_reboot(fixture *x);
uint32_t fix_poll(fixture *x);
/* Polls until the device has connected and sent HELLO, then answers
 * WELCOME with this max_inflight, last_seq and capabilities (has_caps if
 * caps != 0xFFFFFFFF). Drains the HELLO. */
void fix_welcome(fixture *x, uint16_t max_inflight, uint64_t last_seq, uint32_t caps);
/* How many events of a kind were reported; the last one in *last. */
int fix_events(const fixture *x, uint8_t kind, fake_event *last);
void fix_feed_u64(fixture *x, uint8_t type, uint64_t v);

#endif
