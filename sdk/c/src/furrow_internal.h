/*
 * furrow_internal.h: helpers shared by the library's source files, not
 * part of the API.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * The variable-width big-endian helpers are functions, so each exists
 * once in the image: code size matters more than the call. The
 * fixed-width reads are static inline: a compiler turns each into a load
 * and a byte swap (two instructions on Cortex-M), smaller than a call.
 */
#ifndef FURROW_INTERNAL_H
#define FURROW_INTERNAL_H

#include "furrow.h"

/* Writes the low n bytes (1, 2, 4 or 8) of v big-endian at p. n before
 * v: every argument goes in a register on 32-bit ABIs. */
void furrow_put_be(uint8_t *p, unsigned n, uint64_t v);
/* Reads n bytes (1..8) big-endian at p. */
uint64_t furrow_get_be(const uint8_t *p, unsigned n);

/* Four and eight bytes big-endian at p. */
static inline uint32_t furrow_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t furrow_be64(const uint8_t *p)
{
    return (uint64_t)furrow_be32(p) << 32 | furrow_be32(p + 4);
}

#endif
