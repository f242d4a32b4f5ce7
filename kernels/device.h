// kernels/device.h: the thin layer between host code and the GPU. Owns device
// discovery, raw device allocation and copies, and the backend handle (stream,
// cuBLAS handle, scratch) that every op takes. In a CPU-only build the same
// functions exist and report "no device", so callers need no #ifdefs.
#ifndef MT_DEVICE_H
#define MT_DEVICE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Number of usable CUDA devices; 0 when there is no driver, no device, or the
// binary was built without CUDA (any runtime error counts as "no GPU").
int mt_device_count(void);
// Name and total memory of the current device (for the start-up banner).
void mt_device_describe(char *buf, size_t len);
// The current device's memory in bytes (0: no GPU).
size_t mt_device_total_bytes(void);
// What the current device has free now (0: no GPU).
size_t mt_device_free_bytes(void);
// Makes GPU `device` the current one (before a query, so that each rank asks
// its own GPU and opens no context on another); nothing without one.
void mt_device_select(int device);

void *mt_device_malloc(size_t bytes);  // NULL when out of memory
void mt_device_free(void *p);
void mt_copy_to_device(void *dst, const void *src, size_t bytes);
void mt_copy_to_host(void *dst, const void *src, size_t bytes);
void mt_device_memset(void *dst, int value, size_t bytes);
// The same, ordered on `stream` (NULL: the legacy stream).
void mt_device_memset_on(void *dst, int value, size_t bytes, void *stream);
void mt_device_synchronize(void);
// Starts (on != 0) or stops the profiler's capture range, after the work
// issued so far (ncu --profile-from-start off); nothing without CUDA.
void mt_device_profile(int on);
// Page-locked host memory (what asynchronous copies need); plain host memory
// in a CPU-only build.
void *mt_host_malloc_pinned(size_t bytes);  // NULL when out of memory
void mt_host_free_pinned(void *p);
// Page-locks host memory malloc gave, so copies between it and the device
// run at the copy engines' speed (its pages are faulted in here, not at the
// first copy); returns 1, or 0 where it could not (the memory stays
// pageable and usable) and in a CPU-only build. Unregister before freeing.
int mt_host_register(void *p, size_t bytes);
void mt_host_unregister(void *p);
// Copies bytes between device and pinned host memory on a side stream, after
// every op issued so far; returns a ticket. mt_copy_async_wait makes the ops
// issued after it wait for that copy (on the device: the host does not block).
// Copies to the device and copies to the host run on two streams, beside each
// other: one in each direction is ordered only by the ops issued before it
// and by the tickets it is given to wait for (`after`, n_after of them; -1:
// none).
int mt_copy_async(void *dst, const void *src, size_t bytes);
int mt_copy_async_after(void *dst, const void *src, size_t bytes, const int *after, int n_after);
// The same, with timing events (mt_event_create; either may be NULL)
// recorded on the copy's stream just before the copy (once what it waits
// for is done) and just after it: a timeline's span.
int mt_copy_async_timed(void *dst, const void *src, size_t bytes, const int *after, int n_after, void *start,
                        void *end);
void mt_copy_async_wait(int ticket);

// Side streams and events for copy pipelines (offload/), as opaque handles;
// stream NULL is the compute stream the ops run on. Events keep timing, so
// a pipeline can be drawn as a timeline (mt_event_elapsed_ms). In a CPU-only
// build copies are immediate and events do nothing.
void *mt_stream_create(void);
void mt_stream_destroy(void *stream);
void *mt_event_create(void);
void mt_event_destroy(void *event);
void mt_event_record(void *event, void *stream);
// Work issued to `stream` after this waits for the event (the host does not).
void mt_stream_wait_event(void *stream, void *event);
// The host waits for the event.
void mt_event_synchronize(void *event);
// Milliseconds from one completed event to another; NaN if either was never
// recorded.
float mt_event_elapsed_ms(void *from, void *to);
// Copies between host (pinned for overlap) and device memory on `stream`.
void mt_memcpy_async(void *dst, const void *src, size_t bytes, void *stream);

struct mt_cudnn;  // kernels/attention_cudnn.h

// What every op runs on. gpu == 0: the fp32 CPU reference path; gpu == 1:
// bf16 activations and weights on the device, fp32 accumulation.
typedef struct {
    int gpu;
    int device;       // CUDA ordinal when gpu
    void *stream;     // cudaStream_t
    void *cublas;     // cublasHandle_t
    void *workspace;  // device scratch for attention etc. (bytes below)
    size_t workspace_bytes;
    float *reduce_buffer;      // small device buffer for scalar reductions
    struct mt_cudnn *cudnn;    // cuDNN's handle and attention graphs; NULL: memtune's own attention kernel
    char attention_note[160];  // without cuDNN: why not (for the start-up line)
    void *graph_stream;        // where CUDA Graphs are recorded and replayed (mt_graph_*); NULL until the first
    int pdl;  // while a graph is recorded: the kernels that wait for their inputs themselves launch with
              // programmatic dependent launch (kernels/ops.cu; only with MT_PDL=1 in the environment)
} mt_backend;

// Creates the backend on device `device` (gpu) or the CPU (device < 0). On a
// GPU it also loads cuDNN for attention unless the environment has
// MT_CUDNN=0 (then, or when cuDNN is missing, memtune's own kernel runs).
int mt_backend_init(mt_backend *be, int device);
// cuDNN's handle on the current device for attention, unless the environment
// has MT_CUDNN=0 or cuDNN cannot serve: then NULL, and `note` says why.
struct mt_cudnn *mt_cudnn_open(char *note, size_t len);
void mt_backend_free(mt_backend *be);
// The stream the ops run on from now (NULL: the legacy stream) and cuBLAS's.
void mt_backend_set_stream(mt_backend *be, void *stream);

// CUDA Graphs: the ops issued between mt_graph_begin and mt_graph_end are
// recorded, not run, into a graph that mt_graph_launch replays with one
// launch, reading and writing the same device addresses each time. The
// recorded ops must make no synchronous call (no cudaMemcpy, no host read of
// a device value). Replays run on a stream that waits for earlier work on the
// legacy stream and that later legacy-stream copies wait for. mt_graph_end
// returns NULL, with the reason in `why`, where recording failed; nothing of
// it is then left running. While recording with MT_PDL=1 in the environment,
// the kernels built for it start with programmatic dependent launch
// (be->pdl). GPU backends only.
void mt_graph_begin(mt_backend *be);
void *mt_graph_end(mt_backend *be, char *why, size_t len);
void mt_graph_launch(mt_backend *be, void *graph);
void mt_graph_free(void *graph);
// Grows the backend scratch to at least `bytes` (device or host memory).
int mt_backend_reserve_workspace(mt_backend *be, size_t bytes);
// Copies between host memory and where the backend computes (device memory
// for the GPU, host memory for the CPU).
void mt_backend_to_host(const mt_backend *be, void *dst, const void *src, size_t bytes);
void mt_backend_from_host(const mt_backend *be, void *dst, const void *src, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
