// trainer/dist.c: data parallelism over MPI and NCCL (dist.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/dist.h"

#include <errno.h>
#include <mpi.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef MT_HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
#endif

#define MPI_CHUNK ((size_t)1 << 28)     // elements per MPI call (its counts are int)
#define STAGE_FLOATS ((size_t)1 << 24)  // host arrays cross the GPU in 64 MiB pieces

typedef enum { LAUNCH_NONE, LAUNCH_MPI, LAUNCH_ENV } launcher;

struct mt_dist {
    launcher how;
    int rank, world, local_rank, local_world;
    mt_backend *be;
    int nccl;  // collectives through NCCL (GPU backend, world > 1)
#ifdef MT_HAVE_CUDA
    ncclComm_t comm;
    cudaStream_t stream;
    cudaEvent_t compute_done, comm_done;
    cudaEvent_t ring_done[2];  // mt_dist_wait_previous's marks, alternating
    int ring, ring_used[2];
    void *scratch;  // STAGE_FLOATS floats of device memory (host values, checkpoints)
#endif
    double timeout;
    _Atomic long long beat_ms;
    pthread_t watchdog;
    int has_watchdog;
    _Atomic int stop;
};

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

// MPI starts once a process (a test may train several times) and ends at exit.
static int mpi_started;
static void mpi_finish(void) { MPI_Finalize(); }

int mt_dist_launched_world(void) {
    static const char *const sizes[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MT_WORLD_SIZE"};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (env_int(sizes[i], 0) > 0) return env_int(sizes[i], 0);
    return 1;
}

mt_err mt_dist_init(mt_dist **out) {
    mt_dist *d = calloc(1, sizeof *d);
    MT_CHECK(d != NULL, "dist");
    d->world = 1, d->local_world = 1;
    *out = d;
    if (getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK")) {
        int provided = 0;
        if (!mpi_started && MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return mt_errorf(MT_ERR_DEVICE, "MPI_Init failed: run under mpirun, or without it for one process");
        if (!mpi_started) atexit(mpi_finish);
        mpi_started = 1;
        d->how = LAUNCH_MPI;
        MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
        MPI_Comm_size(MPI_COMM_WORLD, &d->world);
        MPI_Comm node;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d->rank, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &d->local_rank);
        MPI_Comm_size(node, &d->local_world);
        MPI_Comm_free(&node);
    } else if (getenv("MT_WORLD_SIZE")) {
        d->how = LAUNCH_ENV;
        d->world = env_int("MT_WORLD_SIZE", 1);
        d->rank = env_int("MT_RANK", 0);
        d->local_rank = env_int("MT_LOCAL_RANK", d->rank);
        d->local_world = env_int("MT_LOCAL_WORLD_SIZE", d->world);
        if (d->world < 1 || d->rank < 0 || d->rank >= d->world || !getenv("MT_RENDEZVOUS"))
            return mt_errorf(MT_ERR_CONFIG,
                             "MT_WORLD_SIZE %d, MT_RANK %d: set 0 <= MT_RANK < MT_WORLD_SIZE and MT_RENDEZVOUS (a "
                             "folder every rank sees), or start the ranks with mpirun",
                             d->world, d->rank);
    }
    if (d->rank != 0) mt_log_set_level(MT_LOG_WARN);  // rank 0 speaks for the run
    return MT_OK;
}

int mt_dist_rank(const mt_dist *d) { return d->rank; }
int mt_dist_world(const mt_dist *d) { return d->world; }
int mt_dist_local_rank(const mt_dist *d) { return d->local_rank; }
int mt_dist_local_world(const mt_dist *d) { return d->local_world; }
const char *mt_dist_launcher(const mt_dist *d) {
    return d->how == LAUNCH_MPI ? "mpi" : d->how == LAUNCH_ENV ? "env" : "none";
}

void mt_dist_shard(const mt_dist *d, int r, size_t n, size_t *lo, size_t *hi) {
    size_t runs = (n + 15) / 16;
    *lo = runs * (size_t)r / (size_t)d->world * 16;
    *hi = r + 1 == d->world ? n : runs * (size_t)(r + 1) / (size_t)d->world * 16;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

// This rank cannot go on because another is gone: one message, and exit 3
// (mpirun, or the other ranks' own failures and watchdogs, end the rest).
static _Noreturn void peer_lost(const mt_dist *d, const char *what, const char *why) {
    fprintf(stderr,
            "memtune: error: rank %d of %d: %s%s; another rank has died or hangs. Exiting instead of waiting for it "
            "(dist.timeout sets the wait); resume from the last checkpoint (train.resume: auto)\n",
            d->rank, d->world, what, why);
    fflush(stderr);
    _exit(3);
}

static void *watchdog_main(void *arg) {
    mt_dist *d = arg;
    while (!atomic_load(&d->stop)) {
        sleep(1);
        double idle = (now_ms() - atomic_load(&d->beat_ms)) / 1000.0;
#ifdef MT_HAVE_CUDA
        ncclResult_t async = ncclSuccess;
        if (d->nccl && ncclCommGetAsyncError(d->comm, &async) == ncclSuccess && async != ncclSuccess &&
            async != ncclInProgress)
            peer_lost(d, "the communicator failed: ", ncclGetErrorString(async));
#endif
        if (idle > d->timeout) peer_lost(d, "no step finished in the last ", "dist.timeout seconds");
    }
    return NULL;
}

#ifdef MT_HAVE_CUDA
// A collective that fails because a peer is gone (NCCL's remote error)
// ends the rank as the watchdog would; anything else is a bug.
#define NCCL_CHECK(call)                                                                                    \
    do {                                                                                                    \
        ncclResult_t r_ = (call);                                                                           \
        if (r_ == ncclRemoteError) peer_lost(d, "NCCL: ", ncclGetErrorString(r_));                          \
        if (r_ != ncclSuccess) mt_fatal(__FILE__, __LINE__, "NCCL: %s: %s", #call, ncclGetErrorString(r_)); \
    } while (0)

// Without MPI, rank 0 leaves the NCCL id in MT_RENDEZVOUS for the others.
static mt_err exchange_id(mt_dist *d, ncclUniqueId *id) {
    if (d->rank == 0) NCCL_CHECK(ncclGetUniqueId(id));
    if (d->how == LAUNCH_MPI) {
        MPI_Bcast(id, sizeof *id, MPI_BYTE, 0, MPI_COMM_WORLD);
        return MT_OK;
    }
    char path[1024], tmp[1100];
    snprintf(path, sizeof path, "%s/nccl-id", getenv("MT_RENDEZVOUS"));
    if (d->rank == 0) {
        snprintf(tmp, sizeof tmp, "%s.%d", path, (int)getpid());
        FILE *f = fopen(tmp, "wb");
        int ok = f && fwrite(id, sizeof *id, 1, f) == 1;
        if (f) ok = fclose(f) == 0 && ok;
        if (!ok || rename(tmp, path) != 0)
            return mt_errorf(MT_ERR_IO, "%s: cannot write the NCCL id (%s); MT_RENDEZVOUS must be a writable folder",
                             path, strerror(errno));
        return MT_OK;
    }
    for (long long t0 = now_ms(); now_ms() - t0 < (long long)(d->timeout * 1000);) {
        FILE *f = fopen(path, "rb");
        int ok = f && fread(id, sizeof *id, 1, f) == 1;
        if (f) fclose(f);
        if (ok) return MT_OK;
        usleep(100000);
    }
    return mt_errorf(MT_ERR_IO, "rank %d: no NCCL id from rank 0 in %s after %.0f s; is rank 0 running?", d->rank, path,
                     d->timeout);
}
#endif

mt_err mt_dist_connect(mt_dist *d, mt_backend *be, double timeout_s) {
    d->be = be;
    d->timeout = timeout_s;
    atomic_store(&d->beat_ms, now_ms());
    if (d->world == 1) return MT_OK;
    if (be->gpu) {
#ifdef MT_HAVE_CUDA
        ncclUniqueId id;
        mt_err err = exchange_id(d, &id);
        if (err) return err;
        ncclResult_t r = ncclCommInitRank(&d->comm, d->world, id, d->rank);
        if (r != ncclSuccess)
            return mt_errorf(MT_ERR_DEVICE, "rank %d: NCCL could not connect the %d ranks: %s", d->rank, d->world,
                             ncclGetErrorString(r));
        d->nccl = 1;
        cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking);
        cudaEventCreateWithFlags(&d->compute_done, cudaEventDisableTiming);
        cudaEventCreateWithFlags(&d->comm_done, cudaEventDisableTiming);
        for (int k = 0; k < 2; k++) cudaEventCreateWithFlags(&d->ring_done[k], cudaEventDisableTiming);
        if (cudaMalloc(&d->scratch, STAGE_FLOATS * sizeof(float)) != cudaSuccess)
            return mt_errorf(MT_ERR_NOMEM, "out of GPU memory for the communication buffer (64 MiB)");
#endif
    } else if (d->how != LAUNCH_MPI) {
        return mt_errorf(MT_ERR_CONFIG, "%d ranks on the CPU backend need mpirun (MPI's collectives)", d->world);
    }
    if (pthread_create(&d->watchdog, NULL, watchdog_main, d) == 0) d->has_watchdog = 1;
    return MT_OK;
}

void mt_dist_free(mt_dist *d) {
    if (!d) return;
    if (d->has_watchdog) {
        atomic_store(&d->stop, 1);
        pthread_join(d->watchdog, NULL);
    }
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        cudaStreamSynchronize(d->stream);
        ncclCommDestroy(d->comm);
        cudaStreamDestroy(d->stream);
        cudaEventDestroy(d->compute_done);
        cudaEventDestroy(d->comm_done);
        for (int k = 0; k < 2; k++) cudaEventDestroy(d->ring_done[k]);
        cudaFree(d->scratch);
    }
#endif
    free(d);
}

void mt_dist_heartbeat(mt_dist *d) { atomic_store(&d->beat_ms, now_ms()); }

void mt_dist_after_compute(mt_dist *d) {
#ifdef MT_HAVE_CUDA
    if (!d->nccl) return;
    cudaEventRecord(d->compute_done, (cudaStream_t)d->be->stream);
    cudaStreamWaitEvent(d->stream, d->compute_done, 0);
#else
    (void)d;
#endif
}

void mt_dist_wait(mt_dist *d) {
#ifdef MT_HAVE_CUDA
    if (!d->nccl) return;
    cudaEventRecord(d->comm_done, d->stream);
    cudaStreamWaitEvent((cudaStream_t)d->be->stream, d->comm_done, 0);
#else
    (void)d;
#endif
}

// NCCL calls between start (1) and end (0) go as one launch; no-op without NCCL.
static void nccl_group(const mt_dist *d, int start) {
#ifdef MT_HAVE_CUDA
    if (d->nccl) NCCL_CHECK(start ? ncclGroupStart() : ncclGroupEnd());
#else
    (void)d, (void)start;
#endif
}

// MPI over n values in pieces its int counts take.
#define MPI_PIECES(n, at, len) \
    for (size_t at = 0, len = 0; at < (n) && ((len = (n)-at < MPI_CHUNK ? (n)-at : MPI_CHUNK), 1); at += len)

void mt_dist_allreduce(mt_dist *d, float *buf, size_t n) {
    if (d->world == 1 || n == 0) return;
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, d->comm, d->stream));
        return;
    }
#endif
    MPI_PIECES(n, at, len) MPI_Allreduce(MPI_IN_PLACE, buf + at, (int)len, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}

// Rank r's shard of a block of `total`, clipped to [lo, hi); 0 when empty.
static int owned(const mt_dist *d, int r, size_t total, size_t lo, size_t hi, size_t *a, size_t *b) {
    mt_dist_shard(d, r, total, a, b);
    if (*a < lo) *a = lo;
    if (*b > hi) *b = hi;
    return *a < *b;
}

// Sums n floats over the ranks into root: send is every rank's part, recv
// root's destination (NULL elsewhere; equal to send: in place).
static void reduce_part(mt_dist *d, const float *send, float *recv, size_t n, int root) {
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        NCCL_CHECK(ncclReduce(send, recv ? recv : (float *)send, n, ncclFloat, ncclSum, root, d->comm, d->stream));
        return;
    }
#else
    (void)d;
#endif
    MPI_PIECES(n, at, len)
    MPI_Reduce(recv && recv == send ? MPI_IN_PLACE : send + at, recv ? recv + at : NULL, (int)len, MPI_FLOAT, MPI_SUM,
               root, MPI_COMM_WORLD);
}

void mt_dist_reduce_to_owners(mt_dist *d, const float *src, size_t lo, size_t hi, float *shard, size_t total) {
    size_t mine_lo, mine_hi;
    mt_dist_shard(d, d->rank, total, &mine_lo, &mine_hi);
    if (d->world == 1) {  // the one owner: a copy, unless in place
        if (!shard) return;
        const float *from = src + (mine_lo > lo ? mine_lo - lo : 0);
        size_t a = lo > mine_lo ? lo : mine_lo, b = hi < mine_hi ? hi : mine_hi;
        float *to = shard + (a - mine_lo);
        if (a >= b || from == to) return;
#ifdef MT_HAVE_CUDA
        if (d->be->gpu) {
            cudaMemcpyAsync(to, from, (b - a) * sizeof(float), cudaMemcpyDeviceToDevice, (cudaStream_t)d->be->stream);
            return;
        }
#endif
        memmove(to, from, (b - a) * sizeof(float));
        return;
    }
    nccl_group(d, 1);
    for (int r = 0; r < d->world; r++) {
        size_t a, b;
        if (!owned(d, r, total, lo, hi, &a, &b)) continue;
        const float *send = src + (a - lo);
        reduce_part(d, send, d->rank != r ? NULL : shard ? shard + (a - mine_lo) : (float *)send, b - a, r);
    }
    nccl_group(d, 0);
}

void mt_dist_reduce_to(mt_dist *d, float *buf, size_t n, int root) {
    if (d->world == 1 || n == 0) return;
    reduce_part(d, buf, d->rank == root ? buf : NULL, n, root);
}

void mt_dist_wait_previous(mt_dist *d) {
#ifdef MT_HAVE_CUDA
    if (!d->nccl) return;
    int prev = d->ring, next = prev ^ 1;
    if (d->ring_used[prev]) cudaStreamWaitEvent((cudaStream_t)d->be->stream, d->ring_done[prev], 0);
    cudaEventRecord(d->ring_done[next], d->stream);
    d->ring_used[next] = 1;
    d->ring = next;
#else
    (void)d;
#endif
}

// Elements [a, b) of buf (elem bytes each) from root to every rank, in place.
static void broadcast_part(mt_dist *d, void *buf, size_t a, size_t b, size_t elem, int root) {
    char *at0 = (char *)buf + a * elem;
    size_t bytes = (b - a) * elem;
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        NCCL_CHECK(ncclBroadcast(at0, at0, bytes, ncclUint8, root, d->comm, d->stream));
        return;
    }
#else
    (void)d;
#endif
    MPI_PIECES(bytes, at, len) MPI_Bcast(at0 + at, (int)len, MPI_BYTE, root, MPI_COMM_WORLD);
}

void mt_dist_share_ranges(mt_dist *d, void *buf, const size_t *bounds, size_t elem) {
    if (d->world == 1) return;
    nccl_group(d, 1);
    for (int r = 0; r < d->world; r++)
        if (bounds[r] < bounds[r + 1]) broadcast_part(d, buf, bounds[r], bounds[r + 1], elem, r);
    nccl_group(d, 0);
}

void mt_dist_share_shards(mt_dist *d, void *buf, size_t lo, size_t hi, size_t total, size_t elem) {
    if (d->world == 1) return;
    nccl_group(d, 1);
    for (int r = 0; r < d->world; r++) {
        size_t a, b;
        if (owned(d, r, total, lo, hi, &a, &b)) broadcast_part(d, buf, a, b, elem, r);
    }
    nccl_group(d, 0);
}

void mt_dist_share_ranges_host(mt_dist *d, float *host, const size_t *bounds) {
    if (d->world == 1) return;
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        mt_dist_after_compute(d);
        for (int r = 0; r < d->world; r++) {
            for (size_t at = bounds[r]; at < bounds[r + 1]; at += STAGE_FLOATS) {
                size_t len = bounds[r + 1] - at < STAGE_FLOATS ? bounds[r + 1] - at : STAGE_FLOATS;
                if (d->rank == r)
                    cudaMemcpyAsync(d->scratch, host + at, len * sizeof(float), cudaMemcpyHostToDevice, d->stream);
                NCCL_CHECK(ncclBroadcast(d->scratch, d->scratch, len, ncclFloat, r, d->comm, d->stream));
                if (d->rank != r)
                    cudaMemcpyAsync(host + at, d->scratch, len * sizeof(float), cudaMemcpyDeviceToHost, d->stream);
                cudaStreamSynchronize(d->stream);
            }
        }
        return;
    }
#endif
    for (int r = 0; r < d->world; r++) {
        MPI_PIECES(bounds[r + 1] - bounds[r], at, len)
        MPI_Bcast(host + bounds[r] + at, (int)len, MPI_FLOAT, r, MPI_COMM_WORLD);
    }
}

void mt_dist_share_shards_host(mt_dist *d, float *host, size_t total) {
    if (d->world == 1) return;
    size_t *bounds = malloc((size_t)(d->world + 1) * sizeof *bounds), hi;
    MT_CHECK(bounds != NULL, "shard bounds");
    for (int r = 0; r < d->world; r++) mt_dist_shard(d, r, total, &bounds[r], &hi);
    bounds[d->world] = total;
    mt_dist_share_ranges_host(d, host, bounds);
    free(bounds);
}

void mt_dist_sum_host(mt_dist *d, double *x, int n) {
    if (d->world == 1 || n == 0) return;
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        mt_dist_after_compute(d);
        cudaMemcpyAsync(d->scratch, x, (size_t)n * sizeof(double), cudaMemcpyHostToDevice, d->stream);
        NCCL_CHECK(ncclAllReduce(d->scratch, d->scratch, (size_t)n, ncclDouble, ncclSum, d->comm, d->stream));
        cudaMemcpyAsync(x, d->scratch, (size_t)n * sizeof(double), cudaMemcpyDeviceToHost, d->stream);
        cudaStreamSynchronize(d->stream);
        return;
    }
#endif
    MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

mt_err mt_dist_check_same(mt_dist *d, uint64_t value, const char *what) {
    if (d->world == 1) return MT_OK;
    uint64_t lo = value, hi = value;
#ifdef MT_HAVE_CUDA
    if (d->nccl) {
        uint64_t both[2] = {value, value};
        mt_dist_after_compute(d);
        cudaMemcpyAsync(d->scratch, both, sizeof both, cudaMemcpyHostToDevice, d->stream);
        NCCL_CHECK(ncclGroupStart());
        NCCL_CHECK(ncclAllReduce(d->scratch, d->scratch, 1, ncclUint64, ncclMin, d->comm, d->stream));
        NCCL_CHECK(ncclAllReduce((uint64_t *)d->scratch + 1, (uint64_t *)d->scratch + 1, 1, ncclUint64, ncclMax,
                                 d->comm, d->stream));
        NCCL_CHECK(ncclGroupEnd());
        cudaMemcpyAsync(both, d->scratch, sizeof both, cudaMemcpyDeviceToHost, d->stream);
        cudaStreamSynchronize(d->stream);
        lo = both[0], hi = both[1];
    } else
#endif
    {
        MPI_Allreduce(&value, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(&value, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
    }
    if (lo == hi) return MT_OK;
    return mt_errorf(MT_ERR_CONFIG,
                     "the %d ranks do not agree on %s (rank %d has %016llx; the values range from %016llx to "
                     "%016llx): give every rank the same config and --set options",
                     d->world, what, d->rank, (unsigned long long)value, (unsigned long long)lo,
                     (unsigned long long)hi);
}

int mt_dist_any(mt_dist *d, int flag) {
    double count = flag != 0;
    mt_dist_sum_host(d, &count, 1);  // every rank must arrive for a sum
    return count > 0;
}
