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
size_t mt_device_total_bytes(void) { return 0; }
size_t mt_device_free_bytes(void) { return 0; }
void mt_device_select(int device) { (void)device; }
void *mt_device_malloc(size_t bytes) {
    (void)bytes;
    return NULL;
}
void mt_device_free(void *p) { (void)p; }
void mt_copy_to_device(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void mt_copy_to_host(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void mt_device_memset(void *dst, int value, size_t bytes) { memset(dst, value, bytes); }
void mt_device_memset_on(void *dst, int value, size_t bytes, void *stream) {
    (void)stream;
    memset(dst, value, bytes);
}
void mt_device_synchronize(void) {}
void mt_device_profile(int on) { (void)on; }
void *mt_host_malloc_pinned(size_t bytes) { return calloc(1, bytes); }
void mt_host_free_pinned(void *p) { free(p); }
int mt_host_register(void *p, size_t bytes) {
    (void)p, (void)bytes;
    return 0;
}
void mt_host_unregister(void *p) { (void)p; }
int mt_copy_async(void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
    return 0;
}
int mt_copy_async_after(void *dst, const void *src, size_t bytes, const int *after, int n_after) {
    (void)after, (void)n_after;
    return mt_copy_async(dst, src, bytes);
}
int mt_copy_async_timed(void *dst, const void *src, size_t bytes, const int *after, int n_after, void *start,
                        void *end) {
    (void)start, (void)end;
    return mt_copy_async_after(dst, src, bytes, after, n_after);
}
void mt_copy_async_wait(int ticket) { (void)ticket; }

void *mt_stream_create(void) { return NULL; }
void mt_stream_destroy(void *stream) { (void)stream; }
void *mt_event_create(void) { return NULL; }
void mt_event_destroy(void *event) { (void)event; }
void mt_event_record(void *event, void *stream) { (void)event, (void)stream; }
void mt_stream_wait_event(void *stream, void *event) { (void)stream, (void)event; }
void mt_event_synchronize(void *event) { (void)event; }
float mt_event_elapsed_ms(void *from, void *to) {
    (void)from, (void)to;
    return 0.0f;
}
void mt_memcpy_async(void *dst, const void *src, size_t bytes, void *stream) {
    (void)stream;
    memcpy(dst, src, bytes);
}

int mt_backend_init(mt_backend *be, int device) {
    memset(be, 0, sizeof *be);
    if (device >= 0) return mt_errorf(MT_ERR_DEVICE, "this memtune was built without CUDA; set device: cpu");
    return MT_OK;
}

void mt_backend_free(mt_backend *be) {
    mt_free(&be->workspace);
    be->workspace_bytes = 0;
}

void mt_backend_set_stream(mt_backend *be, void *stream) { be->stream = stream; }
void mt_graph_begin(mt_backend *be) { MT_CHECK(0, "CUDA Graphs in a build without CUDA (backend %d)", be->gpu); }
void *mt_graph_end(mt_backend *be, char *why, size_t len) {
    (void)be;
    snprintf(why, len, "this memtune was built without CUDA");
    return NULL;
}
void mt_graph_launch(mt_backend *be, void *graph) {
    (void)be, (void)graph;
    MT_CHECK(0, "CUDA Graphs in a build without CUDA");
}
void mt_graph_free(void *graph) { (void)graph; }
