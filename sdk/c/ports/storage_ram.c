/*
 * storage_ram.c: furrow_storage over a RAM array, behaving like NOR flash.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why emulate flash instead of plain memcpy: the outbox promises to write
 * each byte at most once between erases, in write_align pieces; this port
 * checks that promise (violations) and applies writes the way flash does
 * (bits only go from 1 to 0), so a bug shows up here rather than on a
 * device. write_budget cuts the "power" after that many bytes, leaving a
 * torn record exactly as a power cut mid-write would.
 */
#include <string.h>

#include "furrow_storage_ram.h"

static int32_t ram_read(void *ctx, uint32_t addr, void *buf, uint32_t len)
{
    const furrow_ram_storage *rs = (const furrow_ram_storage *)ctx;
    if ((uint64_t)addr + len > (uint64_t)rs->storage.page_size * rs->storage.page_count)
        return FURROW_E_STORAGE;
    memcpy(buf, rs->mem + addr, len);
    return FURROW_OK;
}

static int32_t ram_write(void *ctx, uint32_t addr, const void *buf, uint32_t len)
{
    furrow_ram_storage *rs = (furrow_ram_storage *)ctx;
    const uint8_t *src = (const uint8_t *)buf;
    uint32_t i, n = len;

    if ((uint64_t)addr + len > (uint64_t)rs->storage.page_size * rs->storage.page_count)
        return FURROW_E_STORAGE;
    if (addr % rs->storage.write_align != 0 || len % rs->storage.write_align != 0)
        rs->violations++;
    rs->writes++;
    if (rs->write_budget >= 0 && (uint32_t)rs->write_budget < n)
        n = (uint32_t)rs->write_budget;
    for (i = 0; i < n; i++) {
        if (rs->mem[addr + i] != 0xFF)
            rs->violations++;
        rs->mem[addr + i] &= src[i];
    }
    if (rs->write_budget >= 0) {
        rs->write_budget -= (int32_t)n;
        if (n < len)
            return FURROW_E_STORAGE; /* the power went */
    }
    return FURROW_OK;
}

static int32_t ram_erase(void *ctx, uint32_t page)
{
    furrow_ram_storage *rs = (furrow_ram_storage *)ctx;
    if (page >= rs->storage.page_count)
        return FURROW_E_STORAGE;
    if (rs->write_budget == 0)
        return FURROW_E_STORAGE; /* no power, no erase */
    rs->erases++;
    memset(rs->mem + (size_t)page * rs->storage.page_size, 0xFF, rs->storage.page_size);
    return FURROW_OK;
}

void furrow_ram_storage_init(furrow_ram_storage *rs, uint8_t *mem, uint32_t page_size,
                             uint16_t page_count, uint8_t write_align)
{
    memset(rs, 0, sizeof *rs);
    rs->mem = mem;
    rs->write_budget = -1;
    rs->storage.ctx = rs;
    rs->storage.page_size = page_size;
    rs->storage.page_count = page_count;
    rs->storage.write_align = write_align;
    rs->storage.read = ram_read;
    rs->storage.write = ram_write;
    rs->storage.erase = ram_erase;
}
