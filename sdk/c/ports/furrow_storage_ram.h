/*
 * furrow_storage_ram.h: the outbox on RAM, with flash semantics.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * For devices without flash to spare (readings survive disconnects, not
 * reboots) and for tests: it behaves like NOR flash (erase sets 0xFF,
 * write can only clear bits), counts writes that real flash would refuse,
 * and can cut the power in the middle of a write.
 */
#ifndef FURROW_STORAGE_RAM_H
#define FURROW_STORAGE_RAM_H

#include "furrow.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    furrow_storage storage; /* hand &storage to the outbox */
    uint8_t *mem;           /* page_size * page_count bytes */
    uint32_t violations;    /* misaligned writes, writes over programmed bytes */
    int32_t write_budget;   /* bytes still programmable before a "power cut"; < 0: no limit */
    uint32_t writes, erases;
} furrow_ram_storage;

/* Sets rs up over mem (not erased: call it again over the same memory to
 * model a reboot; zeroed memory reads as no outbox, which is then made). */
void furrow_ram_storage_init(furrow_ram_storage *rs, uint8_t *mem, uint32_t page_size,
                             uint16_t page_count, uint8_t write_align);

#ifdef __cplusplus
}
#endif

#endif
