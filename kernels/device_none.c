// kernels/device_none.c: the device layer of a CPU-only build. Every query
// says "no device"; the copy and allocation entry points are never reached
// because nothing asks for device memory without a device.
#include <stdlib.h>
#include <string.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "kernels/mem.h"

int mt_device_count(void) { return 0; }
void mt_device_describe(char *buf, size_t len) { snprintf(buf, len, "CPU (built without CUDA)"); }
void *mt_device_malloc(size_t bytes) {
    (void)bytes;
    return NULL;
}
void mt_device_free(void *p) { (void)p; }
void mt_copy_to_device(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void mt_copy_to_host(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void mt_device_memset(void *dst, int value, size_t bytes) { memset(dst, value, bytes); }
void mt_device_synchronize(void) {}
void *mt_host_malloc_pinned(size_t bytes) { return calloc(1, bytes); }
void mt_host_free_pinned(void *p) { free(p); }
int mt_copy_async(void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
    return 0;
}
void mt_copy_async_wait(int ticket) { (void)ticket; }

int mt_backend_init(mt_backend *be, int device) {
    memset(be, 0, sizeof *be);
    if (device >= 0) return mt_errorf(MT_ERR_DEVICE, "this memtune was built without CUDA; set device: cpu");
    return MT_OK;
}

void mt_backend_free(mt_backend *be) {
    mt_free(&be->workspace);
    be->workspace_bytes = 0;
}
