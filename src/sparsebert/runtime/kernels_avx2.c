/* Sparse weight x dense activations, AVX2 + FMA: the native twin of kernels.spmm / spmm_ffn.
 *
 * Same weight layout as sparse_format.GroupedSparse (rows sorted and cut into groups of 4,
 * entries of a group interleaved, input features cut into panels, uint16 indices) and the
 * same algorithm as the numba kernels: a tile of 16 tokens is transposed into
 * buf[feature][16] and every output row of the tile accumulates w * buf[k] over its
 * non-zeros (4 rows x 2 registers = 8 independent FMA chains).
 *
 * What C adds over numba: the transposes into and out of the token tiles run as 8x8
 * register transposes (numba has no shuffle intrinsics and moves one float at a time, which
 * cost about a quarter of the kernel time at 90% sparsity), and the loops are exactly the
 * instructions intended. Threads: OpenMP, which resolves to the libgomp torch has loaded,
 * so torch and these kernels share one thread pool.
 *
 * Built on first use by sparsebert.runtime.native (cc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define LANES 16
#define GROUP 4

static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* buf[k][lane] = x[t0 + lane][k] for a tile of `lanes` (16 or 32) tokens; lanes past the
 * last token are zero. */
static void pack(const float *x, int64_t n_in, int64_t t0, int64_t nt, float *buf, int64_t lanes) {
    int64_t k0 = 0;
    if (nt == lanes) {
        for (; k0 + 8 <= n_in; k0 += 8) {
            for (int64_t h = 0; h < lanes; h += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(x + (t0 + h + i) * n_in + k0);
                transpose8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(buf + (k0 + i) * lanes + h, r[i]);
            }
        }
    }
    for (int64_t k = k0; k < n_in; k++)
        for (int64_t i = 0; i < lanes; i++) buf[k * lanes + i] = i < nt ? x[(t0 + i) * n_in + k] : 0.0f;
}

/* out[t0 + lane][o] = obuf[o][lane] for the tile's real tokens. */
static void unpack(const float *obuf, int64_t n_out, float *out, int64_t t0, int64_t nt, int64_t lanes) {
    int64_t o0 = 0;
    if (nt == lanes) {
        for (; o0 + 8 <= n_out; o0 += 8) {
            for (int64_t h = 0; h < lanes; h += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(obuf + (o0 + i) * lanes + h);
                transpose8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + (t0 + h + i) * n_out + o0, r[i]);
            }
        }
    }
    for (int64_t i = 0; i < nt; i++)
        for (int64_t o = o0; o < n_out; o++) out[(t0 + i) * n_out + o] = obuf[o * lanes + i];
}

/* Exact GELU with the rational erf of kernels._gelu (Eigen's float erf). */
static inline __m256 gelu8(__m256 x) {
    const __m256 z = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.7071067811865476f)),
                                                 _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    const __m256 z2 = _mm256_mul_ps(z, z);
    __m256 p = _mm256_fmadd_ps(z2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
    p = _mm256_fmadd_ps(z2, p, _mm256_set1_ps(-2.10102402082508e-06f));
    p = _mm256_fmadd_ps(z2, p, _mm256_set1_ps(-5.69250639462346e-05f));
    p = _mm256_fmadd_ps(z2, p, _mm256_set1_ps(-7.34990630326855e-04f));
    p = _mm256_fmadd_ps(z2, p, _mm256_set1_ps(-2.95459980854025e-03f));
    p = _mm256_fmadd_ps(z2, p, _mm256_set1_ps(-1.60960333262415e-02f));
    p = _mm256_mul_ps(z, p);
    __m256 q = _mm256_fmadd_ps(z2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
    q = _mm256_fmadd_ps(z2, q, _mm256_set1_ps(-1.68282697438203e-03f));
    q = _mm256_fmadd_ps(z2, q, _mm256_set1_ps(-7.37332916720468e-03f));
    q = _mm256_fmadd_ps(z2, q, _mm256_set1_ps(-1.42647390514189e-02f));
    const __m256 erf = _mm256_div_ps(p, q);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

static inline void finish(__m256 lo, __m256 hi, float *row, int act) {
    if (act) {
        lo = gelu8(lo);
        hi = gelu8(hi);
    }
    _mm256_storeu_ps(row, lo);
    _mm256_storeu_ps(row + 8, hi);
}

#define FMA_ENTRY(J, LO, HI)                                              \
    do {                                                                  \
        const float *xk = buf + (int64_t)idx[(J)] * LANES;                \
        const __m256 w = _mm256_broadcast_ss(val + (J));                  \
        LO = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk), LO);                 \
        HI = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8), HI);             \
    } while (0)

/* Every output row of the tile in buf: dst[perm[r]][lane] = act(sum_k W[r][k] buf[k][lane] + b). */
static void tile(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_groups,
                 const uint16_t *idx, const float *val, const uint64_t *perm, const float *bias,
                 int act, float *dst, float *part) {
    for (int64_t p = 0; p < n_panels; p++) {
        const uint64_t *pp = ptr + p * (n_groups + 1);
        const int last = p == n_panels - 1;
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t r = GROUP * g;
            float *pr = part + r * LANES;
            __m256 a0, a1, b0, b1, c0, c1, d0, d1;
            if (p == 0) {
                a0 = a1 = _mm256_set1_ps(bias[r]);
                b0 = b1 = _mm256_set1_ps(bias[r + 1]);
                c0 = c1 = _mm256_set1_ps(bias[r + 2]);
                d0 = d1 = _mm256_set1_ps(bias[r + 3]);
            } else {
                a0 = _mm256_loadu_ps(pr), a1 = _mm256_loadu_ps(pr + 8);
                b0 = _mm256_loadu_ps(pr + 16), b1 = _mm256_loadu_ps(pr + 24);
                c0 = _mm256_loadu_ps(pr + 32), c1 = _mm256_loadu_ps(pr + 40);
                d0 = _mm256_loadu_ps(pr + 48), d1 = _mm256_loadu_ps(pr + 56);
            }
            const uint64_t end = pp[g + 1];
            for (uint64_t j = pp[g]; j < end; j += GROUP) {
                FMA_ENTRY(j, a0, a1);
                FMA_ENTRY(j + 1, b0, b1);
                FMA_ENTRY(j + 2, c0, c1);
                FMA_ENTRY(j + 3, d0, d1);
            }
            if (last) {
                finish(a0, a1, dst + perm[r] * LANES, act);
                finish(b0, b1, dst + perm[r + 1] * LANES, act);
                finish(c0, c1, dst + perm[r + 2] * LANES, act);
                finish(d0, d1, dst + perm[r + 3] * LANES, act);
            } else {
                _mm256_storeu_ps(pr, a0), _mm256_storeu_ps(pr + 8, a1);
                _mm256_storeu_ps(pr + 16, b0), _mm256_storeu_ps(pr + 24, b1);
                _mm256_storeu_ps(pr + 32, c0), _mm256_storeu_ps(pr + 40, c1);
                _mm256_storeu_ps(pr + 48, d0), _mm256_storeu_ps(pr + 56, d1);
            }
        }
    }
}

#define FMA_ENTRY32(J, X0, X1, X2, X3)                                    \
    do {                                                                  \
        const float *xk = buf + (int64_t)idx[(J)] * 32;                   \
        const __m256 w = _mm256_broadcast_ss(val + (J));                  \
        X0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk), X0);                 \
        X1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8), X1);             \
        X2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 16), X2);            \
        X3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 24), X3);            \
    } while (0)

/* `tile` for 32-token tiles: a row takes 4 registers, so the 4 rows of a group run as two
 * passes of 2 rows (8 FMA chains); every index and weight load now feeds 4 FMAs, not 2. */
static void tile32(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_groups,
                   const uint16_t *idx, const float *val, const uint64_t *perm, const float *bias,
                   int act, float *dst, float *part) {
    for (int64_t p = 0; p < n_panels; p++) {
        const uint64_t *pp = ptr + p * (n_groups + 1);
        const int last = p == n_panels - 1;
        for (int64_t g = 0; g < n_groups; g++) {
            for (int half = 0; half < 2; half++) {
                const int64_t r = GROUP * g + 2 * half;
                float *pa = part + r * 32, *pb = pa + 32;
                __m256 a0, a1, a2, a3, b0, b1, b2, b3;
                if (p == 0) {
                    a0 = a1 = a2 = a3 = _mm256_set1_ps(bias[r]);
                    b0 = b1 = b2 = b3 = _mm256_set1_ps(bias[r + 1]);
                } else {
                    a0 = _mm256_loadu_ps(pa), a1 = _mm256_loadu_ps(pa + 8);
                    a2 = _mm256_loadu_ps(pa + 16), a3 = _mm256_loadu_ps(pa + 24);
                    b0 = _mm256_loadu_ps(pb), b1 = _mm256_loadu_ps(pb + 8);
                    b2 = _mm256_loadu_ps(pb + 16), b3 = _mm256_loadu_ps(pb + 24);
                }
                const uint64_t end = pp[g + 1];
                for (uint64_t j = pp[g] + 2 * half; j < end; j += GROUP) {
                    FMA_ENTRY32(j, a0, a1, a2, a3);
                    FMA_ENTRY32(j + 1, b0, b1, b2, b3);
                }
                if (last) {
                    float *da = dst + perm[r] * 32, *db = dst + perm[r + 1] * 32;
                    finish(a0, a1, da, act), finish(a2, a3, da + 16, act);
                    finish(b0, b1, db, act), finish(b2, b3, db + 16, act);
                } else {
                    _mm256_storeu_ps(pa, a0), _mm256_storeu_ps(pa + 8, a1);
                    _mm256_storeu_ps(pa + 16, a2), _mm256_storeu_ps(pa + 24, a3);
                    _mm256_storeu_ps(pb, b0), _mm256_storeu_ps(pb + 8, b1);
                    _mm256_storeu_ps(pb + 16, b2), _mm256_storeu_ps(pb + 24, b3);
                }
            }
        }
    }
}

static void run_tile(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_groups,
                     const uint16_t *idx, const float *val, const uint64_t *perm, const float *bias,
                     int act, float *dst, float *part, int64_t lanes) {
    if (lanes == 32)
        tile32(buf, ptr, n_panels, n_groups, idx, val, perm, bias, act, dst, part);
    else
        tile(buf, ptr, n_panels, n_groups, idx, val, perm, bias, act, dst, part);
}

static float *scratch(int64_t floats) {
    /* 64-byte aligned, rounded up to whole lines (aligned_alloc wants a multiple). */
    int64_t bytes = ((floats * 4 + 63) / 64) * 64;
    return (float *)aligned_alloc(64, bytes > 0 ? bytes : 64);
}

/* out = act(x @ W.T + b); x: (n_tok, n_in), out: (n_tok, n_out), both row-major float32.
 * Work: contiguous runs of `lanes`-token tiles (16 or 32) per thread. Returns 0, or -1 if
 * out of memory. */
int sb_spmm(const float *x, int64_t n_tok, int64_t n_in, const uint64_t *ptr, int64_t n_panels,
            int64_t n_groups, const uint16_t *idx, const float *val, const uint64_t *perm,
            const float *bias, int act, float *out, int64_t n_out, int threads, int64_t lanes) {
    if (lanes != 16 && lanes != 32) return -2;
    const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
    const int workers = (int)(threads < n_tiles ? threads : n_tiles);
    int failed = 0;
#pragma omp parallel num_threads(workers > 0 ? workers : 1) reduction(| : failed)
    {
        const int w = omp_get_thread_num(), nw = omp_get_num_threads();
        float *buf = scratch(n_in * lanes), *obuf = scratch(n_out * lanes);
        float *part = scratch(GROUP * n_groups * lanes);
        if (!buf || !obuf || !part) {
            failed = 1;
        } else {
            for (int64_t t = w * n_tiles / nw; t < (w + 1) * n_tiles / nw; t++) {
                const int64_t t0 = t * lanes, nt = n_tok - t0 < lanes ? n_tok - t0 : lanes;
                pack(x, n_in, t0, nt, buf, lanes);
                run_tile(buf, ptr, n_panels, n_groups, idx, val, perm, bias, act, obuf, part, lanes);
                unpack(obuf, n_out, out, t0, nt, lanes);
            }
        }
        free(buf), free(obuf), free(part);
    }
    return failed ? -1 : 0;
}

/* Feed-forward block out = W2 gelu(W1 x + b1) + b2, tile by tile: the hidden activations of
 * a tile go from W1's epilogue straight into W2's token buffer and never reach memory. */
int sb_ffn(const float *x, int64_t n_tok, int64_t n_in,
           const uint64_t *ptr1, int64_t n_panels1, int64_t n_groups1, const uint16_t *idx1,
           const float *val1, const uint64_t *perm1, const float *bias1, int64_t n_hidden,
           const uint64_t *ptr2, int64_t n_panels2, int64_t n_groups2, const uint16_t *idx2,
           const float *val2, const uint64_t *perm2, const float *bias2,
           float *out, int64_t n_out, int threads, int64_t lanes) {
    if (lanes != 16 && lanes != 32) return -2;
    const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
    const int workers = (int)(threads < n_tiles ? threads : n_tiles);
    int failed = 0;
#pragma omp parallel num_threads(workers > 0 ? workers : 1) reduction(| : failed)
    {
        const int w = omp_get_thread_num(), nw = omp_get_num_threads();
        float *buf = scratch(n_in * lanes), *hidden = scratch(n_hidden * lanes);
        float *part1 = scratch(GROUP * n_groups1 * lanes), *part2 = scratch(GROUP * n_groups2 * lanes);
        float *obuf = scratch(n_out * lanes);
        if (!buf || !hidden || !part1 || !part2 || !obuf) {
            failed = 1;
        } else {
            for (int64_t t = w * n_tiles / nw; t < (w + 1) * n_tiles / nw; t++) {
                const int64_t t0 = t * lanes, nt = n_tok - t0 < lanes ? n_tok - t0 : lanes;
                pack(x, n_in, t0, nt, buf, lanes);
                run_tile(buf, ptr1, n_panels1, n_groups1, idx1, val1, perm1, bias1, 1, hidden, part1, lanes);
                run_tile(hidden, ptr2, n_panels2, n_groups2, idx2, val2, perm2, bias2, 0, obuf, part2, lanes);
                unpack(obuf, n_out, out, t0, nt, lanes);
            }
        }
        free(buf), free(hidden), free(part1), free(part2), free(obuf);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------
 * Attention for encoders on the CPU: out = softmax(scale * q k^T + bias) v, per (batch, head).
 *
 * Why: torch's CPU flash attention spends ~10 ms per MiniLM layer at batch 16 x 128 (head
 * width 32), as much as the 90%-sparse linears of the layer. For such short sequences the
 * whole score matrix of one head (128 x 128) fits in L1/L2, so a plain two-pass kernel
 * (scores, softmax, weighted sum) with register blocking does better than tiling for long
 * sequences. q, k, v: (B, H, S, D) with any strides but a contiguous last dimension (the
 * transposed views of the projections); out: (B, S, H, D) contiguous, what the model
 * reshapes next. bias: additive (0 / -inf or any float), indexed [b][i][j] with strides
 * (bias_b, bias_i) and j contiguous; NULL for none. D must be a multiple of 8, at most 256.
 * --------------------------------------------------------------------------------------- */

static inline __m256 exp8(__m256 x) {
    /* Cephes-style expf: 2^n * p(r), r = x - n ln2, |error| ~ 2 ulp on the clamped range. */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* p[j] = exp(p[j] - max) / sum over the row (n_k a multiple of 8); a row masked everywhere
 * (max = -inf) becomes all zeros. */
static void softmax_row(float *p, int64_t n_k) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n_k; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + j));
    const float mx = hmax8(m);
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < n_k; j++) p[j] = 0.0f;
        return;
    }
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_k; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
        _mm256_storeu_ps(p + j, e);
        s = _mm256_add_ps(s, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(s));
    for (int64_t j = 0; j < n_k; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), inv));
}

/* out0 = p0 @ v, out1 = p1 @ v over S_k keys (nd vectors of 8 per row); inlined with a
 * constant nd the accumulators live in registers. out1 may alias out0 (same row twice). */
static inline __attribute__((always_inline)) void pv_rows(const float *p0, const float *p1, const float *vb,
                                                          int64_t vs, int64_t S_k, float *out0, float *out1,
                                                          const int64_t nd) {
    __m256 o0[32], o1[32];
    for (int64_t c = 0; c < nd; c++) o0[c] = o1[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < S_k; j++) {
        const float *vr = vb + j * vs;
        const __m256 w0 = _mm256_broadcast_ss(p0 + j), w1 = _mm256_broadcast_ss(p1 + j);
        for (int64_t c = 0; c < nd; c++) {
            const __m256 vv = _mm256_loadu_ps(vr + 8 * c);
            o0[c] = _mm256_fmadd_ps(w0, vv, o0[c]);
            o1[c] = _mm256_fmadd_ps(w1, vv, o1[c]);
        }
    }
    for (int64_t c = 0; c < nd; c++) _mm256_storeu_ps(out1 + 8 * c, o1[c]);
    for (int64_t c = 0; c < nd; c++) _mm256_storeu_ps(out0 + 8 * c, o0[c]);
}

int sb_attention(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t S,
                 int64_t S_k, int64_t D, const int64_t *q_strides, const int64_t *k_strides,
                 const int64_t *v_strides, const float *bias, int64_t bias_b, int64_t bias_i,
                 float scale, float *out, int threads) {
    if (D % 8 != 0 || D > 256) return -2;
    const int64_t Sk8 = (S_k + 7) / 8 * 8; /* keys padded to whole vectors (-inf scores) */
    const int64_t nd = D / 8;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        float *kt = scratch(D * Sk8);        /* k transposed: kt[d][j] */
        float *pr = scratch(4 * Sk8);        /* scores / probabilities of 4 query rows */
        float *ql = scratch(S * D);          /* this head's q and v rows, contiguous: the */
        float *vl = scratch(S_k * D);        /* model's rows are 3 x hidden floats apart */
        if (!kt || !pr || !ql || !vl) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; bh++) {
                const int64_t b = bh / H, h = bh % H;
                const float *qs = q + b * q_strides[0] + h * q_strides[1];
                const float *kb = k + b * k_strides[0] + h * k_strides[1];
                const float *vs = v + b * v_strides[0] + h * v_strides[1];
                for (int64_t i = 0; i < S; i++)
                    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(ql + i * D + c, _mm256_loadu_ps(qs + i * q_strides[2] + c));
                for (int64_t j = 0; j < S_k; j++)
                    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(vl + j * D + c, _mm256_loadu_ps(vs + j * v_strides[2] + c));
                const float *qb = ql, *vb = vl;
                int64_t j0 = 0;
                for (; j0 + 8 <= S_k; j0 += 8)
                    for (int64_t d0 = 0; d0 < D; d0 += 8) {
                        __m256 r[8];
                        for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(kb + (j0 + i) * k_strides[2] + d0);
                        transpose8(r);
                        for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (d0 + i) * Sk8 + j0, r[i]);
                    }
                for (int64_t j = j0; j < Sk8; j++)
                    for (int64_t d = 0; d < D; d++) kt[d * Sk8 + j] = j < S_k ? kb[j * k_strides[2] + d] : 0.0f;
                for (int64_t i0 = 0; i0 < S; i0 += 4) {
                    const int64_t nr = S - i0 < 4 ? S - i0 : 4;
                    /* scores for rows i0..i0+nr-1: 4 rows x 16 keys per pass (8 FMA chains) */
                    const float *qr[4];
                    for (int r = 0; r < 4; r++) qr[r] = qb + (i0 + (r < nr ? r : 0)) * D;
                    for (int64_t j = 0; j < Sk8; j += 16) {
                        const int pair = j + 16 <= Sk8;
                        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                        __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
                        for (int64_t d = 0; d < D; d++) {
                            const float *kd = kt + d * Sk8 + j;
                            const __m256 k0 = _mm256_loadu_ps(kd);
                            const __m256 k1 = pair ? _mm256_loadu_ps(kd + 8) : k0;
                            __m256 qv = _mm256_broadcast_ss(qr[0] + d);
                            a0 = _mm256_fmadd_ps(qv, k0, a0), c0 = _mm256_fmadd_ps(qv, k1, c0);
                            qv = _mm256_broadcast_ss(qr[1] + d);
                            a1 = _mm256_fmadd_ps(qv, k0, a1), c1 = _mm256_fmadd_ps(qv, k1, c1);
                            qv = _mm256_broadcast_ss(qr[2] + d);
                            a2 = _mm256_fmadd_ps(qv, k0, a2), c2 = _mm256_fmadd_ps(qv, k1, c2);
                            qv = _mm256_broadcast_ss(qr[3] + d);
                            a3 = _mm256_fmadd_ps(qv, k0, a3), c3 = _mm256_fmadd_ps(qv, k1, c3);
                        }
                        const __m256 a[4] = {a0, a1, a2, a3}, c[4] = {c0, c1, c2, c3};
                        for (int r = 0; r < nr; r++)
                            for (int half = 0; half < 1 + pair; half++) {
                                const int64_t jj = j + 8 * half;
                                __m256 sv = _mm256_mul_ps(half ? c[r] : a[r], _mm256_set1_ps(scale));
                                if (jj + 8 <= S_k) {
                                    if (bias)
                                        sv = _mm256_add_ps(sv, _mm256_loadu_ps(bias + b * bias_b + (i0 + r) * bias_i + jj));
                                } else {
                                    const float *brow = bias ? bias + b * bias_b + (i0 + r) * bias_i : NULL;
                                    float tmp[8];
                                    for (int t = 0; t < 8; t++)
                                        tmp[t] = jj + t < S_k ? (brow ? brow[jj + t] : 0.0f) : -INFINITY;
                                    sv = _mm256_add_ps(sv, _mm256_loadu_ps(tmp));
                                }
                                _mm256_storeu_ps(pr + r * Sk8 + jj, sv);
                            }
                    }
                    for (int r = 0; r < nr; r++) softmax_row(pr + r * Sk8, Sk8);
                    /* out rows = p @ v, 2 rows x D at a time */
                    for (int r = 0; r < nr; r += 2) {
                        const int two = r + 1 < nr;
                        float *out0 = out + ((b * S + i0 + r) * H + h) * D;
                        float *out1 = two ? out + ((b * S + i0 + r + 1) * H + h) * D : out0;
                        const float *p0 = pr + r * Sk8, *p1 = two ? pr + (r + 1) * Sk8 : p0;
                        switch (nd) {
                            case 4: pv_rows(p0, p1, vb, D, S_k, out0, out1, 4); break;
                            case 8: pv_rows(p0, p1, vb, D, S_k, out0, out1, 8); break;
                            default: pv_rows(p0, p1, vb, D, S_k, out0, out1, nd); break;
                        }
                    }
                }
            }
        }
        free(kt), free(pr), free(ql), free(vl);
    }
    return failed ? -1 : 0;
}

/* out = LayerNorm(x + residual) * gamma + beta, row by row (rows of n_cols floats). The
 * transformer block's "add & norm" in one pass over memory instead of two torch ops. */
int sb_add_layernorm(const float *x, const float *residual, const float *gamma, const float *beta,
                     float eps, float *out, int64_t n_rows, int64_t n_cols, int threads) {
    const int64_t nv = n_cols / 8 * 8;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n_cols, *rr = residual + r * n_cols;
        float *o = out + r * n_cols;
        __m256 s = _mm256_setzero_ps();
        float tail = 0.0f;
        for (int64_t c = 0; c < nv; c += 8) {
            const __m256 v = _mm256_add_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(rr + c));
            _mm256_storeu_ps(o + c, v);
            s = _mm256_add_ps(s, v);
        }
        for (int64_t c = nv; c < n_cols; c++) tail += (o[c] = xr[c] + rr[c]);
        const float mean = (hsum8(s) + tail) / (float)n_cols;
        const __m256 mv = _mm256_set1_ps(mean);
        __m256 q = _mm256_setzero_ps();
        tail = 0.0f;
        for (int64_t c = 0; c < nv; c += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(o + c), mv);
            q = _mm256_fmadd_ps(d, d, q);
        }
        for (int64_t c = nv; c < n_cols; c++) tail += (o[c] - mean) * (o[c] - mean);
        const float inv = 1.0f / sqrtf((hsum8(q) + tail) / (float)n_cols + eps);
        const __m256 iv = _mm256_set1_ps(inv);
        for (int64_t c = 0; c < nv; c += 8) {
            const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(o + c), mv), iv);
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(n, _mm256_loadu_ps(gamma + c), _mm256_loadu_ps(beta + c)));
        }
        for (int64_t c = nv; c < n_cols; c++) o[c] = (o[c] - mean) * inv * gamma[c] + beta[c];
    }
    return 0;
}
