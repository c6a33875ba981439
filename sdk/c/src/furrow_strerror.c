/*
 * furrow_strerror.c: names of the FURROW_E_* codes, for logs.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * A separate file so that firmware that logs numbers only can leave the
 * strings out of its image.
 */
#include "furrow.h"

const char *furrow_strerror(int32_t err)
{
    static const char *const names[] = {
        "ok",         "would block", "closed",        "i/o error",     "bad argument",
        "outbox full", "storage error", "wrong state", "timed out",     "keepalive timeout",
        "gateway error", "goodbye",  "stopped"};
    static const char *const frame[] = {
        "length below 2", "frame too large", "flags not 0",  "unknown type",
        "body too short", "bytes left over", "str not UTF-8", "field value not allowed",
        "unsupported version", "unexpected message"};
    if (err <= 0 && err >= FURROW_E_STOPPED)
        return names[-err];
    if (err <= FURROW_E_LENGTH && err >= FURROW_E_UNEXPECTED)
        return frame[FURROW_E_LENGTH - err];
    return "unknown error";
}
