/*
 * spirt tensor module: in-database gradient aggregation for Redis (>= 7.0) and Valkey (>= 8).
 *
 * A tensor is a string value of raw little-endian float32 (4 bytes per element, no header).
 * Every command validates all of its arguments and keys before it modifies anything: a failing
 * command leaves the database unchanged and replies with an error starting with "ERR " or
 * "WRONGTYPE " that names the offending argument or key.
 *
 * Commands
 * --------
 * TENSOR.AVG dst src [src ...]
 *     dst = (src_1 + ... + src_K) / K, summed in float32 in source order (as numpy does).
 *     Reply: integer, number of floats written.
 *
 * TENSOR.AXPY dst alpha1 src1 [alpha2 src2 ...]
 *     dst = sum_i alpha_i * src_i (float32; alpha_i finite and within float32 range).
 *     dst may be a source: TENSOR.AXPY y 1 y a x is y += a*x. Reply: integer number of floats.
 *
 * TENSOR.SGD param grad lr [MOMENTUM mu buf] [DAMPENING d] [NESTEROV] [WD wd]
 *     One in-place step of torch.optim.SGD:
 *       g = grad + wd*param
 *       if mu > 0: buf = g                       if the key buf does not exist yet,
 *                  buf = mu*buf + (1-d)*g        otherwise;
 *                  g = g + mu*buf if NESTEROV else buf
 *       param -= lr*g
 *     Options are case-insensitive and may come in any order, each at most once. lr, mu, wd >= 0;
 *     NESTEROV needs mu > 0 and d = 0 (as torch). buf is created (same length) when missing and must
 *     be a different key from param and grad. Reply: integer number of floats.
 *
 * TENSOR.AVGSGD param numgrads grad [grad ...] lr [MOMENTUM mu buf] [DAMPENING d] [NESTEROV] [WD wd]
 *     TENSOR.AVG of the numgrads grad keys followed by TENSOR.SGD with that average, in one pass: the
 *     same bytes as the two commands with a temporary key, without the temporary (each gradient byte
 *     is read once, nothing is allocated, nothing is left to delete). A grad key may be param; buf
 *     must differ from param and from every grad. Options and reply as TENSOR.SGD.
 *
 * TENSOR.MEDIAN dst src [src ...]
 *     Coordinate-wise median (numpy convention: mean of the two middle values for even K; NaN if
 *     any source is NaN at that coordinate). Reply: integer number of floats.
 *
 * TENSOR.TRIMMEAN dst b src [src ...]
 *     Coordinate-wise mean after dropping the b smallest and b largest values (needs 2b < K). NaN
 *     sorts above +inf (as numpy's sort), so up to b NaNs per coordinate are trimmed away. The kept
 *     values are summed in double. Reply: integer number of floats.
 *
 * TENSOR.DIST src [src ...]
 *     Reply: array of K*K doubles (row-major, symmetric, zero diagonal), the pairwise squared
 *     Euclidean distances, accumulated in double. Read-only. K <= 4096 and
 *     K*(K-1)/2 * length <= 2^35 (bounded run time).
 *
 * TENSOR.NORM src
 *     Reply: double, the L2 norm (accumulated in double). Read-only.
 *
 * TENSOR.DIGEST src
 *     Reply: 40 hex digits identifying the tensor's bytes (a fast non-cryptographic 160-bit digest: equal
 *     tensors give equal digests; peers compare them to tell their states apart).
 *
 * TENSOR.FINITE src
 *     Reply: integer 1 if no element is NaN or +-inf, else 0. Read-only.
 *
 * TENSOR.INBOX WIDTH w ENVELOPE e ROUNDS lo hi TTL ms KEEP n
 *     The database owner's settings for TENSOR.PUSH (module globals, not persisted: a restarted server
 *     refuses every push until its owner sets them again). Without arguments: the settings in force.
 *
 * TENSOR.PUSH inbox notify round vector [envelope]
 *     A peer's vector of `round` into "<inbox>:<round>" (its envelope into "<inbox>:<round>:sig"), the
 *     round announced on the list `notify` (trimmed to the last KEEP entries), every key with the TTL.
 *     Only rounds lo..hi, vectors of exactly WIDTH bytes, envelopes of exactly ENVELOPE bytes (none when
 *     0): what one sender can keep is bounded. ACL grants a sender this command on its own two names.
 *
 * TENSOR.DESK MAXLEN n SLOTS s TTL ms
 *     The database owner's settings for TENSOR.HELLO (module globals, not persisted, like TENSOR.INBOX).
 *     Without arguments: the settings in force.
 *
 * TENSOR.HELLO area message
 *     Appends `message` (at most MAXLEN bytes) to the list `area`, which expires in TTL; refused while the
 *     list already holds SLOTS messages (nothing is overwritten or evicted). ACL grants the unauthenticated
 *     pre-admission user this command on one area per peer index that could be admitted, so what can wait
 *     in a database before admission is bounded: areas x SLOTS x MAXLEN bytes.
 *
 * TENSOR.INFO
 *     Reply: ["version", "<x.y.z>", "commands", [<syntax of each command>...],
 *             "threads", <n>, "parallel-threshold", <m>].
 *
 * Load arguments (--loadmodule <path> [THREADS n] [PARALLEL-THRESHOLD m], keywords case-insensitive)
 * -------------------------------------------------------------------------------------------------
 * THREADS n              1..64 threads per command (the calling thread + n-1 pool workers); default
 *                        min(usable CPUs, 4) (usable: online CPUs, narrowed by the affinity mask).
 *                        THREADS 1 computes everything on the server's thread, as version 1.0.0 did.
 * PARALLEL-THRESHOLD m   a command uses several threads only when it reads >= m floats in total
 *                        (sources x length; SGD and AVGSGD: param, the grads and an existing buffer); default 2^20.
 * An unknown keyword, a repeated one, a missing or bad value makes the module refuse to load, with a
 * log line naming the argument (and so a server started with it refuses to start).
 * Results do not depend on THREADS or PARALLEL-THRESHOLD: every output byte and reply is the same as
 * with THREADS 1 (see "Threads" below), so a primary and its replicas may use different settings.
 *
 * Limits: sources per command <= 65536 (DIST: 4096); tensors 4 bytes .. 512 MiB, a multiple of 4.
 * AVG/AXPY/SGD propagate IEEE non-finite values (NaN in, NaN out): screen inputs with TENSOR.FINITE.
 * Numbers use C strtod syntax (decimal or hex, no blanks); NaN/inf and |x| > FLT_MAX are rejected.
 * Destinations are resized in place and keep an expiry they had (like SETRANGE). Written keys get a
 * keyspace event "tensor.<command>" (class '$').
 *
 * Implementation notes
 * --------------------
 * - This file is the glue to the server (arguments, keys, validation, replies, replication, threads).
 *   The arithmetic lives in kernels.c (see kernels.h), which knows nothing of the module API, so it is
 *   compiled and tested on its own; it is called once per block of coordinates, never per element.
 * - Strings are not 4-byte aligned in memory: all tensor access goes through f32u, an alignment-1
 *   float type.
 * - Key handles: StringDMA/StringTruncate in WRITE mode (and DMA of a non-raw encoded string even in
 *   READ mode) can replace a key's value object, which leaves other open handles to the same key
 *   stale. So each command (1) validates every key through short-lived READ handles, (2) opens,
 *   resizes and maps the destination(s), then (3) opens each source and maps it immediately, so a
 *   later handle on the same key sees the already-converted raw value.
 * - Work is done block by block (cache-sized), all sources per block, each output block written once
 *   after every input of that block was read: a destination that is also a source is handled.
 * - Write commands are replicated verbatim (results are deterministic, independent of threads).
 *
 * Threads
 * -------
 * - Memory bandwidth is the limit of the element-wise commands, and one core cannot use all of it
 *   (on a 2-core VM: 16 sums of 47 MB take 74 ms on 1 thread, 38 ms on 2). Above the threshold the
 *   compute loop of every command is split over coordinate blocks: the server's thread posts a job to
 *   a pool of THREADS-1 workers created at load (sleeping on a condition variable), works on it too,
 *   and waits until every block is done before it closes keys and replies.
 * - Blocks are claimed a chunk (~2^18 floats read) at a time from an atomic counter. So the split
 *   adapts to a busy machine: a worker the OS does not run simply claims nothing, and the server
 *   thread never waits for a worker to wake up or to go back to sleep, only for chunks taken.
 * - Workers only compute on pointers that the server thread mapped before posting the job (and keeps
 *   mapped until the job is done); they never call the module API and never allocate from the
 *   server's allocator (per-thread scratch is allocated by the server thread before posting; the job
 *   record itself is plain malloc, freed by whichever thread drops it last). Workers block all
 *   signals. MODULE UNLOAD stops and joins them (RedisModule_OnUnload).
 * - Determinism: each coordinate is computed by the same operations in the same order whichever
 *   thread runs its block. The reductions keep the serial summation order exactly: NORM and DIST
 *   compute one partial sum per block (the same block sizes as the serial loop) on any thread, and the
 *   server thread adds the partials in block order, as the serial loop does (DIST keeps at most 2^21
 *   partials at a time: long tensors are done in rounds). FINITE is an OR (workers stop early once
 *   any finds a non-finite value). So replies are bit-identical to THREADS 1, not only close.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "kernels.h"
#include "redismodule_api.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TENSOR_MODULE_NAME "spirt_tensor"
#define TENSOR_VERSION_STR "1.1.0" /* 1.1.0: TENSOR.AVGSGD */
#define TENSOR_VERSION_INT 10100

#define BLK TK_BLK                       /* floats per block in element-wise kernels */
#define MAX_SOURCES 65536                /* sources per command */
#define DIST_MAX_SOURCES 4096            /* sources for TENSOR.DIST (reply is K*K doubles) */
#define DIST_MAX_WORK (1ULL << 35)       /* pairs * length bound for TENSOR.DIST */
#define MAX_BYTES ((size_t)512 * 1024 * 1024) /* largest tensor a command writes (string limit) */

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* =============================================================================================== */
/* Errors                                                                                           */
/* =============================================================================================== */

/* A printable, quoted-safe rendering of a key name or argument for error messages: printable ASCII
 * except quote and backslash is kept, everything else becomes \xHH; long names are cut. */
typedef struct {
    char s[160];
} shown_t;

static const char *show_bytes(shown_t *out, const char *p, size_t len) {
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if (o + 8 >= sizeof(out->s) - 4) {
            memcpy(out->s + o, "...", 3);
            o += 3;
            break;
        }
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            out->s[o++] = (char)c;
        } else {
            static const char hex[] = "0123456789abcdef";
            out->s[o++] = '\\';
            out->s[o++] = 'x';
            out->s[o++] = hex[c >> 4];
            out->s[o++] = hex[c & 15];
        }
    }
    out->s[o] = '\0';
    return out->s;
}

static const char *show(shown_t *out, RedisModuleString *s) {
    size_t len;
    const char *p = RedisModule_StringPtrLen(s, &len);
    return show_bytes(out, p, len);
}

__attribute__((format(printf, 2, 3))) static int reply_err(RedisModuleCtx *ctx, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    /* Error replies must be a single line. */
    for (char *c = buf; *c; c++)
        if (*c == '\r' || *c == '\n') *c = ' ';
    return RedisModule_ReplyWithError(ctx, buf);
}

static int reply_arity(RedisModuleCtx *ctx, const char *cmd, const char *usage) {
    return reply_err(ctx, "ERR wrong number of arguments for '%s' command; usage: %s", cmd, usage);
}

static const char *type_name(int t) {
    switch (t) {
    case REDISMODULE_KEYTYPE_LIST: return "a list";
    case REDISMODULE_KEYTYPE_HASH: return "a hash";
    case REDISMODULE_KEYTYPE_SET: return "a set";
    case REDISMODULE_KEYTYPE_ZSET: return "a sorted set";
    case REDISMODULE_KEYTYPE_MODULE: return "a module type value";
    case REDISMODULE_KEYTYPE_STREAM: return "a stream";
    default: return "a non-string value";
    }
}

/* =============================================================================================== */
/* Argument parsing                                                                                 */
/* =============================================================================================== */

enum { NUM_OK = 0, NUM_INVALID = 1, NUM_NONFINITE = 2, NUM_RANGE = 3 };

/* Parse a decimal (or C99 hex) floating point number that must be finite and fit in float32. */
static int parse_real(RedisModuleString *s, double *out) {
    size_t len;
    const char *p = RedisModule_StringPtrLen(s, &len);
    char buf[128];
    if (len == 0 || len >= sizeof buf) return NUM_INVALID;
    memcpy(buf, p, len);
    buf[len] = '\0';
    if (strlen(buf) != len) return NUM_INVALID; /* embedded NUL */
    unsigned char c0 = (unsigned char)buf[0];
    if (!(c0 == '+' || c0 == '-' || c0 == '.' || (c0 >= '0' && c0 <= '9') || c0 == 'i' || c0 == 'I' ||
          c0 == 'n' || c0 == 'N'))
        return NUM_INVALID; /* no leading blanks */
    errno = 0;
    char *end = NULL;
    double v = strtod(buf, &end);
    if (end != buf + len) return NUM_INVALID;
    if (isnan(v) || isinf(v)) return NUM_NONFINITE;
    if (fabs(v) > (double)FLT_MAX) return NUM_RANGE;
    *out = v;
    return NUM_OK;
}

static int reply_bad_real(RedisModuleCtx *ctx, const char *cmd, const char *what, RedisModuleString *s,
                          int code) {
    shown_t sh;
    switch (code) {
    case NUM_NONFINITE:
        return reply_err(ctx, "ERR %s: %s '%s' is not finite (NaN and infinities are not allowed)", cmd, what,
                         show(&sh, s));
    case NUM_RANGE:
        return reply_err(ctx, "ERR %s: %s '%s' is outside the float32 range (|x| <= 3.4028235e38)", cmd, what,
                         show(&sh, s));
    default: return reply_err(ctx, "ERR %s: %s '%s' is not a valid number", cmd, what, show(&sh, s));
    }
}

/* Parse a non-negative decimal integer (digits only, at most 18). */
static int parse_count(RedisModuleString *s, long long *out) {
    size_t len;
    const char *p = RedisModule_StringPtrLen(s, &len);
    if (len == 0 || len > 18) return -1;
    long long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 0;
}

static int arg_is(RedisModuleString *s, const char *word) {
    size_t len;
    const char *p = RedisModule_StringPtrLen(s, &len);
    size_t wl = strlen(word);
    if (len != wl) return 0;
    for (size_t i = 0; i < len; i++) {
        char a = p[i], b = word[i];
        if (a >= 'a' && a <= 'z') a = (char)(a - 'a' + 'A');
        if (a != b) return 0;
    }
    return 1;
}

static int same_key(RedisModuleString *a, RedisModuleString *b) {
    size_t la, lb;
    const char *pa = RedisModule_StringPtrLen(a, &la);
    const char *pb = RedisModule_StringPtrLen(b, &lb);
    return la == lb && memcmp(pa, pb, la) == 0;
}

/* =============================================================================================== */
/* Key validation and mapping                                                                       */
/* =============================================================================================== */

/* Check that `key` (role e.g. "source") exists, is a string, and has a valid tensor length; if
 * *expect is non-zero the length must equal it, otherwise it is stored there. Uses a short-lived
 * READ handle. On error replies and returns -1. */
static int check_tensor_key(RedisModuleCtx *ctx, const char *cmd, const char *role, RedisModuleString *key,
                            size_t *expect, const char *expect_from) {
    shown_t sh;
    RedisModuleKey *k = RedisModule_OpenKey(ctx, key, REDISMODULE_READ);
    int t = k ? RedisModule_KeyType(k) : REDISMODULE_KEYTYPE_EMPTY;
    if (t == REDISMODULE_KEYTYPE_EMPTY) {
        if (k) RedisModule_CloseKey(k);
        reply_err(ctx, "ERR %s: %s key '%s' does not exist", cmd, role, show(&sh, key));
        return -1;
    }
    if (t != REDISMODULE_KEYTYPE_STRING) {
        RedisModule_CloseKey(k);
        reply_err(ctx, "WRONGTYPE %s: %s key '%s' holds %s, not a float32 tensor string", cmd, role,
                  show(&sh, key), type_name(t));
        return -1;
    }
    size_t len = RedisModule_ValueLength(k);
    RedisModule_CloseKey(k);
    if (len == 0 || len % 4 != 0) {
        reply_err(ctx, "ERR %s: %s '%s' has %zu bytes, not a non-zero multiple of 4 (float32 tensor)", cmd,
                  role, show(&sh, key), len);
        return -1;
    }
    if (*expect == 0) {
        if (len > MAX_BYTES) {
            reply_err(ctx, "ERR %s: %s '%s' has %zu bytes, more than the %zu-byte tensor limit", cmd, role,
                      show(&sh, key), len, MAX_BYTES);
            return -1;
        }
        *expect = len;
    } else if (len != *expect) {
        reply_err(ctx, "ERR %s: %s '%s' has %zu bytes, expected %zu (%s)", cmd, role, show(&sh, key), len,
                  *expect, expect_from);
        return -1;
    }
    return 0;
}

/* A destination must be missing or a string. READ handle only: nothing is touched. */
static int check_dst_key(RedisModuleCtx *ctx, const char *cmd, const char *role, RedisModuleString *key) {
    shown_t sh;
    RedisModuleKey *k = RedisModule_OpenKey(ctx, key, REDISMODULE_READ);
    if (k == NULL) return 0;
    int t = RedisModule_KeyType(k);
    RedisModule_CloseKey(k);
    if (t != REDISMODULE_KEYTYPE_EMPTY && t != REDISMODULE_KEYTYPE_STRING) {
        reply_err(ctx, "WRONGTYPE %s: %s key '%s' holds %s, not a float32 tensor string", cmd, role,
                  show(&sh, key), type_name(t));
        return -1;
    }
    return 0;
}

/* Open a destination for writing, size it to nbytes and map it. */
static int open_dst(RedisModuleCtx *ctx, const char *cmd, RedisModuleString *key, size_t nbytes,
                    RedisModuleKey **kout, f32u **pout) {
    shown_t sh;
    RedisModuleKey *k = RedisModule_OpenKey(ctx, key, REDISMODULE_READ | REDISMODULE_WRITE);
    *kout = k;
    if (k == NULL) {
        reply_err(ctx, "ERR %s: cannot open key '%s' for writing", cmd, show(&sh, key));
        return -1;
    }
    if (RedisModule_StringTruncate(k, nbytes) != REDISMODULE_OK) {
        reply_err(ctx, "ERR %s: cannot resize key '%s' to %zu bytes", cmd, show(&sh, key), nbytes);
        return -1;
    }
    size_t len = 0;
    char *p = RedisModule_StringDMA(k, &len, REDISMODULE_READ | REDISMODULE_WRITE);
    if (p == NULL || len != nbytes) {
        reply_err(ctx, "ERR %s: cannot map key '%s' for writing", cmd, show(&sh, key));
        return -1;
    }
    *pout = (f32u *)(void *)p;
    return 0;
}

/* Open a validated source and map it at once (see the notes at the top). */
static int open_src(RedisModuleCtx *ctx, const char *cmd, RedisModuleString *key, size_t nbytes,
                    RedisModuleKey **kout, const f32u **pout) {
    shown_t sh;
    RedisModuleKey *k = RedisModule_OpenKey(ctx, key, REDISMODULE_READ);
    *kout = k;
    size_t len = 0;
    const char *p = NULL;
    if (k != NULL && RedisModule_KeyType(k) == REDISMODULE_KEYTYPE_STRING)
        p = RedisModule_StringDMA(k, &len, REDISMODULE_READ);
    if (p == NULL || len != nbytes) {
        /* Not reachable: keys were validated in this same command call. */
        reply_err(ctx, "ERR %s: key '%s' changed while the command ran", cmd, show(&sh, key));
        return -1;
    }
    *pout = (const f32u *)(const void *)p;
    return 0;
}

/* A set of K source keys at argv[first + i*step], plus an optional destination. */
typedef struct {
    RedisModuleCtx *ctx;
    const char *cmd;
    size_t K;
    size_t nbytes, n;
    RedisModuleKey *dstkey;
    f32u *dst;
    RedisModuleKey **keys;
    const f32u **src;
} srcset_t;

static void srcset_close(srcset_t *s) {
    if (s->keys) {
        for (size_t i = 0; i < s->K; i++)
            if (s->keys[i]) RedisModule_CloseKey(s->keys[i]);
        RedisModule_Free(s->keys);
        s->keys = NULL;
    }
    if (s->src) {
        RedisModule_Free((void *)s->src);
        s->src = NULL;
    }
    if (s->dstkey) {
        RedisModule_CloseKey(s->dstkey);
        s->dstkey = NULL;
    }
}

/* Validate (dst if dstpos > 0, then every source), then open and map everything.
 * On error: replies, releases everything, returns -1. Nothing is modified unless it returns 0. */
static int srcset_open(srcset_t *s, RedisModuleCtx *ctx, const char *cmd, RedisModuleString **argv, int dstpos,
                       int first, int step, size_t K) {
    memset(s, 0, sizeof *s);
    s->ctx = ctx;
    s->cmd = cmd;
    s->K = K;
    if (dstpos > 0 && check_dst_key(ctx, cmd, "destination", argv[dstpos]) != 0) return -1;
    size_t nbytes = 0;
    char from[320] = "";
    for (size_t i = 0; i < K; i++) {
        if (i == 1) {
            shown_t sh;
            snprintf(from, sizeof from, "all sources must have equal length; first source '%s'",
                     show(&sh, argv[first]));
        }
        if (check_tensor_key(ctx, cmd, "source", argv[first + (int)i * step], &nbytes, from) != 0) return -1;
    }
    s->nbytes = nbytes;
    s->n = nbytes / 4;
    if (dstpos > 0 && open_dst(ctx, cmd, argv[dstpos], nbytes, &s->dstkey, &s->dst) != 0) {
        srcset_close(s);
        return -1;
    }
    s->keys = RedisModule_Alloc(K * sizeof *s->keys);
    s->src = RedisModule_Alloc(K * sizeof *s->src);
    memset(s->keys, 0, K * sizeof *s->keys);
    for (size_t i = 0; i < K; i++) {
        if (open_src(ctx, cmd, argv[first + (int)i * step], nbytes, &s->keys[i], &s->src[i]) != 0) {
            srcset_close(s);
            return -1;
        }
    }
    return 0;
}

/* After a successful write: close, notify, replicate, reply with the element count. */
static int finish_write(srcset_t *s, RedisModuleString *dstname, const char *event) {
    size_t n = s->n;
    srcset_close(s);
    RedisModule_NotifyKeyspaceEvent(s->ctx, REDISMODULE_NOTIFY_STRING, event, dstname);
    RedisModule_ReplicateVerbatim(s->ctx);
    return RedisModule_ReplyWithLongLong(s->ctx, (long long)n);
}

/* =============================================================================================== */
/* Worker threads                                                                                   */
/* =============================================================================================== */

#define MAX_THREADS 64                          /* THREADS load argument: 1 .. MAX_THREADS */
#define DEFAULT_MAX_THREADS 4                   /* default: min(usable CPUs, this) */
#define DEFAULT_PAR_THRESHOLD ((size_t)1 << 20) /* floats read by a command before it goes parallel */
#define PAR_CHUNK_READ ((size_t)1 << 18)        /* floats read per work chunk a thread claims */
#define WORKER_STACK ((size_t)256 * 1024)       /* kernels keep <= 32 KiB on the stack */

static int g_threads = 1;                           /* set at load */
static size_t g_par_threshold = DEFAULT_PAR_THRESHOLD; /* set at load */

/* A parallel loop over items [0, nitems) (an item is a block of coordinates). Threads claim chunks of
 * `chunk` consecutive items from a shared counter until none is left, so a thread that the OS does
 * not run (busy machine) only delays the chunk it holds, and one that never wakes up delays nothing.
 * fn(arg, tid, lo, hi) processes items [lo, hi) using the scratch of thread tid (0 = the calling
 * thread). Each item is computed by the same sequence of operations whichever thread runs it and
 * however the items are grouped, so results do not depend on the thread count. fn must not call the
 * module API (workers are not server threads). */
typedef void (*par_fn_t)(void *arg, int tid, size_t lo, size_t hi);

/* One parallel loop. Heap-allocated (plain malloc: a worker may free it) and reference counted,
 * because a worker may pick it up after the caller has already finished every item and returned. */
typedef struct {
    par_fn_t fn;
    void *arg;
    size_t nitems, chunk;
    atomic_size_t next; /* first unclaimed item */
    atomic_size_t done; /* items finished */
    int refs;           /* caller + workers holding the job; under g_pool.mu */
} par_job_t;

/* The worker pool: g_threads - 1 threads created at load, sleeping on a condition variable. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;     /* a job was posted, or stop */
    pthread_cond_t finished; /* the last item of the posted job is done */
    par_job_t *job;          /* the job workers may join; NULL when none */
    unsigned long gen;       /* incremented per posted job */
    int want;                /* workers the posted job still takes (their tids are want..1) */
    int stop;
    int n;                   /* workers running */
    pthread_t tid[MAX_THREADS];
} g_pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .finished = PTHREAD_COND_INITIALIZER};

static void par_loop(par_job_t *job, int tid) {
    for (;;) {
        size_t lo = atomic_fetch_add_explicit(&job->next, job->chunk, memory_order_relaxed);
        if (lo >= job->nitems) return;
        size_t hi = job->nitems - lo > job->chunk ? lo + job->chunk : job->nitems;
        job->fn(job->arg, tid, lo, hi);
        /* acq_rel: the caller that sees done == nitems also sees every write of fn */
        if (atomic_fetch_add_explicit(&job->done, hi - lo, memory_order_acq_rel) + (hi - lo) == job->nitems) {
            pthread_mutex_lock(&g_pool.mu);
            pthread_cond_signal(&g_pool.finished);
            pthread_mutex_unlock(&g_pool.mu);
        }
    }
}

static void *par_worker(void *unused) {
    (void)unused;
    unsigned long seen = 0;
    pthread_mutex_lock(&g_pool.mu);
    for (;;) {
        while (!g_pool.stop && (g_pool.job == NULL || g_pool.gen == seen || g_pool.want == 0))
            pthread_cond_wait(&g_pool.wake, &g_pool.mu);
        if (g_pool.stop) break;
        seen = g_pool.gen;
        par_job_t *job = g_pool.job;
        int tid = g_pool.want--;
        job->refs++;
        pthread_mutex_unlock(&g_pool.mu);
        par_loop(job, tid);
        pthread_mutex_lock(&g_pool.mu);
        if (--job->refs == 0) free(job);
    }
    pthread_mutex_unlock(&g_pool.mu);
    return NULL;
}

/* Start the workers (at load, after everything else succeeded). Workers block every signal, so
 * signals keep going to the server's own threads. Returns the number started. */
static int pool_start(int nworkers) {
    g_pool.stop = 0; /* in case the library stayed mapped after a MODULE UNLOAD */
    g_pool.job = NULL;
    pthread_attr_t attr;
    int have_attr = pthread_attr_init(&attr) == 0;
    if (have_attr) pthread_attr_setstacksize(&attr, WORKER_STACK);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < nworkers; i++) {
        if (pthread_create(&g_pool.tid[g_pool.n], have_attr ? &attr : NULL, par_worker, NULL) != 0) break;
        g_pool.n++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (have_attr) pthread_attr_destroy(&attr);
    return g_pool.n;
}

/* Stop and join the workers (module unload). */
static void pool_stop(void) {
    pthread_mutex_lock(&g_pool.mu);
    g_pool.stop = 1;
    pthread_cond_broadcast(&g_pool.wake);
    pthread_mutex_unlock(&g_pool.mu);
    for (int i = 0; i < g_pool.n; i++) pthread_join(g_pool.tid[i], NULL);
    g_pool.n = 0;
}

/* Items per claimed chunk for items of `coords` coordinates each, reading `streams` floats per
 * coordinate. */
static size_t par_chunk(size_t coords, size_t streams) {
    size_t per_item = coords * (streams ? streams : 1);
    size_t c = PAR_CHUNK_READ / (per_item ? per_item : 1);
    return c ? c : 1;
}

/* Threads to use for a command that reads `reads` floats in total, split into nitems items claimed
 * `chunk` at a time: 1 below the threshold, else up to g_threads (at most one per chunk). */
static int par_plan(size_t reads, size_t nitems, size_t chunk) {
    if (g_threads <= 1 || reads < g_par_threshold) return 1;
    size_t chunks = nitems / chunk + (nitems % chunk != 0);
    return chunks < (size_t)g_threads ? (int)chunks : g_threads;
}

/* Run fn over [0, nitems) on up to T threads (the caller is thread 0 and works too; see par_plan).
 * Returns once every item is done, without waiting for workers that did not get to run. */
static void par_run(int T, size_t nitems, size_t chunk, par_fn_t fn, void *arg) {
    if (T > g_pool.n + 1) T = g_pool.n + 1;
    par_job_t *job = T > 1 && nitems > 0 ? malloc(sizeof *job) : NULL;
    if (job == NULL) {
        if (nitems) fn(arg, 0, 0, nitems);
        return;
    }
    job->fn = fn;
    job->arg = arg;
    job->nitems = nitems;
    job->chunk = chunk;
    atomic_init(&job->next, 0);
    atomic_init(&job->done, 0);
    job->refs = 1;
    pthread_mutex_lock(&g_pool.mu);
    g_pool.job = job;
    g_pool.want = T - 1;
    g_pool.gen++;
    if (T - 1 < g_pool.n)
        for (int i = 0; i < T - 1; i++) pthread_cond_signal(&g_pool.wake);
    else
        pthread_cond_broadcast(&g_pool.wake);
    pthread_mutex_unlock(&g_pool.mu);
    par_loop(job, 0);
    pthread_mutex_lock(&g_pool.mu);
    g_pool.job = NULL; /* no worker joins it any more */
    g_pool.want = 0;
    while (atomic_load_explicit(&job->done, memory_order_acquire) < nitems)
        pthread_cond_wait(&g_pool.finished, &g_pool.mu);
    int last = --job->refs == 0;
    pthread_mutex_unlock(&g_pool.mu);
    if (last) free(job);
}

/* CPUs this process may run on (affinity mask, else online CPUs). */
static int usable_cpus(void) {
    long on = sysconf(_SC_NPROCESSORS_ONLN);
    if (on < 1) on = 1;
#ifdef CPU_COUNT
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c >= 1 && c < on) on = c;
    }
#endif
    return on > MAX_THREADS ? MAX_THREADS : (int)on;
}

/* Load arguments: [THREADS n] [PARALLEL-THRESHOLD m] (case-insensitive, each at most once).
 * Logs the reason and returns -1 on a bad argument. */
static int parse_load_args(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    int threads = usable_cpus();
    if (threads > DEFAULT_MAX_THREADS) threads = DEFAULT_MAX_THREADS;
    long long threshold = (long long)DEFAULT_PAR_THRESHOLD;
    int seen_threads = 0, seen_thr = 0;
    shown_t sh, sv;
    for (int i = 0; i < argc; i += 2) {
        int is_threads = arg_is(argv[i], "THREADS");
        int is_thr = arg_is(argv[i], "PARALLEL-THRESHOLD");
        if (!is_threads && !is_thr) {
            RedisModule_Log(ctx, "warning",
                            "unknown load argument '%s' (expected THREADS n, PARALLEL-THRESHOLD m); "
                            "module not loaded",
                            show(&sh, argv[i]));
            return -1;
        }
        const char *name = is_threads ? "THREADS" : "PARALLEL-THRESHOLD";
        if ((is_threads && seen_threads) || (is_thr && seen_thr)) {
            RedisModule_Log(ctx, "warning", "load argument %s given more than once; module not loaded",
                            name);
            return -1;
        }
        if (i + 1 >= argc) {
            RedisModule_Log(ctx, "warning", "load argument %s needs a value; module not loaded", name);
            return -1;
        }
        long long v;
        if (is_threads) {
            if (parse_count(argv[i + 1], &v) != 0 || v < 1 || v > MAX_THREADS) {
                RedisModule_Log(ctx, "warning",
                                "load argument THREADS '%s' is not an integer in 1..%d; module not loaded",
                                show(&sv, argv[i + 1]), MAX_THREADS);
                return -1;
            }
            threads = (int)v;
            seen_threads = 1;
        } else {
            if (parse_count(argv[i + 1], &v) != 0 || v < 1) {
                RedisModule_Log(ctx, "warning",
                                "load argument PARALLEL-THRESHOLD '%s' is not a positive integer "
                                "(floats); module not loaded",
                                show(&sv, argv[i + 1]));
                return -1;
            }
            threshold = v;
            seen_thr = 1;
        }
    }
    g_threads = threads;
    g_par_threshold = (size_t)threshold;
    return 0;
}

/* =============================================================================================== */
/* TENSOR.AVG                                                                                       */
/* =============================================================================================== */

/* Blocks [lo, hi) of BLK floats: all sources of a block, then its output (dst may be a source). */
static void avg_blocks(void *arg, int tid, size_t lo, size_t hi) {
    (void)tid;
    const srcset_t *s = arg;
    tk_avg(s->dst, s->src, s->K, lo * BLK, MIN(hi * BLK, s->n) - lo * BLK);
}

static int cmd_avg(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.AVG";
    if (argc < 3) return reply_arity(ctx, cmd, "TENSOR.AVG dst src [src ...]");
    size_t K = (size_t)argc - 2;
    if (K > MAX_SOURCES) return reply_err(ctx, "ERR %s: too many sources (%zu > %d)", cmd, K, MAX_SOURCES);
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 1, 2, 1, K) != 0) return REDISMODULE_OK;
    size_t nblk = (s.n + BLK - 1) / BLK, chunk = par_chunk(BLK, K);
    par_run(par_plan(s.n * K, nblk, chunk), nblk, chunk, avg_blocks, &s);
    return finish_write(&s, argv[1], "tensor.avg");
}

/* =============================================================================================== */
/* TENSOR.AXPY                                                                                      */
/* =============================================================================================== */

typedef struct {
    const srcset_t *s;
    const float *alpha;
} axpy_job_t;

static void axpy_blocks(void *arg, int tid, size_t lo, size_t hi) {
    (void)tid;
    const axpy_job_t *j = arg;
    const srcset_t *s = j->s;
    tk_axpy(s->dst, j->alpha, s->src, s->K, lo * BLK, MIN(hi * BLK, s->n) - lo * BLK);
}

static int cmd_axpy(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.AXPY";
    if (argc < 4 || (argc - 2) % 2 != 0)
        return reply_arity(ctx, cmd, "TENSOR.AXPY dst alpha1 src1 [alpha2 src2 ...]");
    size_t K = ((size_t)argc - 2) / 2;
    if (K > MAX_SOURCES) return reply_err(ctx, "ERR %s: too many sources (%zu > %d)", cmd, K, MAX_SOURCES);
    float *alpha = RedisModule_Alloc(K * sizeof *alpha);
    for (size_t i = 0; i < K; i++) {
        double v;
        int rc = parse_real(argv[2 + 2 * i], &v);
        if (rc != NUM_OK) {
            char what[32];
            snprintf(what, sizeof what, "alpha%zu", i + 1);
            RedisModule_Free(alpha);
            return reply_bad_real(ctx, cmd, what, argv[2 + 2 * i], rc);
        }
        alpha[i] = (float)v;
    }
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 1, 3, 2, K) != 0) {
        RedisModule_Free(alpha);
        return REDISMODULE_OK;
    }
    axpy_job_t job = {&s, alpha};
    size_t nblk = (s.n + BLK - 1) / BLK, chunk = par_chunk(BLK, K);
    par_run(par_plan(s.n * K, nblk, chunk), nblk, chunk, axpy_blocks, &job);
    RedisModule_Free(alpha);
    return finish_write(&s, argv[1], "tensor.axpy");
}

/* =============================================================================================== */
/* TENSOR.SGD                                                                                       */
/* =============================================================================================== */

typedef struct {
    double lr, mu, damp, wd;
    int nesterov;
    int buf_pos; /* argv index of the momentum buffer key, 0 if none */
} sgd_opts_t;

/* Parse the options from argv[first] on; with ctx == NULL only positions are computed (for the getkeys
 * callback) and the return value is meaningless. Replies and returns -1 on error. */
static int sgd_parse(RedisModuleCtx *ctx, const char *cmd, RedisModuleString **argv, int argc, int first,
                     sgd_opts_t *o) {
    shown_t sh;
    memset(o, 0, sizeof *o);
    int seen_mom = 0, seen_damp = 0, seen_wd = 0;
    for (int i = first; i < argc;) {
        if (arg_is(argv[i], "MOMENTUM")) {
            if (ctx == NULL) {
                if (i + 2 < argc) o->buf_pos = i + 2;
                i += 3;
                continue;
            }
            if (seen_mom) return reply_err(ctx, "ERR %s: option MOMENTUM given more than once", cmd), -1;
            if (i + 2 >= argc) return reply_err(ctx, "ERR %s: MOMENTUM needs two arguments: mu buf", cmd), -1;
            int rc = parse_real(argv[i + 1], &o->mu);
            if (rc != NUM_OK) return reply_bad_real(ctx, cmd, "momentum", argv[i + 1], rc), -1;
            if (o->mu < 0)
                return reply_err(ctx, "ERR %s: momentum '%s' must be >= 0", cmd, show(&sh, argv[i + 1])), -1;
            o->buf_pos = i + 2;
            seen_mom = 1;
            i += 3;
        } else if (arg_is(argv[i], "DAMPENING")) {
            if (ctx == NULL) {
                i += 2;
                continue;
            }
            if (seen_damp) return reply_err(ctx, "ERR %s: option DAMPENING given more than once", cmd), -1;
            if (i + 1 >= argc) return reply_err(ctx, "ERR %s: DAMPENING needs a value", cmd), -1;
            int rc = parse_real(argv[i + 1], &o->damp);
            if (rc != NUM_OK) return reply_bad_real(ctx, cmd, "dampening", argv[i + 1], rc), -1;
            seen_damp = 1;
            i += 2;
        } else if (arg_is(argv[i], "WD")) {
            if (ctx == NULL) {
                i += 2;
                continue;
            }
            if (seen_wd) return reply_err(ctx, "ERR %s: option WD given more than once", cmd), -1;
            if (i + 1 >= argc) return reply_err(ctx, "ERR %s: WD needs a value", cmd), -1;
            int rc = parse_real(argv[i + 1], &o->wd);
            if (rc != NUM_OK) return reply_bad_real(ctx, cmd, "weight decay", argv[i + 1], rc), -1;
            if (o->wd < 0)
                return reply_err(ctx, "ERR %s: weight decay '%s' must be >= 0", cmd, show(&sh, argv[i + 1])), -1;
            seen_wd = 1;
            i += 2;
        } else if (arg_is(argv[i], "NESTEROV")) {
            if (ctx == NULL) {
                i += 1;
                continue;
            }
            if (o->nesterov) return reply_err(ctx, "ERR %s: option NESTEROV given more than once", cmd), -1;
            o->nesterov = 1;
            i += 1;
        } else {
            if (ctx == NULL) break;
            return reply_err(ctx,
                             "ERR %s: unknown option '%s' (expected MOMENTUM mu buf, DAMPENING d, NESTEROV, WD wd)",
                             cmd, show(&sh, argv[i])),
                   -1;
        }
    }
    if (ctx == NULL) return 0;
    if (o->nesterov && (o->mu <= 0 || o->damp != 0))
        return reply_err(ctx, "ERR %s: NESTEROV requires MOMENTUM mu > 0 and zero DAMPENING", cmd), -1;
    return 0;
}

/* One update over [0, n): with fused, g = the average of the K sources (TENSOR.AVGSGD), else the one
 * gradient src[0] (TENSOR.SGD). */
typedef struct {
    f32u *p, *b;
    const f32u **src;
    size_t K, n;
    int fused;
    tk_sgd_t o;
} sgd_job_t;

static void sgd_blocks(void *arg, int tid, size_t lo, size_t hi) {
    (void)tid;
    const sgd_job_t *j = arg;
    size_t base = lo * BLK, m = MIN(hi * BLK, j->n) - base;
    if (j->fused)
        tk_avg_sgd(j->p, j->b, j->src, j->K, base, m, &j->o);
    else
        tk_sgd(j->p + base, j->src[0] + base, j->b ? j->b + base : NULL, m, &j->o);
}

/* Where an update command's arguments are: the gradient keys argv[grad0 .. grad0 + K), the learning
 * rate argv[lr_pos], the options after it. */
typedef struct {
    const char *cmd;
    int grad0, lr_pos;
    size_t K;
    int fused;
} update_args_t;

/* TENSOR.SGD and TENSOR.AVGSGD: validate everything, then open, map and compute (torch's order of
 * operations in float32). */
static int run_update(RedisModuleCtx *ctx, RedisModuleString **argv, int argc, const update_args_t *a) {
    const char *cmd = a->cmd;
    sgd_opts_t o;
    int rc = parse_real(argv[a->lr_pos], &o.lr);
    if (rc != NUM_OK) return reply_bad_real(ctx, cmd, "learning rate", argv[a->lr_pos], rc);
    double lr = o.lr;
    if (sgd_parse(ctx, cmd, argv, argc, a->lr_pos + 1, &o) != 0) return REDISMODULE_OK;
    o.lr = lr;
    shown_t sh;
    if (o.lr < 0)
        return reply_err(ctx, "ERR %s: learning rate '%s' must be >= 0", cmd, show(&sh, argv[a->lr_pos]));
    int use_mom = o.mu > 0;
    RedisModuleString *pk = argv[1], *bk = o.buf_pos ? argv[o.buf_pos] : NULL;
    if (bk) {
        int clash = same_key(bk, pk);
        for (size_t i = 0; i < a->K && !clash; i++) clash = same_key(bk, argv[a->grad0 + (int)i]);
        if (clash)
            return reply_err(ctx, "ERR %s: momentum buffer key '%s' must differ from the param and grad keys", cmd,
                             show(&sh, bk));
    }

    /* 1. validate */
    size_t nbytes = 0;
    char from[320];
    if (check_tensor_key(ctx, cmd, "param", pk, &nbytes, "") != 0) return REDISMODULE_OK;
    snprintf(from, sizeof from, "must match param '%s'", show(&sh, pk));
    for (size_t i = 0; i < a->K; i++)
        if (check_tensor_key(ctx, cmd, "grad", argv[a->grad0 + (int)i], &nbytes, from) != 0) return REDISMODULE_OK;
    int buf_exists = 0;
    if (use_mom) {
        RedisModuleKey *k = RedisModule_OpenKey(ctx, bk, REDISMODULE_READ);
        int t = k ? RedisModule_KeyType(k) : REDISMODULE_KEYTYPE_EMPTY;
        if (k) RedisModule_CloseKey(k);
        if (t != REDISMODULE_KEYTYPE_EMPTY) {
            if (check_tensor_key(ctx, cmd, "momentum buffer", bk, &nbytes, from) != 0) return REDISMODULE_OK;
            buf_exists = 1;
        }
    }
    size_t n = nbytes / 4;

    /* 2. open and map the written keys, then the gradients (see the notes at the top) */
    RedisModuleKey *kp = NULL, *kb = NULL;
    RedisModuleKey **kg = RedisModule_Alloc(a->K * sizeof *kg);
    const f32u **g = RedisModule_Alloc(a->K * sizeof *g);
    memset(kg, 0, a->K * sizeof *kg);
    f32u *p = NULL, *b = NULL;
    int ok = open_dst(ctx, cmd, pk, nbytes, &kp, &p) == 0;
    if (ok && use_mom) ok = open_dst(ctx, cmd, bk, nbytes, &kb, &b) == 0;
    for (size_t i = 0; ok && i < a->K; i++) ok = open_src(ctx, cmd, argv[a->grad0 + (int)i], nbytes, &kg[i], &g[i]) == 0;

    /* 3. compute */
    if (ok) {
        sgd_job_t job;
        job.p = p;
        job.src = g;
        job.K = a->K;
        job.b = use_mom ? b : NULL;
        job.n = n;
        job.fused = a->fused;
        job.o.mode = !use_mom     ? TK_SGD_PLAIN
                     : o.nesterov ? (buf_exists ? TK_SGD_NESTEROV : TK_SGD_NESTEROV_FIRST)
                                  : (buf_exists ? TK_SGD_MOMENTUM : TK_SGD_MOMENTUM_FIRST);
        job.o.lr = (float)o.lr;
        job.o.mu = (float)o.mu;
        job.o.one_minus_d = (float)(1.0 - o.damp);
        job.o.wd = (float)o.wd;
        job.o.use_wd = o.wd != 0;
        size_t streams = a->K + 1 + (use_mom && buf_exists);
        size_t nblk = (n + BLK - 1) / BLK, chunk = par_chunk(BLK, streams);
        par_run(par_plan(n * streams, nblk, chunk), nblk, chunk, sgd_blocks, &job);
    }
    for (size_t i = 0; i < a->K; i++)
        if (kg[i]) RedisModule_CloseKey(kg[i]);
    RedisModule_Free(kg);
    RedisModule_Free((void *)g);
    if (kb) RedisModule_CloseKey(kb);
    if (kp) RedisModule_CloseKey(kp);
    if (!ok) return REDISMODULE_OK;
    const char *event = a->fused ? "tensor.avgsgd" : "tensor.sgd";
    RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_STRING, event, pk);
    if (use_mom) RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_STRING, event, bk);
    RedisModule_ReplicateVerbatim(ctx);
    return RedisModule_ReplyWithLongLong(ctx, (long long)n);
}

static int cmd_sgd(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const update_args_t a = {"TENSOR.SGD", 2, 3, 1, 0};
    if (RedisModule_IsKeysPositionRequest(ctx)) {
        sgd_opts_t o;
        if (argc > 1) RedisModule_KeyAtPos(ctx, 1);
        if (argc > 2) RedisModule_KeyAtPos(ctx, 2);
        sgd_parse(NULL, a.cmd, argv, argc, 4, &o);
        if (o.buf_pos > 0) RedisModule_KeyAtPos(ctx, o.buf_pos);
        return REDISMODULE_OK;
    }
    if (argc < 4)
        return reply_arity(ctx, a.cmd, "TENSOR.SGD param grad lr [MOMENTUM mu buf] [DAMPENING d] [NESTEROV] [WD wd]");
    return run_update(ctx, argv, argc, &a);
}

/* TENSOR.AVGSGD param numgrads grad [grad ...] lr [options]: K from argv[2] when it is a count that
 * fits the arguments, else 0. */
static size_t avgsgd_count(RedisModuleString **argv, int argc) {
    long long K;
    if (argc < 3 || parse_count(argv[2], &K) != 0 || K < 1 || K > MAX_SOURCES || K > (long long)argc - 4) return 0;
    return (size_t)K;
}

static int cmd_avgsgd(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.AVGSGD";
    size_t K = avgsgd_count(argv, argc);
    if (RedisModule_IsKeysPositionRequest(ctx)) {
        sgd_opts_t o;
        if (argc > 1) RedisModule_KeyAtPos(ctx, 1);
        for (size_t i = 0; i < K; i++) RedisModule_KeyAtPos(ctx, 3 + (int)i);
        if (K > 0) {
            sgd_parse(NULL, cmd, argv, argc, 4 + (int)K, &o);
            if (o.buf_pos > 0) RedisModule_KeyAtPos(ctx, o.buf_pos);
        }
        return REDISMODULE_OK;
    }
    if (argc < 5)
        return reply_arity(ctx, cmd,
                           "TENSOR.AVGSGD param numgrads grad [grad ...] lr [MOMENTUM mu buf] [DAMPENING d] "
                           "[NESTEROV] [WD wd]");
    if (K == 0) {
        shown_t sh;
        return reply_err(ctx,
                         "ERR %s: numgrads '%s' must be an integer in 1..%d followed by that many grad keys and "
                         "the learning rate",
                         cmd, show(&sh, argv[2]), MAX_SOURCES);
    }
    const update_args_t a = {cmd, 3, 3 + (int)K, K, 1};
    return run_update(ctx, argv, argc, &a);
}

/* =============================================================================================== */
/* Rank statistics: TENSOR.MEDIAN and TENSOR.TRIMMEAN                                                */
/* =============================================================================================== */

typedef struct {
    const srcset_t *s;
    tk_rank_t r;
    tk_rank_scratch_t *scr; /* one per thread */
} rank_job_t;

/* Items are blocks of r.B coordinates. */
static void rank_blocks(void *arg, int tid, size_t lo, size_t hi) {
    const rank_job_t *j = arg;
    const size_t B = j->r.B;
    tk_rank(&j->r, j->s->dst, j->s->src, lo * B, MIN(hi * B, j->s->n) - lo * B, &j->scr[tid]);
}

static void rank_compute(srcset_t *s, int kind, size_t trim) {
    const size_t K = s->K, n = s->n;
    rank_job_t job;
    memset(&job, 0, sizeof job);
    job.s = s;
    size_t npairs = tk_rank_pairs_size(K);
    uint32_t *pairs = npairs ? RedisModule_Alloc(npairs * sizeof *pairs) : NULL;
    tk_rank_init(&job.r, kind, K, trim, pairs);
    const size_t B = job.r.B;
    size_t nblk = (n + B - 1) / B, chunk = par_chunk(B, K);
    int T = par_plan(n * K, nblk, chunk);
    tk_rank_scratch_t scr[MAX_THREADS];
    for (int t = 0; t < T; t++) {
        scr[t].rows = RedisModule_Alloc(K * B * sizeof *scr[t].rows);
        scr[t].nanc = RedisModule_Alloc(B * sizeof *scr[t].nanc);
        scr[t].dsum = RedisModule_Alloc(B * sizeof *scr[t].dsum);
    }
    job.scr = scr;
    par_run(T, nblk, chunk, rank_blocks, &job);
    for (int t = 0; t < T; t++) {
        RedisModule_Free(scr[t].dsum);
        RedisModule_Free(scr[t].nanc);
        RedisModule_Free(scr[t].rows);
    }
    if (pairs) RedisModule_Free(pairs);
}

static int cmd_median(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.MEDIAN";
    if (argc < 3) return reply_arity(ctx, cmd, "TENSOR.MEDIAN dst src [src ...]");
    size_t K = (size_t)argc - 2;
    if (K > MAX_SOURCES) return reply_err(ctx, "ERR %s: too many sources (%zu > %d)", cmd, K, MAX_SOURCES);
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 1, 2, 1, K) != 0) return REDISMODULE_OK;
    rank_compute(&s, TK_MEDIAN, 0);
    return finish_write(&s, argv[1], "tensor.median");
}

static int cmd_trimmean(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.TRIMMEAN";
    if (RedisModule_IsKeysPositionRequest(ctx)) {
        if (argc > 1) RedisModule_KeyAtPos(ctx, 1);
        for (int i = 3; i < argc; i++) RedisModule_KeyAtPos(ctx, i);
        return REDISMODULE_OK;
    }
    if (argc < 4) return reply_arity(ctx, cmd, "TENSOR.TRIMMEAN dst b src [src ...]");
    size_t K = (size_t)argc - 3;
    if (K > MAX_SOURCES) return reply_err(ctx, "ERR %s: too many sources (%zu > %d)", cmd, K, MAX_SOURCES);
    long long b;
    shown_t sh;
    if (parse_count(argv[2], &b) != 0)
        return reply_err(ctx, "ERR %s: trim count b '%s' is not a non-negative integer", cmd, show(&sh, argv[2]));
    if ((unsigned long long)b * 2 >= K)
        return reply_err(ctx, "ERR %s: trim count b=%lld needs more than 2b=%lld sources, got %zu", cmd, b, 2 * b, K);
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 1, 3, 1, K) != 0) return REDISMODULE_OK;
    rank_compute(&s, TK_TRIMMEAN, (size_t)b);
    return finish_write(&s, argv[1], "tensor.trimmean");
}

/* =============================================================================================== */
/* Read-only: TENSOR.DIST, TENSOR.NORM, TENSOR.FINITE                                                */
/* =============================================================================================== */

#define DIST_PART_MAX ((size_t)1 << 21) /* doubles of per-block partial sums kept at once (16 MiB) */

typedef struct {
    const srcset_t *s;
    size_t B, pairs, blk0;
    double *part;               /* [block - blk0][pair], pairs (i < j) in row-major order */
    double *rows[MAX_THREADS];  /* per thread: K x B doubles */
} dist_job_t;

static void dist_blocks(void *arg, int tid, size_t lo, size_t hi) {
    const dist_job_t *j = arg;
    const srcset_t *s = j->s;
    const size_t B = j->B;
    for (size_t b = lo; b < hi; b++) {
        size_t base = (j->blk0 + b) * B;
        tk_dist_partials(j->part + b * j->pairs, s->src, s->K, base, MIN(B, s->n - base), j->rows[tid]);
    }
}

static int cmd_dist(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.DIST";
    if (argc < 2) return reply_arity(ctx, cmd, "TENSOR.DIST src [src ...]");
    size_t K = (size_t)argc - 1;
    if (K > DIST_MAX_SOURCES)
        return reply_err(ctx, "ERR %s: too many sources (%zu > %d)", cmd, K, DIST_MAX_SOURCES);
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 0, 1, 1, K) != 0) return REDISMODULE_OK;
    unsigned long long pairs = (unsigned long long)K * (K - 1) / 2;
    if (pairs * (unsigned long long)s.n > DIST_MAX_WORK) {
        size_t n = s.n;
        srcset_close(&s);
        return reply_err(ctx,
                         "ERR %s: %zu sources of %zu floats is too much work (pairs x length = %llu > %llu); "
                         "use fewer sources or shorter tensors",
                         cmd, K, n, pairs * (unsigned long long)n, DIST_MAX_WORK);
    }
    double *D = RedisModule_Alloc(K * K * sizeof *D);
    memset(D, 0, K * K * sizeof *D);
    if (K > 1) {
        size_t B = ((size_t)1 << 19) / K;
        if (B > 4096) B = 4096;
        if (B < 256) B = 256;
        size_t nblk = (s.n + B - 1) / B;
        size_t chunk = (size_t)pairs >= 8 ? 1 : par_chunk(B, K);
        int T = par_plan(s.n * K, nblk, chunk);
        /* Blocks per round: the per-block partials of a round are kept (at most DIST_PART_MAX doubles). */
        size_t R = DIST_PART_MAX / (size_t)pairs;
        if (R > nblk) R = nblk;
        if (R < 2) T = 1;
        if (T <= 1) {
            double *rows = RedisModule_Alloc(K * B * sizeof *rows);
            for (size_t base = 0; base < s.n; base += B) tk_dist_add(D, s.src, K, base, MIN(B, s.n - base), rows);
            RedisModule_Free(rows);
        } else {
            /* Every block's pair sums are computed on some thread, then added to D in block order on
             * this thread: the same additions in the same order as above. */
            dist_job_t job;
            job.s = &s;
            job.B = B;
            job.pairs = (size_t)pairs;
            job.part = RedisModule_Alloc(R * (size_t)pairs * sizeof *job.part);
            for (int t = 0; t < T; t++) job.rows[t] = RedisModule_Alloc(K * B * sizeof *job.rows[t]);
            for (size_t r0 = 0; r0 < nblk; r0 += R) {
                size_t cnt = MIN(R, nblk - r0);
                size_t chunks = (cnt + chunk - 1) / chunk;
                job.blk0 = r0;
                par_run(chunks < (size_t)T ? (int)chunks : T, cnt, chunk, dist_blocks, &job);
                for (size_t b = 0; b < cnt; b++) tk_dist_add_partials(D, K, job.part + b * (size_t)pairs);
            }
            for (int t = 0; t < T; t++) RedisModule_Free(job.rows[t]);
            RedisModule_Free(job.part);
        }
        tk_dist_mirror(D, K);
    }
    srcset_close(&s);
    RedisModule_ReplyWithArray(ctx, (long)(K * K));
    for (size_t i = 0; i < K * K; i++) RedisModule_ReplyWithDouble(ctx, D[i]);
    RedisModule_Free(D);
    return REDISMODULE_OK;
}

typedef struct {
    const f32u *x;
    size_t n;
    double *part;
} norm_job_t;

static void norm_blocks(void *arg, int tid, size_t lo, size_t hi) {
    (void)tid;
    const norm_job_t *j = arg;
    for (size_t b = lo; b < hi; b++) j->part[b] = tk_sumsq(j->x + b * BLK, MIN((size_t)BLK, j->n - b * BLK));
}

static int cmd_norm(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.NORM";
    if (argc != 2) return reply_arity(ctx, cmd, "TENSOR.NORM src");
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 0, 1, 1, 1) != 0) return REDISMODULE_OK;
    double sum = 0;
    size_t nblk = (s.n + BLK - 1) / BLK, chunk = par_chunk(BLK, 1);
    int T = par_plan(s.n, nblk, chunk);
    if (T <= 1) {
        for (size_t base = 0; base < s.n; base += BLK) sum += tk_sumsq(s.src[0] + base, MIN((size_t)BLK, s.n - base));
    } else {
        /* Per-block sums on any thread, added here in block order: the same result as above. */
        norm_job_t job = {s.src[0], s.n, RedisModule_Alloc(nblk * sizeof(double))};
        par_run(T, nblk, chunk, norm_blocks, &job);
        for (size_t b = 0; b < nblk; b++) sum += job.part[b];
        RedisModule_Free(job.part);
    }
    srcset_close(&s);
    return RedisModule_ReplyWithDouble(ctx, tk_sqrt(sum));
}

typedef struct {
    const f32u *x;
    size_t n;
    atomic_int bad; /* set by the first thread that finds a non-finite element; all stop early */
} finite_job_t;

static void finite_blocks(void *arg, int tid, size_t lo, size_t hi) {
    (void)tid;
    finite_job_t *j = arg;
    for (size_t b = lo; b < hi; b++) {
        if (atomic_load_explicit(&j->bad, memory_order_relaxed)) return;
        if (tk_nonfinite(j->x + b * BLK, MIN((size_t)BLK, j->n - b * BLK))) {
            atomic_store_explicit(&j->bad, 1, memory_order_relaxed);
            return;
        }
    }
}

static int cmd_finite(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.FINITE";
    if (argc != 2) return reply_arity(ctx, cmd, "TENSOR.FINITE src");
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 0, 1, 1, 1) != 0) return REDISMODULE_OK;
    finite_job_t job;
    job.x = s.src[0];
    job.n = s.n;
    atomic_init(&job.bad, 0);
    size_t nblk = (s.n + BLK - 1) / BLK, chunk = par_chunk(BLK, 1);
    par_run(par_plan(s.n, nblk, chunk), nblk, chunk, finite_blocks, &job);
    int finite = !atomic_load(&job.bad);
    srcset_close(&s);
    return RedisModule_ReplyWithLongLong(ctx, finite);
}

static int cmd_digest(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    const char *cmd = "TENSOR.DIGEST";
    if (argc != 2) return reply_arity(ctx, cmd, "TENSOR.DIGEST src");
    srcset_t s;
    if (srcset_open(&s, ctx, cmd, argv, 0, 1, 1, 1) != 0) return REDISMODULE_OK;
    uint64_t d[4];
    tk_digest(s.src[0], s.n * sizeof(float), d);
    srcset_close(&s);
    /* 160 bits as 40 lowercase hex digits: the width of a SHA-1, so one parser reads either */
    static const char HEX[] = "0123456789abcdef";
    char buf[40];
    for (int i = 0; i < 40; i++) {
        uint64_t word = d[i / 16];
        buf[i] = HEX[(word >> (60 - 4 * (i % 16))) & 0xF];
    }
    return RedisModule_ReplyWithStringBuffer(ctx, buf, sizeof buf);
}

/* =============================================================================================== */
/* TENSOR.INBOX and TENSOR.PUSH: a per-sender budget on what other peers write into this database     */
/* =============================================================================================== */

/* The inbox's settings, set by the database's owner with TENSOR.INBOX (not persisted: a restarted
 * server starts closed, and its owner opens it again). Until then TENSOR.PUSH refuses everything. */
static struct {
    int open;
    long long width;    /* bytes of a vector */
    long long envelope; /* bytes of its envelope; 0: none */
    long long lo, hi;   /* the rounds accepted */
    long long ttl_ms;   /* time to live of every key written */
    long long keep;     /* announcements kept per sender */
} g_inbox;

#define INBOX_MAX_ROUNDS 64       /* hi - lo + 1 */
#define INBOX_MAX_KEEP 1024       /* announcements kept per sender */
#define ROUND_DIGITS 20           /* a long long in decimal, with its sign */

static int parse_nonneg(RedisModuleString *s, long long *out) {
    return RedisModule_StringToLongLong(s, out) == REDISMODULE_OK && *out >= 0 ? 0 : -1;
}

static int cmd_inbox(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    static const char *usage = "TENSOR.INBOX WIDTH w ENVELOPE e ROUNDS lo hi TTL ms KEEP n";
    if (argc == 1) { /* the settings in force */
        RedisModule_ReplyWithArray(ctx, 14);
        RedisModule_ReplyWithSimpleString(ctx, "open");
        RedisModule_ReplyWithLongLong(ctx, g_inbox.open);
        const char *names[] = {"width", "envelope", "lo", "hi", "ttl", "keep"};
        long long vals[] = {g_inbox.width, g_inbox.envelope, g_inbox.lo, g_inbox.hi, g_inbox.ttl_ms, g_inbox.keep};
        for (int i = 0; i < 6; i++) {
            RedisModule_ReplyWithSimpleString(ctx, names[i]);
            RedisModule_ReplyWithLongLong(ctx, vals[i]);
        }
        return REDISMODULE_OK;
    }
    if (argc != 12) return reply_arity(ctx, "TENSOR.INBOX", usage);
    /* argv: 1 WIDTH 2 w 3 ENVELOPE 4 e 5 ROUNDS 6 lo 7 hi 8 TTL 9 ms 10 KEEP 11 n */
    static const char *words[] = {"WIDTH", "ENVELOPE", "ROUNDS", "TTL", "KEEP"};
    static const int word_at[] = {1, 3, 5, 8, 10};
    for (int i = 0; i < 5; i++)
        if (!arg_is(argv[word_at[i]], words[i]))
            return reply_err(ctx, "ERR TENSOR.INBOX: expected %s; usage: %s", words[i], usage);
    long long v[6];
    static const int at[6] = {2, 4, 6, 7, 9, 11};
    for (int i = 0; i < 6; i++) {
        shown_t sh;
        if (parse_nonneg(argv[at[i]], &v[i]) != 0)
            return reply_err(ctx, "ERR TENSOR.INBOX: '%s' is not a non-negative integer", show(&sh, argv[at[i]]));
    }
    if (v[0] == 0 || v[0] % 4 != 0 || (size_t)v[0] > MAX_BYTES)
        return reply_err(ctx, "ERR TENSOR.INBOX: WIDTH %lld is not a float32 tensor size", v[0]);
    if (v[1] > 65536) return reply_err(ctx, "ERR TENSOR.INBOX: ENVELOPE %lld is over 65536 bytes", v[1]);
    if (v[3] < v[2] || v[3] - v[2] >= INBOX_MAX_ROUNDS)
        return reply_err(ctx, "ERR TENSOR.INBOX: ROUNDS %lld %lld: need lo <= hi, at most %d rounds", v[2], v[3],
                         INBOX_MAX_ROUNDS);
    if (v[4] == 0) return reply_err(ctx, "ERR TENSOR.INBOX: TTL must be positive");
    if (v[5] == 0 || v[5] > INBOX_MAX_KEEP)
        return reply_err(ctx, "ERR TENSOR.INBOX: KEEP %lld is not in 1..%d", v[5], INBOX_MAX_KEEP);
    g_inbox.width = v[0];
    g_inbox.envelope = v[1];
    g_inbox.lo = v[2];
    g_inbox.hi = v[3];
    g_inbox.ttl_ms = v[4];
    g_inbox.keep = v[5];
    g_inbox.open = 1;
    return RedisModule_ReplyWithSimpleString(ctx, "OK");
}

/* Set key `name` (must be missing or a string) to `value`, expiring in the inbox's TTL. */
static int inbox_set(RedisModuleCtx *ctx, RedisModuleString *name, RedisModuleString *value) {
    RedisModuleKey *k = RedisModule_OpenKey(ctx, name, REDISMODULE_READ | REDISMODULE_WRITE);
    if (k == NULL) return -1;
    int t = RedisModule_KeyType(k);
    int ok = (t == REDISMODULE_KEYTYPE_EMPTY || t == REDISMODULE_KEYTYPE_STRING) &&
             RedisModule_StringSet(k, value) == REDISMODULE_OK &&
             RedisModule_SetExpire(k, g_inbox.ttl_ms) == REDISMODULE_OK;
    RedisModule_CloseKey(k);
    if (ok) RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_STRING, "tensor.push", name);
    return ok ? 0 : -1;
}

/* TENSOR.PUSH inbox notify round vector [envelope]
 * The sender's vector of `round` into "<inbox>:<round>" (its envelope into "<inbox>:<round>:sig"),
 * and the round announced on the list `notify`, trimmed to the last KEEP entries; every key expires in
 * TTL. Only rounds lo..hi, only vectors of WIDTH bytes, envelopes of exactly ENVELOPE bytes (none when
 * 0). So what one sender can keep here is bounded: (hi - lo + 1) vectors and envelopes, KEEP short
 * entries. ACL confines a sender to its own `inbox` and `notify` names; the keys derived from them carry
 * the same hash tag. Checked in full before anything is written. */
static int cmd_push(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    static const char *usage = "TENSOR.PUSH inbox notify round vector [envelope]";
    if (argc != 5 && argc != 6) return reply_arity(ctx, "TENSOR.PUSH", usage);
    if (!g_inbox.open) return reply_err(ctx, "ERR TENSOR.PUSH: the inbox is closed (no TENSOR.INBOX yet)");
    shown_t sh;
    long long r;
    size_t rlen;
    const char *rtext = RedisModule_StringPtrLen(argv[3], &rlen);
    if (rlen == 0 || rlen > ROUND_DIGITS || RedisModule_StringToLongLong(argv[3], &r) != REDISMODULE_OK || r < 0 ||
        rtext[0] == '+' || (rlen > 1 && rtext[0] == '0'))
        return reply_err(ctx, "ERR TENSOR.PUSH: round '%s' is not a round number", show(&sh, argv[3]));
    if (r < g_inbox.lo || r > g_inbox.hi)
        return reply_err(ctx, "ERR TENSOR.PUSH: round %lld is not open (rounds %lld..%lld are)", r, g_inbox.lo,
                         g_inbox.hi);
    size_t vlen, elen = 0;
    RedisModule_StringPtrLen(argv[4], &vlen);
    if ((long long)vlen != g_inbox.width)
        return reply_err(ctx, "ERR TENSOR.PUSH: vector of %zu bytes, expected %lld", vlen, g_inbox.width);
    if (argc == 6) RedisModule_StringPtrLen(argv[5], &elen);
    if ((argc == 6) != (g_inbox.envelope > 0) || (long long)elen != g_inbox.envelope)
        return reply_err(ctx, "ERR TENSOR.PUSH: envelope of %zu bytes, expected %lld", elen, g_inbox.envelope);
    RedisModuleKey *nk = RedisModule_OpenKey(ctx, argv[2], REDISMODULE_READ | REDISMODULE_WRITE);
    int nt = nk ? RedisModule_KeyType(nk) : REDISMODULE_KEYTYPE_EMPTY;
    if (nk == NULL || (nt != REDISMODULE_KEYTYPE_EMPTY && nt != REDISMODULE_KEYTYPE_LIST)) {
        if (nk) RedisModule_CloseKey(nk);
        return reply_err(ctx, "WRONGTYPE TENSOR.PUSH: notify key '%s' is not a list", show(&sh, argv[2]));
    }
    size_t plen;
    const char *prefix = RedisModule_StringPtrLen(argv[1], &plen);
    size_t cap = plen + 1 + ROUND_DIGITS + 8;
    char *name = RedisModule_Alloc(cap);
    memcpy(name, prefix, plen);
    int n = snprintf(name + plen, cap - plen, ":%lld", r);
    RedisModuleString *vkey = RedisModule_CreateString(ctx, name, plen + (size_t)n);
    memcpy(name + plen + n, ":sig", 4);
    RedisModuleString *ekey = RedisModule_CreateString(ctx, name, plen + (size_t)n + 4);
    RedisModule_Free(name);
    /* the envelope first: a reader that finds the vector finds its envelope */
    int failed = (argc == 6 && inbox_set(ctx, ekey, argv[5]) != 0) || inbox_set(ctx, vkey, argv[4]) != 0;
    RedisModule_FreeString(ctx, vkey);
    RedisModule_FreeString(ctx, ekey);
    if (failed) {
        RedisModule_CloseKey(nk);
        return reply_err(ctx, "WRONGTYPE TENSOR.PUSH: an inbox key of '%s' is not a string", show(&sh, argv[1]));
    }
    RedisModule_ListPush(nk, REDISMODULE_LIST_TAIL, argv[3]);
    while ((long long)RedisModule_ValueLength(nk) > g_inbox.keep) {
        RedisModuleString *old = RedisModule_ListPop(nk, REDISMODULE_LIST_HEAD);
        if (old == NULL) break;
        RedisModule_FreeString(ctx, old);
    }
    RedisModule_SetExpire(nk, g_inbox.ttl_ms);
    RedisModule_CloseKey(nk);
    RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_LIST, "rpush", argv[2]);
    RedisModule_ReplicateVerbatim(ctx);
    return RedisModule_ReplyWithSimpleString(ctx, "OK");
}

/* =============================================================================================== */
/* TENSOR.DESK and TENSOR.HELLO: a bounded pre-admission area                                       */
/* =============================================================================================== */

/* Set by the database's owner with TENSOR.DESK (not persisted: a restarted server refuses every hello
 * until its owner sets them again). */
static struct {
    int open;
    long long maxlen; /* bytes of one message */
    long long slots;  /* messages waiting per area */
    long long ttl_ms; /* time to live of an area */
} g_desk;

#define DESK_MAX_LEN 65536
#define DESK_MAX_SLOTS 1024

static int cmd_desk(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    static const char *usage = "TENSOR.DESK MAXLEN n SLOTS s TTL ms";
    if (argc == 1) { /* the settings in force */
        RedisModule_ReplyWithArray(ctx, 8);
        const char *names[] = {"open", "maxlen", "slots", "ttl"};
        long long vals[] = {g_desk.open, g_desk.maxlen, g_desk.slots, g_desk.ttl_ms};
        for (int i = 0; i < 4; i++) {
            RedisModule_ReplyWithSimpleString(ctx, names[i]);
            RedisModule_ReplyWithLongLong(ctx, vals[i]);
        }
        return REDISMODULE_OK;
    }
    if (argc != 7) return reply_arity(ctx, "TENSOR.DESK", usage);
    static const char *words[] = {"MAXLEN", "SLOTS", "TTL"};
    long long v[3];
    for (int i = 0; i < 3; i++) {
        shown_t sh;
        if (!arg_is(argv[1 + 2 * i], words[i]))
            return reply_err(ctx, "ERR TENSOR.DESK: expected %s; usage: %s", words[i], usage);
        if (parse_nonneg(argv[2 + 2 * i], &v[i]) != 0 || v[i] == 0)
            return reply_err(ctx, "ERR TENSOR.DESK: '%s' is not a positive integer", show(&sh, argv[2 + 2 * i]));
    }
    if (v[0] > DESK_MAX_LEN) return reply_err(ctx, "ERR TENSOR.DESK: MAXLEN %lld is over %d bytes", v[0], DESK_MAX_LEN);
    if (v[1] > DESK_MAX_SLOTS) return reply_err(ctx, "ERR TENSOR.DESK: SLOTS %lld is over %d", v[1], DESK_MAX_SLOTS);
    g_desk.maxlen = v[0];
    g_desk.slots = v[1];
    g_desk.ttl_ms = v[2];
    g_desk.open = 1;
    return RedisModule_ReplyWithSimpleString(ctx, "OK");
}

/* TENSOR.HELLO area message
 * Appends `message` to the list `area` unless that would make it longer than SLOTS or the message is
 * over MAXLEN bytes; the area expires in TTL. A full area refuses (the writer tries again once the
 * owner has taken the waiting messages): a message that is in stays until its owner reads it. */
static int cmd_hello(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return reply_arity(ctx, "TENSOR.HELLO", "TENSOR.HELLO area message");
    if (!g_desk.open) return reply_err(ctx, "ERR TENSOR.HELLO: the desk is closed (no TENSOR.DESK yet)");
    size_t len;
    RedisModule_StringPtrLen(argv[2], &len);
    if (len == 0 || (long long)len > g_desk.maxlen)
        return reply_err(ctx, "ERR TENSOR.HELLO: message of %zu bytes, 1..%lld accepted", len, g_desk.maxlen);
    shown_t sh;
    RedisModuleKey *k = RedisModule_OpenKey(ctx, argv[1], REDISMODULE_READ | REDISMODULE_WRITE);
    int t = k ? RedisModule_KeyType(k) : REDISMODULE_KEYTYPE_EMPTY;
    if (k == NULL || (t != REDISMODULE_KEYTYPE_EMPTY && t != REDISMODULE_KEYTYPE_LIST)) {
        if (k) RedisModule_CloseKey(k);
        return reply_err(ctx, "WRONGTYPE TENSOR.HELLO: area '%s' is not a list", show(&sh, argv[1]));
    }
    if (t == REDISMODULE_KEYTYPE_LIST && (long long)RedisModule_ValueLength(k) >= g_desk.slots) {
        RedisModule_CloseKey(k);
        return reply_err(ctx, "ERR TENSOR.HELLO: area '%s' is full (%lld messages wait); try again later",
                         show(&sh, argv[1]), g_desk.slots);
    }
    RedisModule_ListPush(k, REDISMODULE_LIST_TAIL, argv[2]);
    RedisModule_SetExpire(k, g_desk.ttl_ms);
    RedisModule_CloseKey(k);
    RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_LIST, "rpush", argv[1]);
    RedisModule_ReplicateVerbatim(ctx);
    return RedisModule_ReplyWithSimpleString(ctx, "OK");
}

/* =============================================================================================== */
/* TENSOR.INFO and registration                                                                     */
/* =============================================================================================== */

typedef struct {
    const char *name;
    RedisModuleCmdFunc fn;
    const char *flags;
    int first, last, step;
    const char *syntax;
} command_def_t;

static int cmd_info(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

static const command_def_t COMMANDS[] = {
    {"tensor.avg", cmd_avg, "write deny-oom", 1, -1, 1, "TENSOR.AVG dst src [src ...]"},
    {"tensor.axpy", cmd_axpy, "write deny-oom", 1, -1, 2, "TENSOR.AXPY dst alpha1 src1 [alpha2 src2 ...]"},
    {"tensor.sgd", cmd_sgd, "write deny-oom getkeys-api", 0, 0, 0,
     "TENSOR.SGD param grad lr [MOMENTUM mu buf] [DAMPENING d] [NESTEROV] [WD wd]"},
    {"tensor.avgsgd", cmd_avgsgd, "write deny-oom getkeys-api", 0, 0, 0,
     "TENSOR.AVGSGD param numgrads grad [grad ...] lr [MOMENTUM mu buf] [DAMPENING d] [NESTEROV] [WD wd]"},
    {"tensor.median", cmd_median, "write deny-oom", 1, -1, 1, "TENSOR.MEDIAN dst src [src ...]"},
    {"tensor.trimmean", cmd_trimmean, "write deny-oom getkeys-api", 0, 0, 0, "TENSOR.TRIMMEAN dst b src [src ...]"},
    {"tensor.dist", cmd_dist, "readonly", 1, -1, 1, "TENSOR.DIST src [src ...]"},
    {"tensor.norm", cmd_norm, "readonly", 1, 1, 1, "TENSOR.NORM src"},
    {"tensor.finite", cmd_finite, "readonly", 1, 1, 1, "TENSOR.FINITE src"},
    {"tensor.digest", cmd_digest, "readonly", 1, 1, 1, "TENSOR.DIGEST src"},
    {"tensor.inbox", cmd_inbox, "fast", 0, 0, 0, "TENSOR.INBOX WIDTH w ENVELOPE e ROUNDS lo hi TTL ms KEEP n"},
    {"tensor.push", cmd_push, "write deny-oom", 1, 2, 1, "TENSOR.PUSH inbox notify round vector [envelope]"},
    {"tensor.desk", cmd_desk, "fast", 0, 0, 0, "TENSOR.DESK MAXLEN n SLOTS s TTL ms"},
    {"tensor.hello", cmd_hello, "write deny-oom fast", 1, 1, 1, "TENSOR.HELLO area message"},
    {"tensor.info", cmd_info, "readonly fast", 0, 0, 0, "TENSOR.INFO"},
};

#define NCOMMANDS (sizeof COMMANDS / sizeof COMMANDS[0])

static int cmd_info(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    if (argc != 1) return reply_arity(ctx, "TENSOR.INFO", "TENSOR.INFO");
    RedisModule_ReplyWithArray(ctx, 8);
    RedisModule_ReplyWithSimpleString(ctx, "version");
    RedisModule_ReplyWithStringBuffer(ctx, TENSOR_VERSION_STR, strlen(TENSOR_VERSION_STR));
    RedisModule_ReplyWithSimpleString(ctx, "commands");
    RedisModule_ReplyWithArray(ctx, (long)NCOMMANDS);
    for (size_t i = 0; i < NCOMMANDS; i++)
        RedisModule_ReplyWithStringBuffer(ctx, COMMANDS[i].syntax, strlen(COMMANDS[i].syntax));
    RedisModule_ReplyWithSimpleString(ctx, "threads");
    RedisModule_ReplyWithLongLong(ctx, g_threads);
    RedisModule_ReplyWithSimpleString(ctx, "parallel-threshold");
    RedisModule_ReplyWithLongLong(ctx, (long long)g_par_threshold);
    return REDISMODULE_OK;
}

__attribute__((visibility("default"))) int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv,
                                                              int argc) {
    if (spirt_module_init(ctx, TENSOR_MODULE_NAME, TENSOR_VERSION_INT, REDISMODULE_APIVER_1) != REDISMODULE_OK)
        return REDISMODULE_ERR;
    /* After spirt_module_init: a second MODULE LOAD of this file (same globals) fails there first. */
    if (parse_load_args(ctx, argv, argc) != 0) return REDISMODULE_ERR;
    for (size_t i = 0; i < NCOMMANDS; i++) {
        const command_def_t *c = &COMMANDS[i];
        if (RedisModule_CreateCommand(ctx, c->name, c->fn, c->flags, c->first, c->last, c->step) != REDISMODULE_OK)
            return REDISMODULE_ERR;
    }
    if (g_threads > 1) {
        int started = pool_start(g_threads - 1);
        if (started < g_threads - 1)
            RedisModule_Log(ctx, "warning", "could start only %d of %d worker threads; using %d threads", started,
                            g_threads - 1, started + 1);
        g_threads = started + 1;
    }
    return REDISMODULE_OK;
}

/* MODULE UNLOAD: the workers run module code, so they must be gone before it is unmapped. */
__attribute__((visibility("default"))) int RedisModule_OnUnload(RedisModuleCtx *ctx) {
    (void)ctx;
    pool_stop();
    return REDISMODULE_OK;
}
