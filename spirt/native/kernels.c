/*
 * kernels.c - the numeric kernels of the spirt tensor module (see kernels.h).
 *
 * The element loops are plain loops over restrict pointers, which GCC vectorizes at -O3 without
 * reassociating anything: every result keeps the operation order documented in kernels.h, so it is
 * bit-for-bit reproducible (and the same whichever thread or block split computes it).
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

/* On x86-64 glibc builds the hot loops exist twice, for AVX2 and for the baseline ISA, and the loader
 * picks one per CPU: a portable module that still uses the wide vectors where they exist. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* =============================================================================================== */
/* Element loops                                                                                    */
/* =============================================================================================== */

HOT static void k_add2_init(float *restrict acc, const f32u *restrict a, const f32u *restrict b, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = a[i] + b[i];
}

HOT static void k_copy_in(float *restrict acc, const f32u *restrict a, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = a[i];
}

/* acc = ((acc + a) + b) + c: the same rounding as adding one source at a time. */
HOT static void k_add3(float *restrict acc, const f32u *restrict a, const f32u *restrict b,
                       const f32u *restrict c, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = ((acc[i] + a[i]) + b[i]) + c[i];
}

/* Seven sources per pass over the accumulator (fewer accumulator loads/stores), same rounding. */
HOT static void k_add7(float *restrict acc, const f32u *const *restrict s, size_t base, size_t m) {
    const f32u *restrict a = s[0] + base, *restrict b = s[1] + base, *restrict c = s[2] + base;
    const f32u *restrict d = s[3] + base, *restrict e = s[4] + base, *restrict f = s[5] + base;
    const f32u *restrict g = s[6] + base;
    for (size_t i = 0; i < m; i++) acc[i] = ((((((acc[i] + a[i]) + b[i]) + c[i]) + d[i]) + e[i]) + f[i]) + g[i];
}

HOT static void k_add1(float *restrict acc, const f32u *restrict a, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = acc[i] + a[i];
}

HOT static void k_div_store(f32u *restrict d, const float *restrict acc, float K, size_t m) {
    for (size_t i = 0; i < m; i++) d[i] = acc[i] / K;
}

HOT static void k_div(float *restrict acc, float K, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = acc[i] / K;
}

HOT static void k_store(f32u *restrict d, const float *restrict acc, size_t m) {
    for (size_t i = 0; i < m; i++) d[i] = acc[i];
}

HOT static void k_scale_init(float *restrict acc, float a, const f32u *restrict x, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = a * x[i];
}

/* acc = (acc + a*x) + b*y: the same rounding as one term at a time. */
HOT static void k_axpy2(float *restrict acc, float a, const f32u *restrict x, float b, const f32u *restrict y,
                        size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = (acc[i] + a * x[i]) + b * y[i];
}

HOT static void k_axpy1(float *restrict acc, float a, const f32u *restrict x, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] = acc[i] + a * x[i];
}

/* Rows for rank statistics: copy, replace NaN by +inf and count NaNs per coordinate. */
HOT static void k_load_row(float *restrict r, int32_t *restrict nan_count, const f32u *restrict s, size_t m) {
    for (size_t i = 0; i < m; i++) {
        float v = s[i];
        int isn = v != v;
        nan_count[i] += isn;
        r[i] = isn ? INFINITY : v;
    }
}

/* Compare-exchange of two rows: a = min, b = max (no NaNs here). Written with GCC vector extensions
 * (compare gives a lane mask, then select), because the plain ternary loop is not if-converted for
 * every target. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

HOT static void k_cmpx(float *restrict a, float *restrict b, size_t m) {
    size_t i = 0;
    for (; i + 4 <= m; i += 4) {
        v4f x, y;
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        v4i lt = x < y;
        v4i xi = (v4i)x, yi = (v4i)y;
        v4f lo = (v4f)((xi & lt) | (yi & ~lt));
        v4f hi = (v4f)((yi & lt) | (xi & ~lt));
        memcpy(a + i, &lo, sizeof lo);
        memcpy(b + i, &hi, sizeof hi);
    }
    for (; i < m; i++) {
        float x = a[i], y = b[i];
        a[i] = x < y ? x : y;
        b[i] = x < y ? y : x;
    }
}

HOT static void k_dadd_row(double *restrict acc, const float *restrict r, size_t m) {
    for (size_t i = 0; i < m; i++) acc[i] += (double)r[i];
}

HOT static void k_f2d(double *restrict d, const f32u *restrict s, size_t m) {
    for (size_t i = 0; i < m; i++) d[i] = (double)s[i];
}

/* Sum of squared differences in double, 8 independent lanes (vectorizable without reassociation). */
HOT static double k_sqdist(const double *restrict a, const double *restrict b, size_t m) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (int l = 0; l < 8; l++) {
            double d = a[i + l] - b[i + l];
            acc[l] += d * d;
        }
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < m; i++) {
        double d = a[i] - b[i];
        s += d * d;
    }
    return s;
}

HOT static double k_sumsq(const f32u *restrict a, size_t m) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (int l = 0; l < 8; l++) {
            double d = (double)a[i + l];
            acc[l] += d * d;
        }
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < m; i++) {
        double d = (double)a[i];
        s += d * d;
    }
    return s;
}

/* Non-zero if any element has an all-ones exponent (NaN or infinity). */
HOT static uint32_t k_nonfinite(const u32u *restrict a, size_t m) {
    uint32_t bad = 0;
    for (size_t i = 0; i < m; i++) bad |= ((a[i] & 0x7f800000u) == 0x7f800000u);
    return bad;
}

/* One SGD step over m elements. p and b never alias; g is a private copy. */
HOT static void k_sgd(f32u *restrict p, const float *restrict g, f32u *restrict b, size_t m, float lr, float mu,
                      float one_minus_d, float wd, int use_wd, int mode) {
    switch (mode) {
    case TK_SGD_PLAIN:
        for (size_t i = 0; i < m; i++) {
            float pi = p[i];
            float gi = use_wd ? g[i] + wd * pi : g[i];
            p[i] = pi + (-lr) * gi;
        }
        break;
    case TK_SGD_MOMENTUM_FIRST:
        for (size_t i = 0; i < m; i++) {
            float pi = p[i];
            float gi = use_wd ? g[i] + wd * pi : g[i];
            b[i] = gi;
            p[i] = pi + (-lr) * gi;
        }
        break;
    case TK_SGD_MOMENTUM:
        for (size_t i = 0; i < m; i++) {
            float pi = p[i];
            float gi = use_wd ? g[i] + wd * pi : g[i];
            float bi = b[i] * mu + one_minus_d * gi;
            b[i] = bi;
            p[i] = pi + (-lr) * bi;
        }
        break;
    case TK_SGD_NESTEROV_FIRST:
        for (size_t i = 0; i < m; i++) {
            float pi = p[i];
            float gi = use_wd ? g[i] + wd * pi : g[i];
            b[i] = gi;
            p[i] = pi + (-lr) * (gi + mu * gi);
        }
        break;
    default:
        for (size_t i = 0; i < m; i++) {
            float pi = p[i];
            float gi = use_wd ? g[i] + wd * pi : g[i];
            float bi = b[i] * mu + one_minus_d * gi;
            b[i] = bi;
            p[i] = pi + (-lr) * (gi + mu * bi);
        }
        break;
    }
}

/* =============================================================================================== */
/* AVG, AXPY, SGD                                                                                   */
/* =============================================================================================== */

/* acc = src[0][base..] + ... + src[K-1][base..] over m <= TK_BLK floats, in float32, in source order. */
static void avg_sum(float *acc, const f32u *const *src, size_t K, size_t base, size_t m) {
    size_t k;
    if (K >= 2) {
        k_add2_init(acc, src[0] + base, src[1] + base, m);
        k = 2;
    } else {
        k_copy_in(acc, src[0] + base, m);
        k = 1;
    }
    for (; k + 7 <= K; k += 7) k_add7(acc, src + k, base, m);
    for (; k + 3 <= K; k += 3) k_add3(acc, src[k] + base, src[k + 1] + base, src[k + 2] + base, m);
    for (; k < K; k++) k_add1(acc, src[k] + base, m);
}

void tk_avg(f32u *dst, const f32u *const *src, size_t K, size_t off, size_t n) {
    const float fk = (float)K;
    float acc[TK_BLK];
    for (size_t done = 0; done < n; done += TK_BLK) {
        size_t base = off + done;
        size_t m = MIN((size_t)TK_BLK, n - done);
        avg_sum(acc, src, K, base, m);
        k_div_store(dst + base, acc, fk, m);
    }
}

void tk_axpy(f32u *dst, const float *alpha, const f32u *const *src, size_t K, size_t off, size_t n) {
    float acc[TK_BLK];
    for (size_t done = 0; done < n; done += TK_BLK) {
        size_t base = off + done;
        size_t m = MIN((size_t)TK_BLK, n - done);
        k_scale_init(acc, alpha[0], src[0] + base, m);
        size_t k = 1;
        for (; k + 2 <= K; k += 2) k_axpy2(acc, alpha[k], src[k] + base, alpha[k + 1], src[k + 1] + base, m);
        for (; k < K; k++) k_axpy1(acc, alpha[k], src[k] + base, m);
        k_store(dst + base, acc, m);
    }
}

void tk_sgd(f32u *p, const f32u *g, f32u *b, size_t n, const tk_sgd_t *o) {
    float gbuf[TK_BLK];
    for (size_t base = 0; base < n; base += TK_BLK) {
        size_t m = MIN((size_t)TK_BLK, n - base);
        k_copy_in(gbuf, g + base, m); /* grad may be the param itself */
        k_sgd(p + base, gbuf, b ? b + base : NULL, m, o->lr, o->mu, o->one_minus_d, o->wd, o->use_wd, o->mode);
    }
}

void tk_avg_sgd(f32u *p, f32u *b, const f32u *const *src, size_t K, size_t off, size_t n, const tk_sgd_t *o) {
    const float fk = (float)K;
    float g[TK_BLK];
    for (size_t done = 0; done < n; done += TK_BLK) {
        size_t base = off + done;
        size_t m = MIN((size_t)TK_BLK, n - done);
        avg_sum(g, src, K, base, m); /* every source's block is read before p's (or b's) is written */
        k_div(g, fk, m);
        k_sgd(p + base, g, b ? b + base : NULL, m, o->lr, o->mu, o->one_minus_d, o->wd, o->use_wd, o->mode);
    }
}

/* =============================================================================================== */
/* Rank statistics                                                                                  */
/* =============================================================================================== */

/* Comparators whose upper index is >= n are dropped, which is the same as padding with +inf, so one
 * construction serves every n. */
size_t tk_batcher_network(size_t n, uint32_t *pairs) {
    size_t cnt = 0;
    for (size_t p = 1; p < n; p += p)
        for (size_t k = p; k >= 1; k /= 2) {
            for (size_t j = k % p; j + k < n; j += k + k)
                for (size_t i = 0; i < k && i + j + k < n; i++)
                    if ((i + j) / (p + p) == (i + j + k) / (p + p)) {
                        if (pairs) {
                            pairs[2 * cnt] = (uint32_t)(i + j);
                            pairs[2 * cnt + 1] = (uint32_t)(i + j + k);
                        }
                        cnt++;
                    }
            if (k == 1) break;
        }
    return cnt;
}

/* Walks the network backwards, keeping a comparator when an output it writes is still needed; a
 * kept comparator then needs both of its inputs. Dropped ones are marked, then squeezed out. */
size_t tk_prune_network(uint32_t *pairs, size_t cnt, size_t n, size_t lo, size_t hi) {
    const uint32_t dropped = UINT32_MAX;
    unsigned char need[TK_NET_MAX_K];
    memset(need, 0, n);
    for (size_t i = lo; i <= hi; i++) need[i] = 1;
    for (size_t c = cnt; c-- > 0;) {
        uint32_t a = pairs[2 * c], b = pairs[2 * c + 1];
        if (need[a] || need[b])
            need[a] = need[b] = 1;
        else
            pairs[2 * c] = dropped;
    }
    size_t out = 0;
    for (size_t c = 0; c < cnt; c++)
        if (pairs[2 * c] != dropped) {
            pairs[2 * out] = pairs[2 * c];
            pairs[2 * out + 1] = pairs[2 * c + 1];
            out++;
        }
    return out;
}

size_t tk_rank_pairs_size(size_t K) {
    if (K > TK_NET_MAX_K) return 0;
    size_t cnt = tk_batcher_network(K, NULL);
    return (cnt ? cnt : 1) * 2;
}

void tk_rank_init(tk_rank_t *r, int kind, size_t K, size_t trim, uint32_t *pairs) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->K = K;
    r->trim = kind == TK_TRIMMEAN ? trim : 0;
    size_t mid = K / 2;
    if (K <= TK_NET_MAX_K) {
        /* Only the output ranks the statistic reads need to be in place. */
        size_t lo = kind == TK_MEDIAN ? (K % 2 ? mid : mid - 1) : r->trim;
        size_t hi = kind == TK_MEDIAN ? mid : K - r->trim - 1;
        size_t cnt = tk_batcher_network(K, pairs);
        r->cnt = tk_prune_network(pairs, cnt, K, lo, hi);
        r->pairs = pairs;
        /* K rows of B floats stay in L1 while the network runs over them. */
        size_t B = 16384 / K;
        if (B > 1024) B = 1024;
        r->B = (B + 15) & ~(size_t)15;
    } else {
        size_t B = 65536 / K;
        if (B < 16) B = 16;
        if (B > 256) B = 256;
        r->B = B;
    }
}

static inline void swapf(float *a, float *b) {
    float t = *a;
    *a = *b;
    *b = t;
}

static void insertion_sort(float *a, size_t n) {
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

static void sift_down(float *a, size_t root, size_t n) {
    for (;;) {
        size_t c = 2 * root + 1;
        if (c >= n) return;
        if (c + 1 < n && a[c + 1] > a[c]) c++;
        if (!(a[c] > a[root])) return;
        swapf(&a[c], &a[root]);
        root = c;
    }
}

static void heap_sort(float *a, size_t n) {
    for (size_t i = n / 2; i-- > 0;) sift_down(a, i, n);
    for (size_t e = n; e-- > 1;) {
        swapf(&a[0], &a[e]);
        sift_down(a, 0, e);
    }
}

/* Partial sort so that a[k] is the k-th smallest, a[<k] <= a[k] <= a[>k]. No NaNs in a.
 * Quickselect with median-of-three pivots and a depth budget, after which it sorts (heap sort), so
 * adversarial inputs cost O(n log n), not O(n^2). */
static void nth_element(float *a, size_t n, size_t k) {
    if (n < 2) return;
    size_t lo = 0, hi = n - 1;
    int budget = 8;
    for (size_t t = n; t > 1; t >>= 1) budget += 2;
    while (hi > lo) {
        if (hi - lo < 24) {
            insertion_sort(a + lo, hi - lo + 1);
            return;
        }
        if (budget-- <= 0) {
            heap_sort(a + lo, hi - lo + 1);
            return;
        }
        size_t mid = lo + (hi - lo) / 2;
        swapf(&a[mid], &a[lo + 1]);
        if (a[lo] > a[hi]) swapf(&a[lo], &a[hi]);
        if (a[lo + 1] > a[hi]) swapf(&a[lo + 1], &a[hi]);
        if (a[lo] > a[lo + 1]) swapf(&a[lo], &a[lo + 1]);
        float piv = a[lo + 1];
        size_t i = lo + 1, j = hi;
        for (;;) {
            do i++;
            while (a[i] < piv);
            do j--;
            while (a[j] > piv);
            if (j < i) break;
            swapf(&a[i], &a[j]);
        }
        a[lo + 1] = a[j];
        a[j] = piv;
        if (j == k) return;
        if (j > k)
            hi = j - 1;
        else
            lo = j + 1;
    }
}

/* Small K: the sorting network runs on K rows of m coordinates at once, vectorized across
 * coordinates. */
static void rank_net_block(const tk_rank_t *r, f32u *dst, const f32u *const *src, size_t base, size_t m,
                           const tk_rank_scratch_t *scr) {
    const size_t K = r->K, B = r->B, trim = r->trim, mid = K / 2;
    float *rows = scr->rows;
    int32_t *nanc = scr->nanc;
    double *dsum = scr->dsum;
    memset(nanc, 0, m * sizeof *nanc);
    for (size_t k = 0; k < K; k++) k_load_row(rows + k * B, nanc, src[k] + base, m);
    for (size_t c = 0; c < r->cnt; c++) k_cmpx(rows + r->pairs[2 * c] * B, rows + r->pairs[2 * c + 1] * B, m);
    f32u *d = dst + base;
    if (r->kind == TK_MEDIAN) {
        const float *r1 = rows + mid * B;
        if (K % 2) {
            for (size_t i = 0; i < m; i++) d[i] = nanc[i] ? NAN : r1[i];
        } else {
            const float *r0 = rows + (mid - 1) * B;
            for (size_t i = 0; i < m; i++) d[i] = nanc[i] ? NAN : (float)(((double)r0[i] + (double)r1[i]) * 0.5);
        }
    } else {
        const double keep = (double)(K - 2 * trim);
        memset(dsum, 0, m * sizeof *dsum);
        for (size_t q = trim; q < K - trim; q++) k_dadd_row(dsum, rows + q * B, m);
        for (size_t i = 0; i < m; i++) d[i] = (size_t)nanc[i] > trim ? NAN : (float)(dsum[i] / keep);
    }
}

/* Large K: gather a block transposed (coordinate-major) and select per coordinate. */
static void rank_sel_block(const tk_rank_t *r, f32u *dst, const f32u *const *src, size_t base, size_t m,
                           const tk_rank_scratch_t *scr) {
    const size_t K = r->K, trim = r->trim, mid = K / 2;
    float *t = scr->rows;
    int32_t *nanc = scr->nanc;
    memset(nanc, 0, m * sizeof *nanc);
    for (size_t k = 0; k < K; k++) {
        const f32u *sk = src[k] + base;
        for (size_t i = 0; i < m; i++) {
            float v = sk[i];
            int isn = v != v;
            nanc[i] += isn;
            t[i * K + k] = isn ? INFINITY : v;
        }
    }
    f32u *d = dst + base;
    for (size_t i = 0; i < m; i++) {
        float *a = t + i * K;
        if (r->kind == TK_MEDIAN) {
            if (nanc[i]) {
                d[i] = NAN;
                continue;
            }
            nth_element(a, K, mid);
            if (K % 2) {
                d[i] = a[mid];
            } else {
                float lo_v = a[0];
                for (size_t q = 1; q < mid; q++) lo_v = a[q] > lo_v ? a[q] : lo_v;
                d[i] = (float)(((double)lo_v + (double)a[mid]) * 0.5);
            }
        } else {
            if ((size_t)nanc[i] > trim) {
                d[i] = NAN;
                continue;
            }
            if (trim > 0) {
                nth_element(a, K, trim);
                nth_element(a + trim, K - trim, K - 2 * trim - 1);
            }
            double sum = 0;
            for (size_t q = trim; q < K - trim; q++) sum += (double)a[q];
            d[i] = (float)(sum / (double)(K - 2 * trim));
        }
    }
}

void tk_rank(const tk_rank_t *r, f32u *dst, const f32u *const *src, size_t off, size_t n,
             const tk_rank_scratch_t *scratch) {
    for (size_t done = 0; done < n; done += r->B) {
        size_t m = MIN(r->B, n - done);
        if (r->K <= TK_NET_MAX_K)
            rank_net_block(r, dst, src, off + done, m, scratch);
        else
            rank_sel_block(r, dst, src, off + done, m, scratch);
    }
}

/* =============================================================================================== */
/* DIST, NORM, FINITE                                                                               */
/* =============================================================================================== */

static void dist_rows(double *rows, const f32u *const *src, size_t K, size_t off, size_t m) {
    for (size_t k = 0; k < K; k++) k_f2d(rows + k * m, src[k] + off, m);
}

void tk_dist_partials(double *part, const f32u *const *src, size_t K, size_t off, size_t m, double *rows) {
    dist_rows(rows, src, K, off, m);
    for (size_t a = 0; a < K; a++)
        for (size_t c = a + 1; c < K; c++) *part++ = k_sqdist(rows + a * m, rows + c * m, m);
}

void tk_dist_add(double *D, const f32u *const *src, size_t K, size_t off, size_t m, double *rows) {
    dist_rows(rows, src, K, off, m);
    for (size_t i = 0; i < K; i++)
        for (size_t j = i + 1; j < K; j++) D[i * K + j] += k_sqdist(rows + i * m, rows + j * m, m);
}

void tk_dist_add_partials(double *D, size_t K, const double *part) {
    for (size_t i = 0; i < K; i++)
        for (size_t j = i + 1; j < K; j++) D[i * K + j] += *part++;
}

void tk_dist_mirror(double *D, size_t K) {
    for (size_t i = 0; i < K; i++)
        for (size_t j = 0; j < i; j++) D[i * K + j] = D[j * K + i];
}

double tk_sumsq(const f32u *x, size_t m) {
    return k_sumsq(x, m);
}

double tk_sqrt(double x) {
#if defined(__x86_64__) && defined(__GNUC__)
    double r;
    __asm__("sqrtsd %1, %0" : "=x"(r) : "x"(x));
    return r;
#else
    return sqrt(x);
#endif
}

int tk_nonfinite(const f32u *x, size_t m) {
    return k_nonfinite((const u32u *)(const void *)x, m) != 0;
}

/* ---- digest ------------------------------------------------------------------------------------ */

#define DG_P1 0x9E3779B185EBCA87ULL
#define DG_P2 0xC2B2AE3D27D4EB4FULL
#define DG_P3 0x165667B19E3779F9ULL
#define DG_P4 0x85EBCA77C2B2AE63ULL
#define DG_P5 0x27D4EB2F165667C5ULL

static inline uint64_t dg_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t dg_round(uint64_t acc, uint64_t w) {
    acc += w * DG_P2;
    acc = dg_rotl(acc, 31);
    return acc * DG_P1;
}

static inline uint64_t dg_avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= DG_P2;
    h ^= h >> 29;
    h *= DG_P3;
    h ^= h >> 32;
    return h;
}

void tk_digest(const void *data, size_t n, uint64_t out[4]) {
    const unsigned char *p = data;
    uint64_t v[4] = {DG_P1 + DG_P2, DG_P2, 0, (uint64_t)0 - DG_P1};
    size_t i = 0;
    for (; i + 32 <= n; i += 32) { /* four independent chains: the loop runs at memory speed */
        uint64_t w[4];
        memcpy(w, p + i, 32);
        for (int k = 0; k < 4; k++) v[k] = dg_round(v[k], w[k]);
    }
    uint64_t tail[4] = {0, 0, 0, 0};
    size_t rest = n - i; /* < 32 bytes: whole and partial words, zero-padded, into the lanes in turn */
    memcpy(tail, p + i, rest);
    for (size_t k = 0; k < (rest + 7) / 8; k++) v[k] = dg_round(v[k], tail[k]);
    uint64_t merged = dg_rotl(v[0], 1) + dg_rotl(v[1], 7) + dg_rotl(v[2], 12) + dg_rotl(v[3], 18);
    for (int k = 0; k < 4; k++)
        out[k] = dg_avalanche(merged ^ dg_round(0, v[k]) ^ ((uint64_t)n * DG_P5) ^ ((uint64_t)(k + 1) * DG_P4));
}
