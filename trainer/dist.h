// trainer/dist.h: data parallelism. One process per GPU (or, on the CPU
// backend, per process), each with a rank in a world of `world` processes.
//
// Bootstrap: under mpirun (Open MPI's OMPI_COMM_WORLD_* variables, or PMI's
// PMI_RANK/PMI_SIZE) MPI gives rank, world and local rank; without a
// launcher the process is alone and no MPI call is made (no daemon needed).
// MT_RANK, MT_WORLD_SIZE, MT_LOCAL_RANK and MT_RENDEZVOUS (a folder all
// ranks see) start ranks without MPI, GPU backend only: rank 0 leaves the
// NCCL id in that folder.
//
// Collectives work on buffers where the backend computes: on a GPU through
// NCCL on a communication stream that follows the compute stream
// (mt_dist_after_compute) and that the compute stream waits for
// (mt_dist_wait); on the CPU through MPI, blocking. A rank that stops
// answering makes the others exit after dist.timeout seconds without a
// finished step, with a message, instead of hanging.
#ifndef MT_DIST_H
#define MT_DIST_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/device.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_dist mt_dist;

// Reads the launcher's environment (MPI_Init under mpirun). Always returns a
// handle; world 1 when there is no launcher.
// The number of ranks the launcher started (mpirun's or memtune's own
// environment), before mt_dist_init: 1 without one.
int mt_dist_launched_world(void);
mt_err mt_dist_init(mt_dist **out);
// After the backend exists: the communicator (NCCL on a GPU) and the
// watchdog (timeout_s: seconds without a finished step before exiting).
mt_err mt_dist_connect(mt_dist *d, mt_backend *be, double timeout_s);
void mt_dist_free(mt_dist *d);

int mt_dist_rank(const mt_dist *d);
int mt_dist_world(const mt_dist *d);
int mt_dist_local_rank(const mt_dist *d);
int mt_dist_local_world(const mt_dist *d);
// "none", "mpi" or "env": how the ranks were started.
const char *mt_dist_launcher(const mt_dist *d);

// Rank r's shard of n values: [lo, hi), whole 16-value runs except the last.
void mt_dist_shard(const mt_dist *d, int r, size_t n, size_t *lo, size_t *hi);

// The communication stream's next work follows what the compute stream has
// issued so far; the compute stream's next work waits for the collectives
// issued so far. No-ops on the CPU and with one rank.
void mt_dist_after_compute(mt_dist *d);
void mt_dist_wait(mt_dist *d);

// Sums n floats over the ranks, in place, into every rank's buffer.
void mt_dist_allreduce(mt_dist *d, float *buf, size_t n);
// ZeRO-2's reduce-scatter: the values [lo, hi) of a block of `total`, from
// src (which holds element lo first), summed over the ranks into the owner
// of each shard (mt_dist_shard): this rank's part lands in `shard`, which
// holds its shard's first element first (src and shard may overlap exactly,
// as one block reduced in place; shard NULL: this rank's part lands where it
// lies in src). With one rank, a copy (nothing, in place).
void mt_dist_reduce_to_owners(mt_dist *d, const float *src, size_t lo, size_t hi, float *shard, size_t total);
// Sums n floats over the ranks into rank root's buf, in place (the others'
// are left as they were).
void mt_dist_reduce_to(mt_dist *d, float *buf, size_t n, int root);
// Pipelining over two buffers: the compute stream's next work waits for the
// collectives issued before the previous call (not those since); no-op on
// the CPU and with one rank.
void mt_dist_wait_previous(mt_dist *d);
// The all-gather over [lo, hi) of buf (a block of total elements of elem
// bytes): each rank's shard's part goes to every rank, in place.
void mt_dist_share_shards(mt_dist *d, void *buf, size_t lo, size_t hi, size_t total, size_t elem);
// The same with parts of any size: rank r's is [bounds[r], bounds[r + 1]).
void mt_dist_share_ranges(mt_dist *d, void *buf, const size_t *bounds, size_t elem);
// The same for host arrays of floats (checkpoints), blocking.
void mt_dist_share_shards_host(mt_dist *d, float *host, size_t total);
void mt_dist_share_ranges_host(mt_dist *d, float *host, const size_t *bounds);
// Sums n host doubles over the ranks, in place; blocking.
void mt_dist_sum_host(mt_dist *d, double *x, int n);
// Every rank's `value` must be equal; the error names what differs.
mt_err mt_dist_check_same(mt_dist *d, uint64_t value, const char *what);
// Whether flag is set on any rank (every rank waits for all of them).
int mt_dist_any(mt_dist *d, int flag);
// Progress for the watchdog (a step, or a checkpoint, finished).
void mt_dist_heartbeat(mt_dist *d);

#ifdef __cplusplus
}
#endif
#endif
