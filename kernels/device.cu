// kernels/device.cu: the device layer of a CUDA build (see device.h). Runs on
// the legacy default stream so that copies, memsets and kernels stay ordered.
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <math.h>
#include <string.h>

#include "kernels/attention_cudnn.h"
#include "kernels/cuda_check.h"
#include "kernels/device.h"
#include "kernels/mem.h"

extern "C" {

int mt_device_count(void) {
    int n = 0;  // cudaGetDeviceCount leaves n untouched on error 35 (no driver)
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

void mt_device_select(int device) {
    if (device >= 0 && device < mt_device_count()) CUDA_CHECK(cudaSetDevice(device));
}

size_t mt_device_free_bytes(void) {
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
    return free_bytes;
}

size_t mt_device_total_bytes(void) {
    int dev = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return 0;
    return prop.totalGlobalMem;
}

void mt_device_describe(char *buf, size_t len) {
    int dev = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
        snprintf(buf, len, "no GPU");
        return;
    }
    snprintf(buf, len, "GPU %d: %s, %.1f GiB, sm_%d%d", dev, prop.name, prop.totalGlobalMem / 1073741824.0, prop.major,
             prop.minor);
}

void *mt_device_malloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free OOM error
        return NULL;
    }
    return p;
}

void mt_device_free(void *p) { CUDA_CHECK(cudaFree(p)); }
void mt_copy_to_device(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
void mt_copy_to_host(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
void mt_device_memset(void *dst, int value, size_t bytes) { mt_device_memset_on(dst, value, bytes, NULL); }
void mt_device_memset_on(void *dst, int value, size_t bytes, void *stream) {
    CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, (cudaStream_t)stream));
}
void mt_device_synchronize(void) { CUDA_CHECK(cudaDeviceSynchronize()); }

void mt_device_profile(int on) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(on ? cudaProfilerStart() : cudaProfilerStop());
}

void *mt_host_malloc_pinned(size_t bytes) {
    void *p = NULL;
    if (cudaMallocHost(&p, bytes) != cudaSuccess) {
        cudaGetLastError();  // clear it: the caller reports out of memory
        return NULL;
    }
    memset(p, 0, bytes);
    return p;
}
void mt_host_free_pinned(void *p) { CUDA_CHECK(cudaFreeHost(p)); }
int mt_host_register(void *p, size_t bytes) {
    if (!p || !bytes) return 0;
    if (cudaHostRegister(p, bytes, cudaHostRegisterDefault) == cudaSuccess) return 1;
    cudaGetLastError();  // (a memlock limit, say): the memory stays pageable
    return 0;
}
void mt_host_unregister(void *p) {
    if (p && cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();  // (the memory is freed next all the same)
}

// Two side streams for copies, one a direction (the copy engines run a copy
// to the device beside one to the host), and a ring of events as tickets. A
// ticket is waited on long before the ring comes round (the model holds at
// most a few); one waited on after the ring came round waits for a later
// copy, which is slower, never wrong.
static cudaStream_t copy_streams[2];  // 0: to the device (or within it), 1: to the host
static const int kEvents = 256;
static cudaEvent_t events[kEvents], issued;
static int next_event;

int mt_copy_async_after(void *dst, const void *src, size_t bytes, const int *after, int n_after) {
    return mt_copy_async_timed(dst, src, bytes, after, n_after, NULL, NULL);
}

int mt_copy_async_timed(void *dst, const void *src, size_t bytes, const int *after, int n_after, void *start,
                        void *end) {
    if (!copy_streams[0]) {
        for (int k = 0; k < 2; k++) CUDA_CHECK(cudaStreamCreateWithFlags(&copy_streams[k], cudaStreamNonBlocking));
        CUDA_CHECK(cudaEventCreateWithFlags(&issued, cudaEventDisableTiming));
        for (int i = 0; i < kEvents; i++) CUDA_CHECK(cudaEventCreateWithFlags(&events[i], cudaEventDisableTiming));
    }
    cudaPointerAttributes at;
    CUDA_CHECK(cudaPointerGetAttributes(&at, dst));
    cudaStream_t st = copy_streams[at.type == cudaMemoryTypeDevice || at.type == cudaMemoryTypeManaged ? 0 : 1];
    CUDA_CHECK(cudaEventRecord(issued, 0));  // the legacy stream the ops run on
    CUDA_CHECK(cudaStreamWaitEvent(st, issued, 0));
    for (int i = 0; i < n_after; i++)
        if (after[i] >= 0) CUDA_CHECK(cudaStreamWaitEvent(st, events[after[i]], 0));
    if (start) CUDA_CHECK(cudaEventRecord((cudaEvent_t)start, st));
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, st));
    if (end) CUDA_CHECK(cudaEventRecord((cudaEvent_t)end, st));
    int ticket = next_event;
    next_event = (next_event + 1) % kEvents;
    CUDA_CHECK(cudaEventRecord(events[ticket], st));
    return ticket;
}

int mt_copy_async(void *dst, const void *src, size_t bytes) { return mt_copy_async_after(dst, src, bytes, NULL, 0); }

void mt_copy_async_wait(int ticket) { CUDA_CHECK(cudaStreamWaitEvent(0, events[ticket], 0)); }

void *mt_stream_create(void) {
    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return stream;
}
void mt_stream_destroy(void *stream) {
    if (stream) CUDA_CHECK(cudaStreamDestroy((cudaStream_t)stream));
}
void *mt_event_create(void) {
    cudaEvent_t event;
    CUDA_CHECK(cudaEventCreate(&event));
    return event;
}
void mt_event_destroy(void *event) {
    if (event) CUDA_CHECK(cudaEventDestroy((cudaEvent_t)event));
}
void mt_event_record(void *event, void *stream) {
    CUDA_CHECK(cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream));
}
void mt_stream_wait_event(void *stream, void *event) {
    CUDA_CHECK(cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)event, 0));
}
void mt_event_synchronize(void *event) { CUDA_CHECK(cudaEventSynchronize((cudaEvent_t)event)); }
float mt_event_elapsed_ms(void *from, void *to) {
    float ms = 0.0f;
    if (cudaEventElapsedTime(&ms, (cudaEvent_t)from, (cudaEvent_t)to) != cudaSuccess) {
        cudaGetLastError();  // an event never recorded: no time, not a failure
        return NAN;
    }
    return ms;
}
void mt_memcpy_async(void *dst, const void *src, size_t bytes, void *stream) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, (cudaStream_t)stream));
}

int mt_backend_init(mt_backend *be, int device) {
    memset(be, 0, sizeof *be);
    if (device < 0) return MT_OK;
    int count = mt_device_count();
    if (device >= count)
        return mt_errorf(MT_ERR_DEVICE,
                         "GPU %d asked for, but %d GPU(s) are visible; set device: cpu or a lower "
                         "ordinal",
                         device, count);
    CUDA_CHECK(cudaSetDevice(device));
    be->gpu = 1;
    be->device = device;
    be->stream = NULL;
    cublasHandle_t handle;
    CUBLAS_CHECK(cublasCreate(&handle));
    CUBLAS_CHECK(cublasSetStream(handle, 0));
    be->cublas = handle;
    void *reduce = NULL;
    int err = mt_alloc(&reduce, 4096, MT_MEM_WORKSPACE, MT_DEVICE);
    if (err) return err;
    be->reduce_buffer = (float *)reduce;
    be->cudnn = mt_cudnn_open(be->attention_note, sizeof be->attention_note);
    return MT_OK;
}

mt_cudnn *mt_cudnn_open(char *note, size_t len) {
    const char *use_cudnn = getenv("MT_CUDNN");
    if (use_cudnn && strcmp(use_cudnn, "0") == 0) {
        snprintf(note, len, "MT_CUDNN=0 in the environment");
        return NULL;
    }
    return mt_cudnn_init(note, len);
}

void mt_backend_set_stream(mt_backend *be, void *stream) {
    be->stream = stream;
    if (be->cublas) CUBLAS_CHECK(cublasSetStream((cublasHandle_t)be->cublas, (cudaStream_t)stream));
}

// The graph stream is a blocking one: it waits for the legacy stream's earlier
// work and the legacy stream's later work waits for it, so the synchronous
// copies around a replay need no events.
void mt_graph_begin(mt_backend *be) {
    MT_CHECK(be->gpu && be->stream == NULL, "a graph records from the legacy stream of a GPU backend");
    if (!be->graph_stream) {
        cudaStream_t s;
        CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamDefault));
        be->graph_stream = s;
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaStreamBeginCapture((cudaStream_t)be->graph_stream, cudaStreamCaptureModeThreadLocal));
    mt_backend_set_stream(be, be->graph_stream);
    const char *pdl = getenv("MT_PDL");  // opt-in until it has run on a GPU (docs/design.md)
    be->pdl = pdl && strcmp(pdl, "1") == 0;
}

void *mt_graph_end(mt_backend *be, char *why, size_t len) {
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    mt_backend_set_stream(be, NULL);
    be->pdl = 0;
    cudaError_t err = cudaStreamEndCapture((cudaStream_t)be->graph_stream, &graph);
    if (err == cudaSuccess) err = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (err != cudaSuccess) {
        snprintf(why, len, "%s", cudaGetErrorString(err));
        cudaGetLastError();
        return NULL;
    }
    return exec;
}

void mt_graph_launch(mt_backend *be, void *graph) {
    CUDA_CHECK(cudaGraphLaunch((cudaGraphExec_t)graph, (cudaStream_t)be->graph_stream));
}

void mt_graph_free(void *graph) {
    if (graph) CUDA_CHECK(cudaGraphExecDestroy((cudaGraphExec_t)graph));
}

void mt_backend_free(mt_backend *be) {
    mt_free(&be->workspace);
    be->workspace_bytes = 0;
    if (be->graph_stream) CUDA_CHECK(cudaStreamDestroy((cudaStream_t)be->graph_stream));
    be->graph_stream = NULL;
    if (be->gpu) {
        void *reduce = be->reduce_buffer;
        mt_free(&reduce);
        be->reduce_buffer = NULL;
        if (be->cublas) CUBLAS_CHECK(cublasDestroy((cublasHandle_t)be->cublas));
        be->cublas = NULL;
        mt_cudnn_free(be->cudnn);
        be->cudnn = NULL;
    }
}

}  // extern "C"
