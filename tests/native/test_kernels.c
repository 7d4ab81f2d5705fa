/*
 * Stand-alone checks of the tensor module's numeric kernels (spirt/native/kernels.c), no server.
 *
 * Built and run by tests/test_kernels.py, once with the module's own compiler flags and once with
 * AddressSanitizer and UndefinedBehaviorSanitizer. Every tensor lives in a heap block of exactly
 * off + 4*n bytes with the data at byte offset off (0..3), so a kernel that reads or writes one
 * byte outside its range, or accesses a float at an address the compiler assumed aligned, stops the
 * sanitized build; the off bytes in front hold a canary that must survive.
 *
 * Each kernel is compared with a scalar reference written here in the most direct form (torch's
 * formulas for SGD, a full sort for the rank statistics), bit for bit wherever the kernel's
 * operation order is defined, with a tolerance only where it is not (double sums in another order).
 *
 * Output: one line per failure (the first MAX_REPORTED), then "kernels: <checks> checks, <n> failures".
 * Exit status 0 only without failures.
 */
#include "kernels.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REPORTED 25
#define CANARY 0xA5

static unsigned long g_checks, g_failures;

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...) {
    g_failures++;
    if (g_failures > MAX_REPORTED) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
}

/* ---- random data --------------------------------------------------------------------------------- */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double unif(void) { return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0); }

/* Value mixes: plain finite values, finite extremes, a sprinkle of NaN/inf, many NaNs, and ties. */
enum { MIX_PLAIN, MIX_EXTREME, MIX_SPECIAL, MIX_NANHEAVY, MIX_TIES, NMIX };
static const char *MIX_NAME[NMIX] = {"plain", "extreme", "special", "nan-heavy", "ties"};

static float value(int mix) {
    double u = unif();
    switch (mix) {
    case MIX_EXTREME:
        if (u < 0.1) return FLT_MAX * (rnd() & 1 ? 1 : -1);
        if (u < 0.2) return 1e-45f; /* denormal */
        if (u < 0.3) return -0.0f;
        if (u < 0.4) return (float)(unif() * 1e30);
        break;
    case MIX_SPECIAL:
        if (u < 0.04) return NAN;
        if (u < 0.07) return INFINITY;
        if (u < 0.10) return -INFINITY;
        if (u < 0.13) return -0.0f;
        break;
    case MIX_NANHEAVY:
        if (u < 0.35) return NAN;
        if (u < 0.40) return INFINITY;
        break;
    case MIX_TIES: {
        static const float t[] = {-1.0f, -0.0f, 0.0f, 1.0f, 2.5f};
        return t[rnd() % 5];
    }
    default: break;
    }
    return (float)((unif() * 2 - 1) * 8);
}

/* ---- exactly sized, deliberately misaligned tensors ---------------------------------------------- */

typedef struct {
    unsigned char *base;
    size_t off, n;
    f32u *p;
} tensor_t;

static tensor_t tensor_new(size_t n, size_t off) {
    tensor_t t;
    t.base = malloc(off + 4 * n);
    if (!t.base) {
        perror("malloc");
        exit(2);
    }
    memset(t.base, CANARY, off);
    t.off = off;
    t.n = n;
    t.p = (f32u *)(void *)(t.base + off);
    return t;
}

static void tensor_fill(tensor_t *t, int mix) {
    for (size_t i = 0; i < t->n; i++) t->p[i] = value(mix);
}

static void tensor_free(tensor_t *t, const char *what) {
    for (size_t i = 0; i < t->off; i++)
        if (t->base[i] != CANARY) {
            fail("%s: byte before the tensor overwritten", what);
            break;
        }
    free(t->base);
    t->base = NULL;
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        perror("malloc");
        exit(2);
    }
    return p;
}

static uint32_t bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* Same bits, or both NaN (payloads are not specified). */
static int same_bits(float a, float b) { return (a != a && b != b) || bits(a) == bits(b); }

/* Same value (-0 == +0), or both NaN. */
static int same_value(float a, float b) { return (a != a && b != b) || a == b; }

static int close_double(double got, double want, double rtol, double atol) {
    if (got != got || want != want) return got != got && want != want;
    if (isinf(got) || isinf(want)) return got == want;
    return fabs(got - want) <= rtol * fabs(want) + atol;
}

static const size_t LENGTHS[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 4095, 4096, 4097, 8193};
#define NLEN (sizeof LENGTHS / sizeof LENGTHS[0])

/* Sources with offsets that differ between sources and with the length. */
static void sources_new(tensor_t *t, const f32u **p, size_t K, size_t n, int mix) {
    for (size_t k = 0; k < K; k++) {
        t[k] = tensor_new(n, (k + n) % 4);
        tensor_fill(&t[k], mix);
        p[k] = t[k].p;
    }
}

static void sources_free(tensor_t *t, size_t K, const char *what) {
    for (size_t k = 0; k < K; k++) tensor_free(&t[k], what);
}

/* ---- AVG and AXPY -------------------------------------------------------------------------------- */

static void ref_avg(float *out, const f32u *const *src, size_t K, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float acc = src[0][i];
        for (size_t k = 1; k < K; k++) acc = acc + src[k][i];
        out[i] = acc / (float)K;
    }
}

static void ref_axpy(float *out, const float *alpha, const f32u *const *src, size_t K, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float acc = alpha[0] * src[0][i];
        for (size_t k = 1; k < K; k++) acc = acc + alpha[k] * src[k][i];
        out[i] = acc;
    }
}

static void compare_bits(const char *what, size_t K, size_t n, const f32u *got, const float *want) {
    g_checks++;
    for (size_t i = 0; i < n; i++)
        if (!same_bits(got[i], want[i])) {
            fail("%s K=%zu n=%zu: element %zu is %a, expected %a", what, K, n, i, (double)got[i], (double)want[i]);
            return;
        }
}

static void test_avg_axpy(void) {
    static const size_t KS[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 31};
    static const float ALPHAS[] = {1.0f, -0.5f, 0.0f, 3.25f, -1e-3f, 2e5f, 0.1f};
    for (size_t a = 0; a < sizeof KS / sizeof KS[0]; a++)
        for (size_t l = 0; l < NLEN; l++)
            for (int mix = 0; mix < NMIX; mix++) {
                size_t K = KS[a], n = LENGTHS[l];
                tensor_t ts[32];
                const f32u *src[32];
                float alpha[32];
                sources_new(ts, src, K, n, mix);
                for (size_t k = 0; k < K; k++) alpha[k] = ALPHAS[(k + n) % 7];
                float *want = xmalloc(n * sizeof *want);
                tensor_t dst = tensor_new(n, (n + 3) % 4);

                ref_avg(want, src, K, n);
                tk_avg(dst.p, src, K, 0, n);
                compare_bits("avg", K, n, dst.p, want);
                ref_axpy(want, alpha, src, K, n);
                tk_axpy(dst.p, alpha, src, K, 0, n);
                compare_bits("axpy", K, n, dst.p, want);

                /* Any split of the range gives the same result; coordinates outside it are untouched. */
                if (n > 2) {
                    size_t cut = n / 3 + 1;
                    for (size_t i = 0; i < n; i++) dst.p[i] = -7.0f;
                    tk_avg(dst.p, src, K, 1, cut - 1);
                    g_checks++;
                    if (dst.p[0] != -7.0f || dst.p[cut] != -7.0f)
                        fail("avg K=%zu n=%zu: wrote outside [1, %zu)", K, n, cut);
                    tk_avg(dst.p, src, K, cut, n - cut);
                    tk_avg(dst.p, src, K, 0, 1);
                    ref_avg(want, src, K, n);
                    compare_bits("avg (split range)", K, n, dst.p, want);
                    tk_axpy(dst.p, alpha, src, K, cut, n - cut);
                    tk_axpy(dst.p, alpha, src, K, 0, cut);
                    ref_axpy(want, alpha, src, K, n);
                    compare_bits("axpy (split range)", K, n, dst.p, want);
                }

                /* The destination may be one of the sources (the module's in-place update). */
                size_t in = K / 2;
                ref_avg(want, src, K, n);
                tk_avg((f32u *)src[in], src, K, 0, n);
                compare_bits("avg (dst is a source)", K, n, src[in], want);
                ref_axpy(want, alpha, src, K, n);
                tk_axpy((f32u *)src[0], alpha, src, K, 0, n);
                compare_bits("axpy (dst is a source)", K, n, src[0], want);

                free(want);
                tensor_free(&dst, "avg/axpy dst");
                sources_free(ts, K, "avg/axpy source");
            }
}

/* ---- SGD ----------------------------------------------------------------------------------------- */

/* torch.optim.SGD, one element at a time. */
static void ref_sgd(float *p, const float *grad, float *buf, size_t n, float lr, float mu, float one_minus_d,
                    float wd, int use_wd, int momentum, int first, int nesterov) {
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        if (use_wd) g = g + wd * p[i];
        if (momentum) {
            buf[i] = first ? g : mu * buf[i] + one_minus_d * g;
            g = nesterov ? g + mu * buf[i] : buf[i];
        }
        p[i] = p[i] - lr * g;
    }
}

static void test_sgd(void) {
    static const struct {
        int mode, momentum, first, nesterov;
    } MODES[] = {
        {TK_SGD_PLAIN, 0, 0, 0},          {TK_SGD_MOMENTUM_FIRST, 1, 1, 0}, {TK_SGD_MOMENTUM, 1, 0, 0},
        {TK_SGD_NESTEROV_FIRST, 1, 1, 1}, {TK_SGD_NESTEROV, 1, 0, 1},
    };
    static const float DAMP[] = {0.0f, 0.25f, 1.0f};
    for (size_t md = 0; md < sizeof MODES / sizeof MODES[0]; md++)
        for (int use_wd = 0; use_wd < 2; use_wd++)
            for (size_t dd = 0; dd < 3; dd++)
                for (size_t l = 0; l < NLEN; l++)
                    for (int alias = 0; alias < 2; alias++) {
                        if (MODES[md].nesterov && DAMP[dd] != 0) continue; /* torch refuses it */
                        size_t n = LENGTHS[l];
                        int mix = (int)((md + l) % NMIX);
                        tk_sgd_t o = {.lr = 0.05f, .mu = 0.9f, .one_minus_d = 1.0f - DAMP[dd],
                                      .wd = use_wd ? 1e-2f : 0.0f, .use_wd = use_wd, .mode = MODES[md].mode};
                        tensor_t p = tensor_new(n, n % 4), g = tensor_new(n, (n + 1) % 4), b = tensor_new(n, (n + 2) % 4);
                        tensor_fill(&p, mix);
                        tensor_fill(&g, mix);
                        tensor_fill(&b, mix);
                        float *wp = xmalloc(n * sizeof *wp), *wg = xmalloc(n * sizeof *wg), *wb = xmalloc(n * sizeof *wb);
                        for (size_t i = 0; i < n; i++) {
                            wp[i] = p.p[i];
                            wg[i] = alias ? p.p[i] : g.p[i];
                            wb[i] = b.p[i];
                        }
                        ref_sgd(wp, wg, wb, n, o.lr, o.mu, o.one_minus_d, o.wd, use_wd, MODES[md].momentum,
                                MODES[md].first, MODES[md].nesterov);
                        tk_sgd(p.p, alias ? p.p : g.p, MODES[md].momentum ? b.p : NULL, n, &o);
                        char what[96];
                        snprintf(what, sizeof what, "sgd mode=%d wd=%d damp=%g grad-is-param=%d mix=%s", MODES[md].mode,
                                 use_wd, (double)DAMP[dd], alias, MIX_NAME[mix]);
                        compare_bits(what, 1, n, p.p, wp);
                        if (MODES[md].momentum) {
                            strcat(what, " (buffer)");
                            compare_bits(what, 1, n, b.p, wb);
                        }
                        free(wp);
                        free(wg);
                        free(wb);
                        tensor_free(&p, "sgd param");
                        tensor_free(&g, "sgd grad");
                        tensor_free(&b, "sgd buffer");
                    }
}

/* ---- rank statistics ----------------------------------------------------------------------------- */

static void sort_floats(float *a, size_t n) { /* NaN-free input */
    for (size_t i = 1; i < n; i++) {
        float v = a[i];
        size_t j = i;
        while (j > 0 && a[j - 1] > v) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = v;
    }
}

/* numpy: median of the sorted column (NaN if any NaN); trimmed mean of the ranks trim..K-trim-1 of
 * the column sorted with NaN last, summed in double in ascending order. */
static float ref_rank(const f32u *const *src, size_t K, size_t i, int kind, size_t trim, float *col, double *tol) {
    size_t nan = 0;
    for (size_t k = 0; k < K; k++) {
        float v = src[k][i];
        if (v != v) {
            nan++;
            v = INFINITY;
        }
        col[k] = v;
    }
    sort_floats(col, K);
    if (kind == TK_MEDIAN) {
        if (nan) return NAN;
        if (K % 2) return col[K / 2];
        return (float)(((double)col[K / 2 - 1] + (double)col[K / 2]) * 0.5);
    }
    if (nan > trim) return NAN;
    double s = 0, abs_sum = 0;
    for (size_t q = trim; q < K - trim; q++) {
        s += (double)col[q];
        abs_sum += fabs((double)col[q]);
    }
    float mean = (float)(s / (double)(K - 2 * trim));
    /* Another summation order may move the double sum by up to K * eps * sum|x| (the usual bound), and
     * the result by one float rounding more. */
    *tol = 2.0 * (double)K * DBL_EPSILON * abs_sum / (double)(K - 2 * trim) + 2.0 * FLT_EPSILON * fabs((double)mean);
    return mean;
}

static void check_rank(int kind, size_t K, size_t trim, size_t n, int mix) {
    tensor_t ts[160];
    const f32u *src[160];
    sources_new(ts, src, K, n, mix);
    size_t npairs = tk_rank_pairs_size(K);
    uint32_t *pairs = npairs ? xmalloc(npairs * sizeof *pairs) : NULL;
    tk_rank_t r;
    tk_rank_init(&r, kind, K, trim, pairs);
    tk_rank_scratch_t scr = {xmalloc(K * r.B * sizeof(float)), xmalloc(r.B * sizeof(int32_t)),
                             xmalloc(r.B * sizeof(double))};
    tensor_t dst = tensor_new(n, (n + 2) % 4);
    float *want = xmalloc(n * sizeof *want), *col = xmalloc(K * sizeof *col);
    double *tol = xmalloc(n * sizeof *tol);
    for (size_t i = 0; i < n; i++) {
        tol[i] = 0;
        want[i] = ref_rank(src, K, i, kind, trim, col, &tol[i]);
    }
    /* Above TK_NET_MAX_K the kept values are summed in selection order, not ascending. */
    const int exact = kind == TK_MEDIAN || K <= TK_NET_MAX_K;

    /* The whole range, then the same in two pieces split off the block grid. */
    for (int split = 0; split < 2; split++) {
        for (size_t i = 0; i < n; i++) dst.p[i] = -7.0f;
        if (split) {
            size_t cut = n / 2 + (n > 2);
            tk_rank(&r, dst.p, src, cut, n - cut, &scr);
            tk_rank(&r, dst.p, src, 0, cut, &scr);
        } else {
            tk_rank(&r, dst.p, src, 0, n, &scr);
        }
        g_checks++;
        for (size_t i = 0; i < n; i++) {
            float got = dst.p[i];
            if (!(exact ? same_value(got, want[i]) : close_double(got, want[i], 0, tol[i]))) {
                fail("%s K=%zu trim=%zu n=%zu mix=%s split=%d: coordinate %zu is %a, expected %a",
                     kind == TK_MEDIAN ? "median" : "trimmean", K, trim, n, MIX_NAME[mix], split, i, (double)got,
                     (double)want[i]);
                break;
            }
        }
    }
    /* In place: the destination is one of the sources. */
    tk_rank(&r, (f32u *)src[K - 1], src, 0, n, &scr);
    g_checks++;
    for (size_t i = 0; i < n; i++)
        if (!(exact ? same_value(src[K - 1][i], want[i]) : close_double(src[K - 1][i], want[i], 0, tol[i]))) {
            fail("%s K=%zu trim=%zu n=%zu: in place, coordinate %zu is %a, expected %a",
                 kind == TK_MEDIAN ? "median" : "trimmean", K, trim, n, i, (double)src[K - 1][i], (double)want[i]);
            break;
        }
    free(want);
    free(col);
    free(tol);
    free(scr.rows);
    free(scr.nanc);
    free(scr.dsum);
    free(pairs);
    tensor_free(&dst, "rank dst");
    sources_free(ts, K, "rank source");
}

static void test_rank(void) {
    static const size_t RANK_LENGTHS[] = {1, 2, 3, 5, 15, 16, 17, 33, 257, 1100};
    static const size_t BIG_K[] = {31, 32, 33, 64, 127, 128, 129, 160};
    for (size_t K = 1; K <= 17; K++)
        for (size_t l = 0; l < sizeof RANK_LENGTHS / sizeof RANK_LENGTHS[0]; l++) {
            size_t n = RANK_LENGTHS[l];
            int mix = (int)((K + l) % NMIX);
            check_rank(TK_MEDIAN, K, 0, n, mix);
            for (size_t trim = 0; 2 * trim < K; trim++) check_rank(TK_TRIMMEAN, K, trim, n, (mix + (int)trim) % NMIX);
        }
    for (size_t a = 0; a < sizeof BIG_K / sizeof BIG_K[0]; a++)
        for (int mix = 0; mix < NMIX; mix++) {
            size_t K = BIG_K[a], n = mix == MIX_PLAIN ? 300 : 37;
            check_rank(TK_MEDIAN, K, 0, n, mix);
            check_rank(TK_TRIMMEAN, K, 0, n, mix);
            check_rank(TK_TRIMMEAN, K, K / 5, n, mix);
            check_rank(TK_TRIMMEAN, K, (K - 1) / 2, n, mix);
        }
}

/* Sorting networks by the 0-1 principle: a comparator network sorts (or puts ranks lo..hi in place
 * for) every input exactly when it does so for every input of zeros and ones. */
static void test_networks(void) {
    static uint32_t pairs[2 * 4096];
    unsigned char v[TK_NET_MAX_K];
    for (size_t K = 1; K <= TK_NET_MAX_K; K++) {
        size_t cnt = tk_batcher_network(K, NULL);
        g_checks++;
        if (2 * cnt > sizeof pairs / sizeof pairs[0] || 2 * cnt > tk_rank_pairs_size(K)) {
            fail("network K=%zu: %zu comparators do not fit the size tk_rank_pairs_size reports", K, cnt);
            continue;
        }
        if (tk_batcher_network(K, pairs) != cnt) fail("network K=%zu: count differs when filling", K);
        for (size_t c = 0; c < cnt; c++)
            if (pairs[2 * c] >= pairs[2 * c + 1] || pairs[2 * c + 1] >= K) {
                fail("network K=%zu: comparator %zu is (%u, %u)", K, c, pairs[2 * c], pairs[2 * c + 1]);
                break;
            }
        size_t lo_r = K / 3, hi_r = K / 2;
        uint32_t pruned[2 * 4096];
        memcpy(pruned, pairs, 2 * cnt * sizeof *pairs);
        size_t pcnt = tk_prune_network(pruned, cnt, K, lo_r, hi_r);
        g_checks++;
        if (pcnt > cnt) fail("network K=%zu: pruning grew the network", K);
        size_t trials = K <= 16 ? (size_t)1 << K : 300;
        for (size_t t = 0; t < trials; t++) {
            size_t ones = 0;
            for (size_t i = 0; i < K; i++) {
                v[i] = K <= 16 ? (unsigned char)((t >> i) & 1) : (unsigned char)(rnd() & 1);
                ones += v[i];
            }
            unsigned char w[TK_NET_MAX_K];
            memcpy(w, v, K);
            for (size_t c = 0; c < cnt; c++) {
                unsigned char a = v[pairs[2 * c]], b = v[pairs[2 * c + 1]];
                v[pairs[2 * c]] = a & b;
                v[pairs[2 * c + 1]] = a | b;
            }
            for (size_t c = 0; c < pcnt; c++) {
                unsigned char a = w[pruned[2 * c]], b = w[pruned[2 * c + 1]];
                w[pruned[2 * c]] = a & b;
                w[pruned[2 * c + 1]] = a | b;
            }
            int bad = 0;
            for (size_t i = 0; i < K; i++) bad |= v[i] != (i >= K - ones);
            for (size_t i = lo_r; i <= hi_r && i < K; i++) bad |= (w[i] != (i >= K - ones)) << 1;
            if (bad) {
                fail("network K=%zu: %s a 0-1 input (trial %zu)", K,
                     bad & 1 ? "does not sort" : "pruned to ranks [K/3, K/2] misplaces them for", t);
                break;
            }
        }
    }
}

/* ---- DIST, NORM, FINITE -------------------------------------------------------------------------- */

static void test_dist(void) {
    static const size_t DLEN[] = {1, 2, 7, 8, 9, 16, 17, 100, 4097};
    for (size_t K = 1; K <= 17; K += (K < 5 ? 1 : 4))
        for (size_t l = 0; l < sizeof DLEN / sizeof DLEN[0]; l++) {
            size_t n = DLEN[l];
            int mix = l % 3 == 2 ? MIX_SPECIAL : MIX_PLAIN;
            tensor_t ts[32];
            const f32u *src[32];
            sources_new(ts, src, K, n, mix);
            size_t npair = K * (K - 1) / 2;
            double *rows = xmalloc(K * n * sizeof *rows), *part = xmalloc(npair * sizeof *part);
            double *D1 = xmalloc(K * K * sizeof *D1), *D2 = xmalloc(K * K * sizeof *D2);
            for (size_t i = 0; i < K * K; i++) D1[i] = D2[i] = (double)i * 0.5;
            tk_dist_partials(part, src, K, 0, n, rows);
            tk_dist_add(D1, src, K, 0, n, rows);
            tk_dist_add_partials(D2, K, part);
            g_checks++;
            size_t p = 0;
            for (size_t i = 0; i < K; i++)
                for (size_t j = i + 1; j < K; j++, p++) {
                    double want = 0; /* plain sequential sum: the kernel's lane order differs */
                    for (size_t q = 0; q < n; q++) {
                        double d = (double)src[i][q] - (double)src[j][q];
                        want += d * d;
                    }
                    if (!close_double(part[p], want, 1e-11, 0))
                        fail("dist K=%zu n=%zu mix=%s: pair (%zu,%zu) is %.17g, expected %.17g", K, n, MIX_NAME[mix], i,
                             j, part[p], want);
                    double base = (double)(i * K + j) * 0.5;
                    if (!(memcmp(&D1[i * K + j], &D2[i * K + j], sizeof(double)) == 0) ||
                        !close_double(D1[i * K + j], base + part[p], 0, 0))
                        fail("dist K=%zu n=%zu: tk_dist_add and tk_dist_add_partials differ at (%zu,%zu)", K, n, i, j);
                }
            tk_dist_mirror(D1, K);
            for (size_t i = 0; i < K; i++)
                for (size_t j = 0; j < K; j++) {
                    double want = i < j ? D2[i * K + j] : i > j ? D2[j * K + i] : (double)(i * K + j) * 0.5;
                    if (memcmp(&D1[i * K + j], &want, sizeof want) != 0) {
                        fail("dist mirror K=%zu: entry (%zu,%zu)", K, i, j);
                        i = K;
                        break;
                    }
                }
            free(rows);
            free(part);
            free(D1);
            free(D2);
            sources_free(ts, K, "dist source");
        }
}

static void test_norm_finite(void) {
    for (size_t l = 0; l < NLEN; l++)
        for (int mix = 0; mix < NMIX; mix++) {
            size_t n = LENGTHS[l];
            tensor_t t = tensor_new(n, (n + (size_t)mix) % 4);
            tensor_fill(&t, mix);
            double want = 0;
            int nonfinite = 0;
            for (size_t i = 0; i < n; i++) {
                want += (double)t.p[i] * (double)t.p[i];
                nonfinite |= !isfinite(t.p[i]);
            }
            g_checks += 2;
            double got = tk_sumsq(t.p, n);
            if (!close_double(got, want, 1e-11, 0))
                fail("sumsq n=%zu mix=%s: %.17g, expected %.17g", n, MIX_NAME[mix], got, want);
            if (tk_nonfinite(t.p, n) != nonfinite)
                fail("nonfinite n=%zu mix=%s: %d, expected %d", n, MIX_NAME[mix], tk_nonfinite(t.p, n), nonfinite);
            tensor_free(&t, "norm source");
        }
    /* One non-finite value anywhere among finite extremes. */
    static const float FINITE[] = {FLT_MAX, -FLT_MAX, 1e-45f, -0.0f, 0.0f, 1.0f};
    const float bad[] = {NAN, -NAN, INFINITY, -INFINITY};
    for (size_t n = 1; n <= 70; n++)
        for (size_t pos = 0; pos < n; pos++) {
            tensor_t t = tensor_new(n, pos % 4);
            for (size_t i = 0; i < n; i++) t.p[i] = FINITE[(i + n) % 6];
            g_checks++;
            if (tk_nonfinite(t.p, n)) fail("nonfinite n=%zu: finite extremes reported non-finite", n);
            for (size_t b = 0; b < 4; b++) {
                t.p[pos] = bad[b];
                if (!tk_nonfinite(t.p, n)) fail("nonfinite n=%zu: %g at %zu missed", n, (double)bad[b], pos);
            }
            tensor_free(&t, "finite source");
        }
    g_checks++;
    for (int i = 0; i < 2000; i++) {
        double x = i < 4 ? (double[]){0.0, 4.0, 1e-310, INFINITY}[i] : unif() * pow(10, (double)(rnd() % 40) - 20);
        double got = tk_sqrt(x), want = sqrt(x);
        if (memcmp(&got, &want, sizeof got) != 0) {
            fail("sqrt(%.17g) = %.17g, expected %.17g", x, got, want);
            break;
        }
    }
}

/* The digest: equal bytes, equal digests; any single flipped bit, or one byte more or less (zero-padded
 * tails included), changes every output word. */
static void test_digest(void) {
    unsigned char buf[301];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i * 37 + 11);
    for (size_t n = 0; n <= sizeof buf - 1; n += (n < 40 ? 1 : 13)) {
        uint64_t a[4], b[4], c[4];
        tk_digest(buf, n, a);
        tk_digest(buf, n, b);
        g_checks++;
        if (memcmp(a, b, sizeof a) != 0) fail("digest n=%zu differs between two calls", n);
        tk_digest(buf, n + 1, c);
        for (int k = 0; k < 4; k++)
            if (c[k] == a[k]) fail("digest n=%zu: word %d unchanged by one more byte", n, k);
        for (size_t bit = 0; bit < 8 * n; bit += 7) {
            buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
            tk_digest(buf, n, c);
            buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
            g_checks++;
            for (int k = 0; k < 4; k++)
                if (c[k] == a[k]) fail("digest n=%zu: word %d unchanged by flipping bit %zu", n, k, bit);
        }
    }
}

int main(void) {
    test_avg_axpy();
    test_sgd();
    test_networks();
    test_rank();
    test_dist();
    test_norm_finite();
    test_digest();
    if (g_failures > MAX_REPORTED) printf("... %lu more failures\n", g_failures - MAX_REPORTED);
    printf("kernels: %lu checks, %lu failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
