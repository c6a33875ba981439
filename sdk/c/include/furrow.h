/*
 * furrow.h: the Furrow device library for microcontrollers (furrow/1).
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why it looks like this: devices that run on tens of kilobytes of RAM,
 * with no heap, no filesystem and no threads, still have to keep the
 * gateway's promise that a reading is stored exactly once however often
 * the network or the power drops. So:
 *
 *  - every byte the library uses is in a furrow_client (a few hundred
 *    bytes) or in buffers and storage the caller hands over; it never
 *    calls malloc, has no globals and never blocks on its own;
 *  - the network, the TLS stack and the flash are the caller's, behind
 *    small tables of functions (furrow_port, furrow_storage);
 *  - the application drives it: call furrow_poll() from the main loop or
 *    an RTOS task, and again within the milliseconds it returns;
 *  - readings wait in an outbox on caller-provided storage (internal
 *    flash, an external NOR chip, a file, RAM) until the gateway ACKs
 *    them, and come back after a power cut, seq counter included.
 *
 * One client, one context: call the functions of one client from one
 * task (or guard them with one lock). Callbacks run inside furrow_poll();
 * they may call furrow_push()/furrow_report() but not furrow_poll().
 *
 * The wire format is docs/protocol.md (normative); the lower half of this
 * file (furrow_msg, furrow_encode, furrow_decode) is that format without
 * I/O, usable on its own.
 */
#ifndef FURROW_H
#define FURROW_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* Results                                                             */
/* ------------------------------------------------------------------ */

/* Every function that can fail returns FURROW_OK (0), a count (> 0), or
 * one of these negative codes. Port functions return them too. */
enum {
    FURROW_OK = 0,
    FURROW_E_AGAIN = -1,        /* would block / not enough bytes yet: call again */
    FURROW_E_CLOSED = -2,       /* the peer closed the connection */
    FURROW_E_IO = -3,           /* the transport failed (connect, send, recv, TLS) */
    FURROW_E_ARG = -4,          /* bad argument: NULL, invalid device id, too large */
    FURROW_E_FULL = -5,         /* the outbox has no room until the gateway ACKs */
    FURROW_E_STORAGE = -6,      /* the storage port failed */
    FURROW_E_STATE = -7,        /* not now: stopped, offline, capability not granted */
    FURROW_E_TIMEOUT = -8,      /* connect or handshake took too long */
    FURROW_E_KEEPALIVE = -9,    /* nothing from the gateway for 1.5 x keepalive */
    FURROW_E_GATEWAY = -10,     /* the gateway sent ERROR (event code says which) */
    FURROW_E_GOODBYE = -11,     /* the gateway sent GOODBYE (event code says which) */
    FURROW_E_STOPPED = -12,     /* furrow_stop() ended the session */
    /* A malformed frame (docs/protocol.md, "Frames"). The gateway answers
     * the first five with ERROR PROTOCOL_ERROR (1) or FRAME_TOO_LARGE (4),
     * UNKNOWN_TYPE (5), UNSUPPORTED_VERSION (2); this library closes the
     * connection. */
    FURROW_E_LENGTH = -20,      /* length field below 2 */
    FURROW_E_TOO_LARGE = -21,   /* frame larger than the limit (the receive
                                   buffer), or larger than an output buffer */
    FURROW_E_FLAGS = -22,       /* flags byte not 0 */
    FURROW_E_TYPE = -23,        /* unknown message type */
    FURROW_E_SHORT = -24,       /* body too short for its fields */
    FURROW_E_LEFTOVER = -25,    /* bytes left over after the last field */
    FURROW_E_UTF8 = -26,        /* a str field is not UTF-8 */
    FURROW_E_FIELD = -27,       /* a field value the spec forbids (seq 0,
                                   status > 2, device id, token > 256 bytes) */
    FURROW_E_VERSION = -28,     /* HELLO version other than 1 */
    FURROW_E_UNEXPECTED = -29   /* a valid message this side may not get now
                                   (wrong direction, before WELCOME, a
                                   capability not granted, firmware) */
};

/* ------------------------------------------------------------------ */
/* Protocol constants (docs/protocol.md)                               */
/* ------------------------------------------------------------------ */

#define FURROW_PROTOCOL_VERSION 1u
#define FURROW_HEADER_LEN 6u /* length u32, type u8, flags u8 */

enum {
    FURROW_MSG_HELLO = 0x01,
    FURROW_MSG_WELCOME = 0x02,
    FURROW_MSG_TELEMETRY = 0x03,
    FURROW_MSG_ACK = 0x04,
    FURROW_MSG_REJECT = 0x05,
    FURROW_MSG_COMMAND = 0x06,
    FURROW_MSG_COMMAND_RESULT = 0x07,
    FURROW_MSG_PING = 0x08,
    FURROW_MSG_PONG = 0x09,
    FURROW_MSG_ERROR = 0x0A,
    FURROW_MSG_GOODBYE = 0x0B,
    FURROW_MSG_DESIRED = 0x0C,
    FURROW_MSG_DESIRED_ACK = 0x0D,
    FURROW_MSG_REPORT = 0x0E,
    /* 0x0F..0x12: firmware (capability FIRMWARE). Known types, so the
     * frame layer accepts them, but outside this library: furrow_decode()
     * answers FURROW_E_UNEXPECTED and the client never asks for them. */
    FURROW_MSG_LAST_KNOWN = 0x12
};

/* Capability bits of HELLO and WELCOME. */
#define FURROW_CAP_STATE 0x00000001u
#define FURROW_CAP_FIRMWARE 0x00000002u /* never requested by this library */

/* Content types. */
enum { FURROW_CT_OCTETS = 0, FURROW_CT_JSON = 1, FURROW_CT_CBOR = 2, FURROW_CT_TEXT = 3 };

/* COMMAND_RESULT statuses. */
enum {
    FURROW_STATUS_SUCCEEDED = 0,
    FURROW_STATUS_FAILED = 1,
    FURROW_STATUS_UNKNOWN = 2
};

/* ERROR / REJECT codes and GOODBYE codes, as the gateway sends them. */
enum {
    FURROW_CODE_PROTOCOL_ERROR = 1,
    FURROW_CODE_UNSUPPORTED_VERSION = 2,
    FURROW_CODE_AUTH_FAILED = 3,
    FURROW_CODE_FRAME_TOO_LARGE = 4,
    FURROW_CODE_UNKNOWN_TYPE = 5,
    FURROW_CODE_HANDSHAKE_TIMEOUT = 6,
    FURROW_CODE_KEEPALIVE_TIMEOUT = 7,
    FURROW_CODE_BUSY = 8,
    FURROW_CODE_INTERNAL = 9,
    FURROW_CODE_INVALID_PAYLOAD = 20,
    FURROW_CODE_UNSUPPORTED_CONTENT_TYPE = 21,
    FURROW_CODE_STATE_TOO_LARGE = 22
};
enum {
    FURROW_BYE_NORMAL = 0,
    FURROW_BYE_SERVER_SHUTDOWN = 1,
    FURROW_BYE_SESSION_TAKEN_OVER = 2,
    FURROW_BYE_DEVICE_REVOKED = 3
};

/* ------------------------------------------------------------------ */
/* Messages: encode and decode, no I/O                                 */
/* ------------------------------------------------------------------ */

/* A byte range: a str field (UTF-8 checked on decode) or a rest field.
 * Decoded ranges point into the frame's buffer. */
typedef struct {
    const uint8_t *data;
    size_t len;
} furrow_bytes;

/* One furrow/1 message (types 0x01..0x0E). `has_caps` says whether the
 * optional capabilities field of HELLO / WELCOME is present. PING and PONG
 * both use u.ping. */
typedef struct {
    uint8_t type;
    uint8_t has_caps;
    union {
        struct { uint8_t version; uint16_t keepalive_s; furrow_bytes device_id, token;
                 uint32_t capabilities; } hello;
        struct { uint8_t version; uint16_t keepalive_s; uint32_t max_frame; uint16_t max_inflight;
                 uint64_t last_seq, server_time_ms; uint32_t capabilities; } welcome;
        struct { uint64_t seq, timestamp_ms; uint8_t content_type; furrow_bytes payload; } telemetry;
        struct { uint64_t seq; } ack;
        struct { uint64_t seq; uint16_t code; furrow_bytes reason; } reject;
        struct { uint64_t command_id; furrow_bytes name; uint8_t content_type;
                 furrow_bytes payload; } command;
        struct { uint64_t command_id; uint8_t status, content_type; furrow_bytes payload; } command_result;
        struct { uint64_t nonce; } ping;
        struct { uint16_t code; furrow_bytes message; } error;
        struct { uint16_t code; uint32_t retry_after_ms; } goodbye;
        struct { uint64_t version; furrow_bytes document; } desired;
        struct { uint64_t version; } desired_ack;
        struct { uint64_t seq, timestamp_ms; furrow_bytes patch; } report;
    } u;
} furrow_msg;

/* Checks the header bytes that `buf` holds (avail of them), in the spec's
 * order: length (below 2, above max_len), then flags, then type, each as
 * soon as its bytes are there. Returns the frame's whole wire length
 * (4 + length) once the four length bytes are there, FURROW_E_AGAIN
 * before, or an error. max_len is the largest accepted length field. */
int32_t furrow_frame_check(const uint8_t *buf, size_t avail, uint32_t max_len);

/* Decodes the frame at the start of buf if it is complete: returns the
 * bytes it took (> 0), FURROW_E_AGAIN if more are needed, or an error
 * (FURROW_E_LENGTH .. FURROW_E_UNEXPECTED). Every field rule of the spec
 * is checked; str and rest fields of *m point into buf. */
int32_t furrow_decode(const uint8_t *buf, size_t avail, uint32_t max_len, furrow_msg *m);

/* Encodes *m as one frame into buf: returns its length, or FURROW_E_TOO_LARGE
 * (buf too small), FURROW_E_ARG (a str over 65,535 bytes, an unknown type).
 * Payload fields may point into buf itself (they are moved, not copied). */
int32_t furrow_encode(const furrow_msg *m, uint8_t *buf, size_t cap);

/* Whether id is a valid device id: 1 to 128 bytes of [A-Za-z0-9._:-]. */
int furrow_valid_device_id(const uint8_t *id, size_t len);

/* CRC-32 (IEEE 802.3, as zlib computes it) of n bytes, continuing from crc
 * (start with 0). The outbox checksums its records with it. */
uint32_t furrow_crc32(uint32_t crc, const void *data, size_t n);

/* Full-jitter exponential backoff: the delay before reconnect attempt
 * `attempt` (0-based) is uniform in [0, min(max_ms, initial_ms * 2^attempt)],
 * drawn from `random`. Pure; the client uses it with the port's random. */
uint32_t furrow_backoff_delay(uint32_t initial_ms, uint32_t max_ms, uint32_t attempt,
                              uint32_t random);

/* ------------------------------------------------------------------ */
/* Storage: the outbox's pages                                         */
/* ------------------------------------------------------------------ */

/* Fixed-size pages with flash semantics: erase sets a whole page to 0xFF,
 * write only programs bytes that are erased. The outbox writes every byte
 * at most once between erases, in write_align-sized, -aligned pieces, so
 * this maps straight onto internal flash (write_align 8 on STM32L4,
 * 4 on ESP32), an external NOR chip (1) or a file. Addresses are
 * page * page_size + offset. Each function returns FURROW_OK or a
 * negative code (FURROW_E_STORAGE). */
typedef struct furrow_storage {
    void *ctx;
    uint32_t page_size;  /* bytes per page: at least 128, a multiple of write_align */
    uint16_t page_count; /* pages: at least 2 */
    uint8_t write_align; /* program unit: 1, 2, 4, 8 or 16 */
    int32_t (*read)(void *ctx, uint32_t addr, void *buf, uint32_t len);
    int32_t (*write)(void *ctx, uint32_t addr, const void *buf, uint32_t len);
    int32_t (*erase)(void *ctx, uint32_t page);
} furrow_storage;

/* ------------------------------------------------------------------ */
/* The outbox                                                          */
/* ------------------------------------------------------------------ */

/* Readings (and state reports) waiting for their ACK: a log of
 * checksummed records in a ring of pages. The client owns one; it is
 * public so it can be tested and used on its own. Seqs here are the ones
 * on the wire. After a reboot furrow_outbox_open() finds the head, the
 * tail, the ACKed position and the seq counter by scanning, and skips a
 * record torn by a power cut. Record layout: furrow_outbox.c. */
typedef struct furrow_outbox {
    const furrow_storage *st;
    uint64_t next;     /* local seq of the next record */
    uint64_t acked;    /* local seq: everything up to it is delivered */
    uint64_t marked;   /* acked as last recorded in storage */
    uint64_t offset;   /* wire seq = local seq + offset (see furrow_outbox_welcome) */
    uint32_t epoch;    /* the head page's */
    uint32_t head_off; /* where the next record goes in the head page */
    uint32_t cur_off;  /* send cursor: the next record to look at... */
    uint32_t cur_page; /* ...in this page */
    uint32_t head, tail; /* pages: the one written, the oldest with something to send */
} furrow_outbox;

enum { FURROW_REC_TELEMETRY = 'D', FURROW_REC_REPORT = 'R' };

/* A record read back for sending: its body is a TELEMETRY or REPORT
 * frame body (seq, timestamp, [content type], payload), with the wire seq. */
typedef struct {
    uint8_t kind;       /* FURROW_REC_TELEMETRY or FURROW_REC_REPORT */
    uint64_t seq;       /* wire seq */
    uint32_t body_len;  /* bytes of the frame body */
} furrow_record;

/* Recovers the outbox from storage (formats it if it holds none). */
int32_t furrow_outbox_open(furrow_outbox *ob, const furrow_storage *st);
/* Appends a record; its wire seq goes to *seq (may be NULL). FURROW_E_FULL
 * when every page holds unacknowledged records; FURROW_E_ARG when it could
 * never fit a page. A REPORT ignores content_type. */
int32_t furrow_outbox_append(furrow_outbox *ob, uint8_t kind, uint64_t timestamp_ms,
                             uint8_t content_type, const void *payload, size_t len,
                             uint64_t *seq);
/* Everything up to wire seq `seq` is delivered: frees pages, and records
 * the position now and then (every FURROW_ACK_MARK_EVERY records, and
 * whenever the outbox drains). Returns 1 if it moved, 0 if not. */
int32_t furrow_outbox_ack(furrow_outbox *ob, uint64_t seq);
/* WELCOME's last_seq: drops what the gateway has, or, if it is ahead of
 * every seq this outbox ever gave out (the device lost its storage, or is
 * new to a gateway that knows its id), renumbers what is pending to follow
 * it. Rewinds the send cursor to the oldest pending record. */
int32_t furrow_outbox_welcome(furrow_outbox *ob, uint64_t last_seq);
/* Reads the first record with wire seq > after (and > the ACKed one) into
 * dst: returns 1 (rec filled, body in dst), 0 (none), FURROW_E_AGAIN
 * (rec->body_len bytes do not fit cap; the cursor stays) or an error. */
int32_t furrow_outbox_next(furrow_outbox *ob, uint64_t after, uint8_t *dst, size_t cap,
                           furrow_record *rec);
/* Records not yet acknowledged. */
uint64_t furrow_outbox_pending(const furrow_outbox *ob);
/* Highest wire seq acknowledged (or known stored). */
uint64_t furrow_outbox_acked(const furrow_outbox *ob);

#ifndef FURROW_ACK_MARK_EVERY
#define FURROW_ACK_MARK_EVERY 64u
#endif

/* ------------------------------------------------------------------ */
/* The porting layer                                                   */
/* ------------------------------------------------------------------ */

/* The connection to the gateway, TLS included (TLS stays in the port).
 * None of these may block for long: return FURROW_E_AGAIN instead. */
typedef struct furrow_port {
    void *ctx;
    /* Starts or continues connecting (TCP, then TLS): FURROW_OK once ready
     * to carry bytes, FURROW_E_AGAIN while in progress, else an error. */
    int32_t (*connect)(void *ctx);
    /* Sends up to len bytes: returns how many it took (> 0), FURROW_E_AGAIN,
     * or an error. */
    int32_t (*send)(void *ctx, const uint8_t *buf, size_t len);
    /* Receives up to len bytes: returns how many (> 0), FURROW_E_AGAIN,
     * FURROW_E_CLOSED (orderly close), or an error. */
    int32_t (*recv)(void *ctx, uint8_t *buf, size_t len);
    /* Closes the connection (any state; may be called when not connected). */
    void (*close)(void *ctx);
    /* A random 32-bit number (backoff jitter, PING nonces). */
    uint32_t (*random)(void *ctx);
} furrow_port;

/* ------------------------------------------------------------------ */
/* The client                                                          */
/* ------------------------------------------------------------------ */

enum {
    FURROW_EV_CONNECTED = 1,    /* WELCOME: seq = its last_seq, code = its max_inflight */
    FURROW_EV_DISCONNECTED = 2, /* reason, code (gateway's ERROR/GOODBYE), retry_in_ms */
    FURROW_EV_ACKED = 3,        /* seq: everything up to it is stored */
    FURROW_EV_REJECTED = 4,     /* seq refused for good: code, text = reason; or
                                   dropped unsent (code FRAME_TOO_LARGE: over the
                                   gateway's max_frame; PROTOCOL_ERROR: a REPORT
                                   to a gateway without STATE) */
    FURROW_EV_DESIRED = 5       /* seq = version, text = the desired document;
                                   DESIRED_ACK follows after the callback */
};

typedef struct {
    uint8_t kind;         /* FURROW_EV_* */
    int32_t reason;       /* DISCONNECTED: FURROW_E_* */
    uint16_t code;        /* gateway code (ERROR, GOODBYE, REJECT) */
    uint32_t retry_in_ms; /* DISCONNECTED: delay before the next attempt */
    uint64_t seq;
    furrow_bytes text;
} furrow_event;

/* A COMMAND from the gateway. name and payload point into the receive
 * buffer: valid during the callback only. */
typedef struct {
    uint64_t id;
    furrow_bytes name;
    uint8_t content_type;
    furrow_bytes payload;
    uint8_t repeated; /* this id was answered recently: delivery is at least
                         once, answer the same again without redoing it */
} furrow_command;

/* The answer the command callback fills in. status starts as
 * FURROW_STATUS_UNKNOWN, content_type as octets, len as 0. Write the
 * result payload (up to capacity bytes) to payload, which is in the send
 * buffer, and set len. The library sends COMMAND_RESULT when the callback
 * returns; a command that takes long should answer at once (accepted, say)
 * and report its outcome as a reading or through the reported state. */
typedef struct {
    uint8_t status;
    uint8_t content_type;
    uint8_t *payload;
    size_t capacity;
    size_t len;
} furrow_result;

typedef void (*furrow_event_fn)(void *user, const furrow_event *ev);
typedef void (*furrow_command_fn)(void *user, const furrow_command *cmd, furrow_result *res);

/* What the caller gives the client. It keeps a pointer to this struct and
 * to everything it points to, so they must outlive the client; changing
 * token takes effect at the next connection (after a furrow.token command,
 * say). Zero means the default where one is given. */
typedef struct furrow_config {
    const char *device_id;        /* 1 to 128 of [A-Za-z0-9._:-] */
    const char *token;            /* NUL-terminated; "" with mutual TLS */
    const furrow_port *port;
    const furrow_storage *storage;
    uint8_t *rx_buf;              /* receive buffer: the largest frame accepted */
    size_t rx_size;               /* at least 64 */
    uint8_t *tx_buf;              /* send buffer: HELLO, readings, answers */
    size_t tx_size;               /* at least 64 and the HELLO's size */
    furrow_event_fn on_event;     /* may be NULL */
    furrow_command_fn on_command; /* may be NULL: commands answered "unknown" */
    void *user;                   /* passed to the callbacks */
    uint32_t capabilities;        /* FURROW_CAP_STATE or 0 (FIRMWARE is masked off) */
    uint16_t keepalive_s;         /* requested; 0: the gateway's default */
    uint32_t backoff_initial_ms;  /* 0: 200 */
    uint32_t backoff_max_ms;      /* 0: 30,000 */
    uint32_t timeout_ms;          /* connect + handshake; 0: 10,000 */
} furrow_config;

enum {
    FURROW_STATE_DISCONNECTED = 0, /* waiting for the next attempt */
    FURROW_STATE_CONNECTING = 1,   /* port connect in progress */
    FURROW_STATE_HANDSHAKE = 2,    /* HELLO sent, waiting for WELCOME */
    FURROW_STATE_ONLINE = 3,
    FURROW_STATE_CLOSING = 4,      /* GOODBYE sent, reading until the gateway closes */
    FURROW_STATE_STOPPED = 5
};

#ifndef FURROW_CMD_MEMORY
#define FURROW_CMD_MEMORY 4 /* command ids remembered to flag redeliveries */
#endif

/* All of the client's state. Treat as opaque. */
typedef struct furrow_client {
    /* The most used fields first: Thumb has 16-bit loads and stores for
     * bytes within 32 and words within 128 bytes of the start. */
    const furrow_config *cfg;
    uint8_t state;
    uint8_t caps;           /* granted */
    uint8_t attempt;        /* consecutive failed attempts */
    uint8_t cmd_next;
    uint8_t started;        /* the first poll happened */
    uint8_t welcomed;       /* this connection got WELCOME */
    uint8_t no_caps;        /* a gateway refused HELLO with capabilities */
    uint8_t no_state;       /* a gateway did not grant STATE */
    uint8_t stop;           /* furrow_stop() was called */
    uint8_t bye;            /* GOODBYE is queued */
    uint8_t blocked;        /* a received frame waits for room to answer */
    uint8_t work;           /* more to do at once */
    uint16_t window;        /* WELCOME's max_inflight */
    uint32_t now;           /* the clock of the latest furrow_poll */
    uint32_t deadline;      /* retry, connect/handshake or closing deadline */
    uint32_t last_rx, last_tx;
    uint32_t keepalive_ms;
    uint32_t max_frame;     /* the gateway's */
    uint32_t rx_len, tx_off, tx_len;
    uint64_t sent;          /* highest wire seq sent on this connection */
    uint64_t desired;       /* highest DESIRED version passed to the app */
    uint64_t cmd_ids[FURROW_CMD_MEMORY]; /* recently answered commands */
    furrow_outbox ob;
} furrow_client;

/* Checks the configuration and recovers the outbox from storage. The
 * first furrow_poll() connects. */
int32_t furrow_init(furrow_client *c, const furrow_config *cfg);

/* Runs the client: connects, reconnects after the backoff, sends HELLO,
 * readings and answers, reads and handles what arrived, pings. now_ms is
 * a millisecond clock (any origin, wrapping at 2^32). Returns within how
 * many milliseconds it must be called again at the latest; call it
 * earlier when the connection is readable, or writable while
 * furrow_wants_write() says so. */
uint32_t furrow_poll(furrow_client *c, uint32_t now_ms);

/* Puts a reading in the outbox (it is sent when the window allows and
 * kept until ACKed): its seq goes to *seq (may be NULL). timestamp_ms is
 * Unix milliseconds, 0 if unknown (the gateway stamps it). FURROW_E_FULL:
 * retry after ACKs; FURROW_E_ARG: larger than a page or the send buffer
 * allows. Works offline too. */
int32_t furrow_push(furrow_client *c, uint64_t timestamp_ms, uint8_t content_type,
                    const void *payload, size_t len, uint64_t *seq);

/* Puts a state report (a JSON merge patch of the reported document, a
 * JSON object) in the outbox: a REPORT, in the same seq sequence and
 * ACKed like a reading. Needs FURROW_CAP_STATE in the configuration;
 * FURROW_E_STATE once a gateway has not granted it. */
int32_t furrow_report(furrow_client *c, uint64_t timestamp_ms, const void *patch, size_t len,
                      uint64_t *seq);

/* Ends the session: GOODBYE, then waits (in furrow_poll) until the gateway
 * has ACKed what it read and closed, at most 5 s; then FURROW_STATE_STOPPED.
 * Unacknowledged readings stay in the outbox. */
void furrow_stop(furrow_client *c);

int furrow_state(const furrow_client *c);
/* Whether bytes wait for the connection to become writable. */
int furrow_wants_write(const furrow_client *c);
/* Readings and reports not yet acknowledged. */
uint64_t furrow_pending(const furrow_client *c);
/* A short name of a FURROW_E_* code (furrow_strerror.c; optional). */
const char *furrow_strerror(int32_t err);

#ifdef __cplusplus
}
#endif

#endif /* FURROW_H */
