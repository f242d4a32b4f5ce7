// kernels/backend.c: what the backend handle does the same way on both
// builds: its scratch lives on the device for the GPU path, on the host
// otherwise, and is charged to the workspace category either way.
#include <string.h>

#include "kernels/device.h"
#include "kernels/mem.h"

int mt_backend_reserve_workspace(mt_backend *be, size_t bytes) {
    if (bytes <= be->workspace_bytes) return MT_OK;
    mt_free(&be->workspace);
    be->workspace_bytes = 0;
    int err = mt_alloc(&be->workspace, bytes, MT_MEM_WORKSPACE, be->gpu ? MT_DEVICE : MT_HOST);
    if (!err) be->workspace_bytes = bytes;
    return err;
}

void mt_backend_to_host(const mt_backend *be, void *dst, const void *src, size_t bytes) {
    if (be->gpu)
        mt_copy_to_host(dst, src, bytes);
    else
        mt_copy_parallel(dst, src, bytes);
}

void mt_backend_from_host(const mt_backend *be, void *dst, const void *src, size_t bytes) {
    if (be->gpu)
        mt_copy_to_device(dst, src, bytes);
    else
        mt_copy_parallel(dst, src, bytes);
}
