/*
 * fuzz_frame.c: libFuzzer target for the frame decoder.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * The input is a byte stream as it would arrive from the network. Frames
 * are decoded one after the other until an error or an incomplete frame.
 * Beyond "no crash, no sanitizer report", two properties are checked:
 *  - a frame that decodes re-encodes to exactly its bytes (the decoder
 *    accepts nothing the encoder would write differently);
 *  - the header check gives the same answer however the header was split
 *    (every prefix answers "more" or the final answer).
 * The limit on the length field comes from the first input byte, so small
 * limits (and FURROW_E_TOO_LARGE) are explored too.
 */
#include <stdlib.h>
#include <string.h>

#include "furrow.h"

static uint8_t out[65536 + 16];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint32_t max_len;
    size_t off = 1;

    if (size < 1)
        return 0;
    max_len = data[0] < 0x80 ? 65536u : 16u + (uint32_t)(data[0] & 0x7F) * 4u;

    while (off < size) {
        furrow_msg m;
        int32_t n = furrow_decode(data + off, size - off, max_len, &m);
        int32_t whole = furrow_frame_check(data + off, size - off, max_len);
        size_t k;

        /* The header's verdict does not depend on how it was split. */
        for (k = 0; k <= 6 && k <= size - off; k++) {
            int32_t part = furrow_frame_check(data + off, k, max_len);
            if (part != FURROW_E_AGAIN && part != whole &&
                !(k < 6 && part > 0 && (whole == FURROW_E_FLAGS || whole == FURROW_E_TYPE)))
                abort();
        }
        if (n < 0)
            break;
        if ((size_t)n > size - off || n != whole)
            abort();
        {
            int32_t e = furrow_encode(&m, out, sizeof out);
            if (e != n || memcmp(out, data + off, (size_t)n) != 0)
                abort();
        }
        off += (size_t)n;
    }
    return 0;
}
