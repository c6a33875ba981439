/*
 * storage_file.c: furrow_storage over a file, for POSIX devices and
 * gateways-in-a-box (Linux on a router, a Raspberry Pi).
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * The file holds page_count pages of page_size bytes; a new file is made
 * erased (0xFF). Writes are plain pwrite()s: the outbox only ever writes
 * erased bytes, so overwriting gives what flash programming would. Without
 * `sync`, a write survives a crash of the process (it is in the kernel);
 * with it, every write and erase is fdatasync()ed and survives a power cut.
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "furrow_posix.h"

static int32_t file_read(void *ctx, uint32_t addr, void *buf, uint32_t len)
{
    const furrow_file_storage *fs = (const furrow_file_storage *)ctx;
    uint8_t *p = (uint8_t *)buf;
    while (len > 0) {
        ssize_t n = pread(fs->fd, p, len, (off_t)addr);
        if (n <= 0)
            return FURROW_E_STORAGE;
        p += n;
        addr += (uint32_t)n;
        len -= (uint32_t)n;
    }
    return FURROW_OK;
}

static int32_t write_all(const furrow_file_storage *fs, uint32_t addr, const uint8_t *p,
                         uint32_t len)
{
    while (len > 0) {
        ssize_t n = pwrite(fs->fd, p, len, (off_t)addr);
        if (n <= 0)
            return FURROW_E_STORAGE;
        p += n;
        addr += (uint32_t)n;
        len -= (uint32_t)n;
    }
    return FURROW_OK;
}

static int32_t file_write(void *ctx, uint32_t addr, const void *buf, uint32_t len)
{
    const furrow_file_storage *fs = (const furrow_file_storage *)ctx;
    if (write_all(fs, addr, (const uint8_t *)buf, len) != FURROW_OK)
        return FURROW_E_STORAGE;
    if (fs->sync && fdatasync(fs->fd) != 0)
        return FURROW_E_STORAGE;
    return FURROW_OK;
}

static int32_t erase_range(const furrow_file_storage *fs, uint32_t addr, uint32_t len)
{
    uint8_t ff[512];
    memset(ff, 0xFF, sizeof ff);
    while (len > 0) {
        uint32_t k = len < sizeof ff ? len : (uint32_t)sizeof ff;
        if (write_all(fs, addr, ff, k) != FURROW_OK)
            return FURROW_E_STORAGE;
        addr += k;
        len -= k;
    }
    return FURROW_OK;
}

static int32_t file_erase(void *ctx, uint32_t page)
{
    const furrow_file_storage *fs = (const furrow_file_storage *)ctx;
    if (page >= fs->storage.page_count ||
        erase_range(fs, page * fs->storage.page_size, fs->storage.page_size) != FURROW_OK)
        return FURROW_E_STORAGE;
    if (fs->sync && fdatasync(fs->fd) != 0)
        return FURROW_E_STORAGE;
    return FURROW_OK;
}

int32_t furrow_file_storage_open(furrow_file_storage *fs, const char *path, uint32_t page_size,
                                 uint16_t page_count, int sync)
{
    struct stat st;
    uint64_t total = (uint64_t)page_size * page_count;

    memset(fs, 0, sizeof *fs);
    if (total == 0 || total > 0x7FFFFFFFu)
        return FURROW_E_ARG;
    fs->fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fs->fd < 0)
        return FURROW_E_STORAGE;
    /* A new (or short) file: the missing part is erased flash. */
    if (fstat(fs->fd, &st) != 0 ||
        ((uint64_t)st.st_size < total &&
         erase_range(fs, (uint32_t)st.st_size, (uint32_t)(total - (uint64_t)st.st_size)) !=
             FURROW_OK) ||
        (sync && fsync(fs->fd) != 0)) {
        (void)close(fs->fd);
        fs->fd = -1;
        return FURROW_E_STORAGE;
    }
    fs->sync = sync;
    fs->storage.ctx = fs;
    fs->storage.page_size = page_size;
    fs->storage.page_count = page_count;
    fs->storage.write_align = 1;
    fs->storage.read = file_read;
    fs->storage.write = file_write;
    fs->storage.erase = file_erase;
    return FURROW_OK;
}

void furrow_file_storage_close(furrow_file_storage *fs)
{
    if (fs->fd >= 0)
        (void)close(fs->fd);
    fs->fd = -1;
}
