/*
 * kernels.h - the numeric kernels of the spirt tensor module: arithmetic over float32 arrays, with no
 * dependency on the server's module API, so that they compile and can be tested without a server.
 *
 * tensor.c owns everything that talks to the server (arguments, keys, validation, replies,
 * replication, threads) and calls these once per range or block of coordinates, never per element:
 * the element loops stay inside kernels.c, where GCC vectorizes them, and a call across the two
 * translation units costs nothing next to the block of work it carries.
 *
 * Conventions
 * - Tensor data may sit at any byte address (server strings are not 4-byte aligned): float32 data is
 *   read and written through f32u, the alignment-1 float type.
 * - Multi-source kernels take the K sources as an array of base pointers plus a coordinate offset
 *   `off`, so the module hands over its key mappings unchanged; they compute coordinates
 *   [off, off + n) of dst (also a base pointer). dst may be one of the sources (the same base
 *   pointer): each block of every source is read before that block of dst is written.
 * - Every coordinate's result depends only on that coordinate's inputs, never on how a range is
 *   split between calls or threads. The exceptions are the per-block partial sums of NORM and DIST,
 *   whose summation order is defined by the caller's blocks (tk_sumsq, tk_dist_*).
 * - The kernels never allocate and never block: scratch memory comes from the caller, so they can run
 *   on worker threads that must not use the server's allocator. Stack use stays below 32 KiB.
 * - IEEE semantics throughout (no fast-math): AVG/AXPY/SGD propagate NaN and infinities; the rank
 *   statistics treat NaN as described at tk_rank.
 */
#ifndef SPIRT_KERNELS_H
#define SPIRT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define TK_BLK 4096       /* floats per block of the element-wise kernels (cache-sized) */
#define TK_NET_MAX_K 128  /* rank statistics: sorting network up to this K, selection above */

/* Unaligned-safe float32 and uint32 views of string bytes. */
typedef float f32u __attribute__((aligned(1), may_alias));
typedef uint32_t u32u __attribute__((aligned(1), may_alias));

/* ---- AVG and AXPY ------------------------------------------------------------------------------ */

/* dst = (src[0] + ... + src[K-1]) / K, summed in float32 in source order (K >= 1). */
void tk_avg(f32u *dst, const f32u *const *src, size_t K, size_t off, size_t n);

/* dst = alpha[0]*src[0] + ... + alpha[K-1]*src[K-1], float32, one term at a time in order (K >= 1). */
void tk_axpy(f32u *dst, const float *alpha, const f32u *const *src, size_t K, size_t off, size_t n);

/* ---- SGD --------------------------------------------------------------------------------------- */

/* Which update applies: momentum needs to know whether the buffer existed before this step. */
enum {
    TK_SGD_PLAIN = 0,          /* no momentum; b unused (may be NULL) */
    TK_SGD_MOMENTUM_FIRST = 1, /* buf = g */
    TK_SGD_MOMENTUM = 2,       /* buf = mu*buf + (1-d)*g */
    TK_SGD_NESTEROV_FIRST = 3, /* buf = g;                  step g + mu*buf */
    TK_SGD_NESTEROV = 4,       /* buf = mu*buf + (1-d)*g;   step g + mu*buf */
};

typedef struct {
    float lr, mu;
    float one_minus_d; /* 1 - dampening, rounded once by the caller */
    float wd;
    int use_wd;        /* weight decay term present (decided on the unrounded value: wd*p with wd
                          rounded to 0 still turns an infinite param into NaN, as torch does) */
    int mode;          /* TK_SGD_* */
} tk_sgd_t;

/* One in-place step of torch.optim.SGD over n elements, float32 in torch's order of operations:
 *   g = grad + wd*p (if use_wd); buf per mode; p = p - lr*(buf, or g + mu*buf for Nesterov,
 *   or g without momentum).
 * p, g, b point at the first element of the range. g may be the same memory as p (the gradient is
 * copied block by block before p is written); b must not overlap p or g. */
void tk_sgd(f32u *p, const f32u *g, f32u *b, size_t n, const tk_sgd_t *o);

/* The average of K sources followed by one SGD step, in one pass: per block of TK_BLK coordinates,
 * g = tk_avg's value of the block (the same float32 sums and division), then tk_sgd's step with g, over
 * coordinates [off, off + n) of p and b (base pointers, like dst in tk_avg). Bit for bit what tk_avg
 * into a temporary followed by tk_sgd with it gives, without the temporary: each source byte is read
 * once and nothing is allocated. A source may be p itself (each block of every source is read before
 * that block of p is written); b must not be p or a source. */
void tk_avg_sgd(f32u *p, f32u *b, const f32u *const *src, size_t K, size_t off, size_t n, const tk_sgd_t *o);

/* ---- rank statistics: MEDIAN and TRIMMEAN ------------------------------------------------------- */

enum { TK_MEDIAN = 0, TK_TRIMMEAN = 1 };

typedef struct {
    int kind;              /* TK_MEDIAN or TK_TRIMMEAN */
    size_t K, trim;        /* sources; values dropped at each end (TRIMMEAN, 2*trim < K) */
    size_t B;              /* coordinates per block, sizes the scratch */
    const uint32_t *pairs; /* pruned sorting network (K <= TK_NET_MAX_K), 2 entries per comparator */
    size_t cnt;            /* comparators in pairs */
} tk_rank_t;

/* Per-thread scratch of tk_rank: rows K*B floats, nanc B int32, dsum B doubles. */
typedef struct {
    float *rows;
    int32_t *nanc;
    double *dsum;
} tk_rank_scratch_t;

/* Comparators of Batcher's odd-even merge sort network for n inputs; fills pairs (2 entries per
 * comparator, lower index first, in execution order) when non-NULL. */
size_t tk_batcher_network(size_t n, uint32_t *pairs);

/* Keep only the comparators of a network on n <= TK_NET_MAX_K inputs that influence output positions
 * [lo, hi] (in place, order kept); returns the new count. */
size_t tk_prune_network(uint32_t *pairs, size_t cnt, size_t n, size_t lo, size_t hi);

/* Entries of uint32 the caller allocates for tk_rank_init's pairs (0 when K > TK_NET_MAX_K: no
 * network is used, pairs may be NULL). */
size_t tk_rank_pairs_size(size_t K);

/* Plan a rank statistic over K sources: builds the pruned network into pairs and chooses B. */
void tk_rank_init(tk_rank_t *r, int kind, size_t K, size_t trim, uint32_t *pairs);

/* Coordinate-wise over [off, off + n):
 *   MEDIAN: numpy's median (the middle value; mean of the two middle values, computed in double, for
 *           even K); NaN if any source is NaN at that coordinate.
 *   TRIMMEAN: mean of the values ranked trim .. K-trim-1, summed in double (in ascending order for
 *           K <= TK_NET_MAX_K). NaN ranks above +inf (numpy's sort order), so a coordinate with at
 *           most trim NaNs has them trimmed away; with more it is NaN. */
void tk_rank(const tk_rank_t *r, f32u *dst, const f32u *const *src, size_t off, size_t n,
             const tk_rank_scratch_t *scratch);

/* ---- DIST, NORM, FINITE ------------------------------------------------------------------------ */

/* Squared Euclidean distances of one block of m coordinates between every pair i < j of the K
 * sources, accumulated in double (8 lanes, then the tail). rows is scratch of K*m doubles.
 * tk_dist_partials writes pair p (pairs in row-major order of (i, j), i < j) to part[p];
 * tk_dist_add adds each to D[i*K + j]. Both give the same value for a pair. */
void tk_dist_partials(double *part, const f32u *const *src, size_t K, size_t off, size_t m, double *rows);
void tk_dist_add(double *D, const f32u *const *src, size_t K, size_t off, size_t m, double *rows);

/* D[i*K + j] += part[p] for every pair, in the order of tk_dist_partials: adding the partials of
 * blocks in block order gives exactly what tk_dist_add block by block gives. */
void tk_dist_add_partials(double *D, size_t K, const double *part);

/* Copy the upper triangle of D (K x K, row-major) to the lower one. */
void tk_dist_mirror(double *D, size_t K);

/* Sum of squares of m floats in double: 8 lanes, then the tail. The module's NORM is the sum of these
 * over blocks of TK_BLK floats, in block order. */
double tk_sumsq(const f32u *x, size_t m);

/* Correctly rounded square root without a libm call (the module is not linked against libm). */
double tk_sqrt(double x);

/* Non-zero if any of the m floats is NaN or +-inf. */
int tk_nonfinite(const f32u *x, size_t m);

/* A 256-bit digest of n bytes, for telling states apart (not a cryptographic hash): four lanes of
 * 64-bit multiply-rotate rounds over 8-byte words (the XXH64 round), the tail zero-padded, each output
 * word mixing every lane and the length. Equal bytes give equal digests; one changed bit changes all
 * four words. Runs at several GB/s, where SHA-1 in Lua runs at a few hundred MB/s. */
void tk_digest(const void *data, size_t n, uint64_t out[4]);

#endif /* SPIRT_KERNELS_H */
