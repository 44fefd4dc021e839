/* Sparse weight x dense activations, AVX2 + FMA: the native twin of kernels.spmm / spmm_ffn.
 *
 * Weight layout: sparse_format.RowPanels. Input features are cut into panels (a panel's
 * slice of the token buffer fits in L1); within a panel every output row is a run of
 * (uint16 index, fp32 value) entries, rows in natural order, no padding.
 *
 * Algorithm: a tile of 16 or 32 tokens is transposed into buf[feature][lane] (8x8 register
 * transposes); then, panel by panel, every output row accumulates w * buf[k] over its
 * entries of the panel, starting from its bias (partial sums kept per row between panels),
 * and the last panel's epilogue applies the activation and writes the row to the tile's
 * output, which is transposed back.
 *
 * Why this inner loop: per weight it needs lanes/8 loads of buf[k] feeding as many FMAs;
 * everything else competes with them for the core's two 256-bit load ports. So the entries
 * are read four at a time, one 64-bit load for four indices and one 128-bit broadcast load
 * for four weights, each weight spread over a register by an in-register permute: 4.5
 * loads per 4 FMAs at 32 lanes instead of 6 with a scalar index load and a broadcast load
 * per weight (~1.2x on Zen 3). Rows are not grouped, so no row is padded to a neighbour's
 * length (grouping 4 rows padded the stored entries by ~18% at 90% sparsity); the chains
 * that hide the FMA latency (8 independent accumulators) come from splitting each row's
 * entries between two (32 lanes) or four (16 lanes) accumulator sets.
 *
 * Threads: OpenMP, which resolves to the libgomp torch has loaded, so torch and these
 * kernels share one thread pool. Built on first use by sparsebert.runtime.native
 * (cc -O3 -mavx2 -mfma -fopenmp).
 *
 * Shared with kernels_avx512.c: kernels_common.h (headers, the 8x8 transpose, scratch) and
 * kernels_drivers.h (the tile loops behind the exported sparse products and the add & norm,
 * fp32 and INT8); this file keeps what is AVX2: tile transposes, the rows of a matrix over a
 * tile, GELU, attention, the LayerNorm of a row, the INT8 primitives.
 */
#include "kernels_common.h"

/* buf[k][lane] = x[t0 + lane][k] for a tile of `lanes` (16 or 32) tokens; lanes past the
 * last token are zero. Full tiles go 8 tokens x 16 features at a time: two 8x8 register
 * transposes that read each token's 64-byte line whole. */
static void pack(const float *x, int64_t n_in, int64_t t0, int64_t nt, float *buf, int64_t lanes) {
    int64_t k0 = 0;
    if (nt == lanes) {
        for (int64_t h = 0; h < lanes; h += 8) {
            for (k0 = 0; k0 + 16 <= n_in; k0 += 16) {
                __m256 r[8], s[8];
                for (int i = 0; i < 8; i++) {
                    const float *row = x + (t0 + h + i) * n_in + k0;
                    r[i] = _mm256_loadu_ps(row);
                    s[i] = _mm256_loadu_ps(row + 8);
                }
                transpose8(r);
                transpose8(s);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(buf + (k0 + i) * lanes + h, r[i]);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(buf + (k0 + 8 + i) * lanes + h, s[i]);
            }
            for (; k0 + 8 <= n_in; k0 += 8) {
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

/* out[t0 + lane][o] = obuf[o][lane] for the tile's real tokens. Full tiles go 8 tokens x 16
 * outputs at a time, so each token's 64-byte line is written whole (3-9% of a Q/K/V product
 * at 90% sparsity over writing half lines, whose owners the cache fetches twice). */
static void unpack(const float *obuf, int64_t n_out, float *out, int64_t t0, int64_t nt, int64_t lanes) {
    int64_t o0 = 0;
    if (nt == lanes) {
        for (int64_t h = 0; h < lanes; h += 8) {
            for (o0 = 0; o0 + 16 <= n_out; o0 += 16) {
                __m256 r[8], s[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(obuf + (o0 + i) * lanes + h);
                for (int i = 0; i < 8; i++) s[i] = _mm256_loadu_ps(obuf + (o0 + 8 + i) * lanes + h);
                transpose8(r);
                transpose8(s);
                for (int i = 0; i < 8; i++) {
                    float *row = out + (t0 + h + i) * n_out + o0;
                    _mm256_storeu_ps(row, r[i]);
                    _mm256_storeu_ps(row + 8, s[i]);
                }
            }
            for (; o0 + 8 <= n_out; o0 += 8) {
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
    /* p / q as p * (1/q): a reciprocal estimate refined by one Newton step (relative error
     * ~1e-7) costs three cheap ops instead of a division, which issues only every few
     * cycles and made up a noticeable part of the feed-forward block's epilogue. */
    const __m256 r0 = _mm256_rcp_ps(q);
    const __m256 r1 = _mm256_mul_ps(r0, _mm256_fnmadd_ps(q, r0, _mm256_set1_ps(2.0f)));
    const __m256 erf = _mm256_mul_ps(p, r1);
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

/* Four entries at once: their uint16 indices in one 64-bit load (x86 is little-endian:
 * slot s is bits 16s..16s+15; OFFSET scales it to a float offset into buf), their weights
 * in one 128-bit load broadcast to both halves of a register (a permute picks one). */
#define ENTRY_BLOCK(J, Q, W4)                                             \
    uint64_t Q;                                                           \
    memcpy(&Q, idx + (J), 8);                                             \
    const __m256 W4 = _mm256_broadcast_ps((const __m128 *)(val + (J)))
#define OFFSET(Q, SLOT, LANES_) ((int64_t)(((Q) >> (16 * (SLOT))) & 0xffff) * (LANES_))

#define FMA2(XK, W, A0, A1)                                               \
    A0 = _mm256_fmadd_ps(W, _mm256_loadu_ps(XK), A0);                     \
    A1 = _mm256_fmadd_ps(W, _mm256_loadu_ps((XK) + 8), A1)
#define FMA4(XK, W, A0, A1, A2, A3)                                       \
    FMA2(XK, W, A0, A1);                                                  \
    A2 = _mm256_fmadd_ps(W, _mm256_loadu_ps((XK) + 16), A2);              \
    A3 = _mm256_fmadd_ps(W, _mm256_loadu_ps((XK) + 24), A3)

/* Every output row of the 16-token tile in buf:
 * dst[r][lane] = act(sum_k W[r][k] buf[k][lane] + b[r]); part holds partial sums between
 * panels. Entry 4i+s of a row goes to accumulator set s (4 sets x 2 registers = 8 chains). */
static void rows16(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,
                   const uint16_t *idx, const float *val, const float *bias, int act, float *dst,
                   float *part) {
    for (int64_t p = 0; p < n_panels; p++) {
        const uint64_t *pp = ptr + p * (n_rows + 1);
        const int last = p == n_panels - 1;
        for (int64_t r = 0; r < n_rows; r++) {
            float *pr = part + r * 16;
            __m256 a0, a1, b0, b1, c0, c1, d0, d1;
            b0 = b1 = c0 = c1 = d0 = d1 = _mm256_setzero_ps();
            if (p == 0) {
                a0 = a1 = _mm256_set1_ps(bias[r]);
            } else {
                a0 = _mm256_loadu_ps(pr), a1 = _mm256_loadu_ps(pr + 8);
            }
            uint64_t j = pp[r];
            const uint64_t end = pp[r + 1];
            for (; j + 4 <= end; j += 4) {
                ENTRY_BLOCK(j, q, w4);
                FMA2(buf + OFFSET(q, 0, 16), _mm256_permute_ps(w4, 0x00), a0, a1);
                FMA2(buf + OFFSET(q, 1, 16), _mm256_permute_ps(w4, 0x55), b0, b1);
                FMA2(buf + OFFSET(q, 2, 16), _mm256_permute_ps(w4, 0xAA), c0, c1);
                FMA2(buf + OFFSET(q, 3, 16), _mm256_permute_ps(w4, 0xFF), d0, d1);
            }
            for (; j < end; j++) {
                const __m256 w = _mm256_broadcast_ss(val + j);
                FMA2(buf + (int64_t)idx[j] * 16, w, a0, a1);
            }
            a0 = _mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(c0, d0));
            a1 = _mm256_add_ps(_mm256_add_ps(a1, b1), _mm256_add_ps(c1, d1));
            if (last)
                finish(a0, a1, dst + r * 16, act);
            else
                _mm256_storeu_ps(pr, a0), _mm256_storeu_ps(pr + 8, a1);
        }
    }
}

/* `rows16` for 32-token tiles: a row takes 4 registers, entries alternate between two
 * accumulator sets (8 chains), and every index and weight feeds 4 FMAs. */
static void rows32(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,
                   const uint16_t *idx, const float *val, const float *bias, int act, float *dst,
                   float *part) {
    for (int64_t p = 0; p < n_panels; p++) {
        const uint64_t *pp = ptr + p * (n_rows + 1);
        const int last = p == n_panels - 1;
        for (int64_t r = 0; r < n_rows; r++) {
            float *pr = part + r * 32;
            __m256 a0, a1, a2, a3, b0, b1, b2, b3;
            b0 = b1 = b2 = b3 = _mm256_setzero_ps();
            if (p == 0) {
                a0 = a1 = a2 = a3 = _mm256_set1_ps(bias[r]);
            } else {
                a0 = _mm256_loadu_ps(pr), a1 = _mm256_loadu_ps(pr + 8);
                a2 = _mm256_loadu_ps(pr + 16), a3 = _mm256_loadu_ps(pr + 24);
            }
            uint64_t j = pp[r];
            const uint64_t end = pp[r + 1];
            for (; j + 4 <= end; j += 4) {
                ENTRY_BLOCK(j, q, w4);
                FMA4(buf + OFFSET(q, 0, 32), _mm256_permute_ps(w4, 0x00), a0, a1, a2, a3);
                FMA4(buf + OFFSET(q, 1, 32), _mm256_permute_ps(w4, 0x55), b0, b1, b2, b3);
                FMA4(buf + OFFSET(q, 2, 32), _mm256_permute_ps(w4, 0xAA), a0, a1, a2, a3);
                FMA4(buf + OFFSET(q, 3, 32), _mm256_permute_ps(w4, 0xFF), b0, b1, b2, b3);
            }
            for (; j < end; j++) {
                const __m256 w = _mm256_broadcast_ss(val + j);
                FMA4(buf + (int64_t)idx[j] * 32, w, a0, a1, a2, a3);
            }
            a0 = _mm256_add_ps(a0, b0), a1 = _mm256_add_ps(a1, b1);
            a2 = _mm256_add_ps(a2, b2), a3 = _mm256_add_ps(a3, b3);
            if (last) {
                finish(a0, a1, dst + r * 32, act), finish(a2, a3, dst + r * 32 + 16, act);
            } else {
                _mm256_storeu_ps(pr, a0), _mm256_storeu_ps(pr + 8, a1);
                _mm256_storeu_ps(pr + 16, a2), _mm256_storeu_ps(pr + 24, a3);
            }
        }
    }
}

static void run_rows(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,
                     const uint16_t *idx, const float *val, const float *bias, int act, float *dst,
                     float *part, int64_t lanes) {
    if (lanes == 32)
        rows32(buf, ptr, n_panels, n_rows, idx, val, bias, act, dst, part);
    else
        rows16(buf, ptr, n_panels, n_rows, idx, val, bias, act, dst, part);
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
    /* exp for the softmax's x <= 0 (scores minus their maximum): 2^t with t = x log2(e),
     * split into n = round(t) and f = t - n in [-0.5, 0.5]; 2^f by a degree-5 polynomial
     * (least-squares fit for relative error, <= 2.2e-7 in float32), 2^n added into the
     * exponent bits. t is clamped at -125, so the result stays a normal float (~2e-38 for
     * masked keys, as good as zero next to the row's largest term, 1). 12 vector ops where
     * a general expf with two-step range reduction takes 18. */
    const __m256 t = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(-125.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.3266970636323094e-3f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.675459936261177e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550742521882057e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022121727466583e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931469440460205e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001192092896f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
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

/* Scores of R query rows (R <= 6) against 8 * NK keys (NK = 1 or 2) starting at key j:
 * pr[r][j..] = q[r] . k[j..] over D, with kt = k transposed (kt[d][j], row length Sk8).
 * R = 6, NK = 2 is the 6 x 16 register block of AVX2 GEMM kernels: 12 accumulators, and per
 * d two key loads and six query broadcasts feed 12 FMAs (FMA-bound, not load-bound).
 * Written as a macro so that every specialisation declares its accumulator array with its
 * exact size in its own small function: GCC then keeps the array in registers (a larger,
 * partly used array, or one shared specialised switch, made it store every accumulator to
 * the stack on every iteration: 3x slower). */
#define QK_BLOCK(R, NK)                                                                  \
    do {                                                                                 \
        __m256 acc[R][NK];                                                               \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                                      \
            _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) acc[r][c] = _mm256_setzero_ps();                \
        for (int64_t d = 0; d < D; d++) {                                                \
            const float *kd = kt + d * Sk8 + j;                                          \
            __m256 kv[NK];                                                               \
            _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) kv[c] = _mm256_loadu_ps(kd + 8 * c);            \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                                \
                const __m256 qv = _mm256_broadcast_ss(q + r * qs + d);                   \
                _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) acc[r][c] = _mm256_fmadd_ps(qv, kv[c], acc[r][c]); \
            }                                                                            \
        }                                                                                \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                                      \
            _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) _mm256_storeu_ps(pr + r * Sk8 + j + 8 * c, acc[r][c]); \
    } while (0)

/* All scores of R query rows: 16-key blocks, then one 8-key block if Sk8 is odd in 8s. */
#define DEF_QK(R)                                                                        \
    static void qk_##R(const float *q, int64_t qs, int64_t D, const float *kt, int64_t Sk8, float *pr) { \
        int64_t j = 0;                                                                   \
        for (; j + 16 <= Sk8; j += 16) QK_BLOCK(R, 2);                                   \
        if (j < Sk8) QK_BLOCK(R, 1);                                                     \
    }
DEF_QK(1)
DEF_QK(2)
DEF_QK(3)
DEF_QK(4)
DEF_QK(5)
DEF_QK(6)
typedef void (*qk_fn)(const float *, int64_t, int64_t, const float *, int64_t, float *);
static const qk_fn QK_ROWS[7] = {NULL, qk_1, qk_2, qk_3, qk_4, qk_5, qk_6};

/* p[j] = exp(scale p[j] + bias[j] - max) over the row's Sk8 (a multiple of 8) scores, keys from
 * n_k on masked; returns 1 / sum, or 0 for a row masked everywhere (it becomes all zeros).
 * The division is left to the caller: it scales D outputs instead of Sk8 probabilities. */
static float softmax_row(float *p, const float *bias, float scale, int64_t n_k, int64_t Sk8) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    const __m256 sc = _mm256_set1_ps(scale);
    const int64_t full = n_k / 8 * 8;
    for (int64_t j = 0; j < full; j += 8) {
        const __m256 sv = bias ? _mm256_fmadd_ps(_mm256_loadu_ps(p + j), sc, _mm256_loadu_ps(bias + j))
                               : _mm256_mul_ps(_mm256_loadu_ps(p + j), sc);
        _mm256_storeu_ps(p + j, sv);
        m = _mm256_max_ps(m, sv);
    }
    if (full < Sk8) { /* the last, partial vector of keys: -inf past n_k */
        float tmp[8];
        for (int t = 0; t < 8; t++)
            tmp[t] = full + t < n_k ? scale * p[full + t] + (bias ? bias[full + t] : 0.0f) : -INFINITY;
        const __m256 sv = _mm256_loadu_ps(tmp);
        _mm256_storeu_ps(p + full, sv);
        m = _mm256_max_ps(m, sv);
    }
    const float mx = hmax8(m);
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < Sk8; j++) p[j] = 0.0f;
        return 0.0f;
    }
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t j = 0;
    for (; j + 16 <= Sk8; j += 16) {
        const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
        const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j + 8), mv));
        _mm256_storeu_ps(p + j, e0), _mm256_storeu_ps(p + j + 8, e1);
        s0 = _mm256_add_ps(s0, e0), s1 = _mm256_add_ps(s1, e1);
    }
    if (j < Sk8) {
        const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
        _mm256_storeu_ps(p + j, e0);
        s0 = _mm256_add_ps(s0, e0);
    }
    return 1.0f / hsum8(_mm256_add_ps(s0, s1));
}

/* out[r] = inv[r] * (p[r] @ v) for R rows (row stride ps) over S_k keys, ND vectors of 8
 * per output row: R * ND <= 12 accumulators in registers, each loaded vector of v feeds R
 * FMAs. A macro for the reason given at QK_BLOCK. */
#define PV_BLOCK(R, ND)                                                                  \
    do {                                                                                 \
        __m256 acc[R][ND];                                                               \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                                      \
            _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) acc[r][c] = _mm256_setzero_ps();                \
        for (int64_t j = 0; j < S_k; j++) {                                              \
            const float *vr = vb + j * 8 * ND;                                           \
            __m256 w[R];                                                                 \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) w[r] = _mm256_broadcast_ss(p + r * ps + j);      \
            _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) {                                               \
                const __m256 vv = _mm256_loadu_ps(vr + 8 * c);                           \
                _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(w[r], vv, acc[r][c]); \
            }                                                                            \
        }                                                                                \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                                    \
            const __m256 iv = _mm256_set1_ps(inv[r]);                                    \
            _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) _mm256_storeu_ps(outs[r] + 8 * c, _mm256_mul_ps(acc[r][c], iv)); \
        }                                                                                \
    } while (0)

/* Any head width (nd <= 32 vectors), one row at a time: the fallback for uncommon widths. */
static void pv_row_any(const float *p, const float *vb, int64_t S_k, int64_t nd, float *out, float inv) {
    __m256 acc[32];
    for (int64_t c = 0; c < nd; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < S_k; j++) {
        const __m256 w = _mm256_broadcast_ss(p + j);
        for (int64_t c = 0; c < nd; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vb + j * 8 * nd + 8 * c), acc[c]);
    }
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t c = 0; c < nd; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], iv));
}

/* Rows per PV block for a head width: as many as keep R * nd <= 12 (at most 6). */
static int pv_rows_for(int64_t nd) { return nd > 12 ? 1 : (int)(12 / nd > 6 ? 6 : 12 / nd); }

typedef void (*pv_fn)(const float *, int64_t, const float *, int64_t, float *const *, const float *);
/* Specialisations: a block of pv_rows_for(ND) = R rows, and a single row. */
#define DEF_PV(ND, R)                                                                                  \
    static void pv_block_##ND(const float *p, int64_t ps, const float *vb, int64_t S_k, float *const *outs, \
                              const float *inv) { PV_BLOCK(R, ND); }                                   \
    static void pv_one_##ND(const float *p, int64_t ps, const float *vb, int64_t S_k, float *const *outs,   \
                            const float *inv) { PV_BLOCK(1, ND); }
DEF_PV(1, 6)
DEF_PV(2, 6)
DEF_PV(3, 4)
DEF_PV(4, 3)
DEF_PV(6, 2)
DEF_PV(8, 1)
DEF_PV(12, 1)

/* R rows of out = inv * (p @ v): R = pv_rows_for(nd) or 1. */
static void pv_any(const float *p, int64_t ps, const float *vb, int64_t S_k, int64_t nd,
                   float *const *outs, const float *inv, int R) {
    pv_fn block = NULL, one = NULL;
    switch (nd) {
        case 1: block = pv_block_1, one = pv_one_1; break;
        case 2: block = pv_block_2, one = pv_one_2; break;
        case 3: block = pv_block_3, one = pv_one_3; break;
        case 4: block = pv_block_4, one = pv_one_4; break;
        case 6: block = pv_block_6, one = pv_one_6; break;
        case 8: block = pv_block_8, one = pv_one_8; break;
        case 12: block = pv_block_12, one = pv_one_12; break;
        default: break;
    }
    if (block && R == pv_rows_for(nd)) {
        block(p, ps, vb, S_k, outs, inv);
        return;
    }
    for (int r = 0; r < R; r++) {
        if (one)
            one(p + r * ps, ps, vb, S_k, outs + r, inv + r);
        else
            pv_row_any(p + r * ps, vb, S_k, nd, outs[r], inv[r]);
    }
}

#define QROWS 6 /* query rows per score block */


/* o = LayerNorm(x + r) * gamma + beta for one row of n_cols floats; o may be x. */
static void add_norm_row(const float *xr, const float *rr, const float *gamma, const float *beta,
                         float eps, float *o, int64_t n_cols) {
    const int64_t nv = n_cols / 8 * 8;
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

/* ---------------------------------------------------------------------------------------
 * Sparse INT8, AVX2 primitives of kernels_drivers.h (see the INT8 section of kernels_avx512.c
 * for the scheme): 32-token tiles, buf[k][32] int8 = q (signed: no +128 offset here, comp is
 * not used), one dword lane per token holding the 4 features of a weight group, built by 8
 * in-lane unpacks per group. AVX2 has no VPDPBUSD, and VPMADDUBSW (unsigned x signed byte
 * pairs summed to int16, saturating) would saturate on 255 * 127 * 2; but with |w| as the
 * unsigned operand and sign(w) moved onto the activations (VPSIGNB), both operands are at
 * most 127 and a pair sum at most 32258: exact. Per 8 tokens: VPSIGNB, VPMADDUBSW, VPMADDWD
 * (pairs to dwords), VPADDD.
 * --------------------------------------------------------------------------------------- */

#define I8_LANES 32
#define I8_ROW_BYTES 32 /* buffer bytes per feature */

/* GELU for the INT8 path (see gelu16_q in kernels_avx512.c): within 5e-5 of the exact one. */
static inline __m256 gelu8_q(__m256 x) {
    const __m256 u = _mm256_min_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(4.5f));
    const __m256 t = _mm256_fmsub_ps(u, _mm256_set1_ps(1.0f / 2.25f), _mm256_set1_ps(1.0f));
    __m256 p = _mm256_set1_ps(4.582455031e-02f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-2.111288274e-02f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.839377807e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.750285817e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.110028976e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-4.339797495e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.009967425e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.470374063e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-2.463748948e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.330496986e-01f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-2.750082308e-02f));
    return _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), p);
}


static void i8_prepare(const float *fbuf, int64_t n, uint8_t *buf, float *xscale) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m[4], inv[4], nan[4];
    for (int c = 0; c < 4; c++) m[c] = nan[c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++)
        for (int c = 0; c < 4; c++) {
            const __m256 v = _mm256_loadu_ps(fbuf + k * 32 + 8 * c);
            m[c] = _mm256_max_ps(m[c], _mm256_andnot_ps(sign, v));
            nan[c] = _mm256_or_ps(nan[c], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
    for (int c = 0; c < 4; c++) {
        const __m256 nz = _mm256_cmp_ps(m[c], _mm256_setzero_ps(), _CMP_GT_OQ);
        inv[c] = _mm256_and_ps(nz, _mm256_div_ps(_mm256_set1_ps(127.0f), m[c]));
        /* a token with a NaN gets a NaN scale, so its outputs are NaN (as in fp32) */
        const __m256 xs = _mm256_mul_ps(m[c], _mm256_set1_ps(1.0f / 127.0f));
        _mm256_storeu_ps(xscale + 8 * c, _mm256_blendv_ps(xs, _mm256_set1_ps(NAN), nan[c]));
    }
    /* the saturating packs leave token 8j + 4L + i at position 16L + 4j + i, the order the
     * unpacks of i8_rows undo */
    for (int64_t k = 0; k < n; k++) {
        __m256i q[4];
        for (int c = 0; c < 4; c++)
            q[c] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(fbuf + k * 32 + 8 * c), inv[c]));
        const __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
        _mm256_storeu_si256((__m256i *)(buf + k * 32), _mm256_packs_epi16(p01, p23));
    }
}

static void i8_rows(const uint8_t *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,
                    const uint16_t *idx, const int8_t *val, const int32_t *comp, const float *wscale,
                    const float *bias, int act, const float *xscale, float *dst, int32_t *part) {
    const char *bb = (const char *)buf;
    const __m256i ones = _mm256_set1_epi16(1);
    (void)comp; /* signed activations: no offset to take back */
    for (int64_t p = 0; p < n_panels; p++) {
        const uint64_t *pp = ptr + p * (n_rows + 1);
        const int last = p == n_panels - 1;
        for (int64_t r = 0; r < n_rows; r++) {
            int32_t *pr = part + r * 32;
            __m256i acc[4];
            if (p == 0) {
                for (int c = 0; c < 4; c++) acc[c] = _mm256_setzero_si256();
            } else {
                for (int c = 0; c < 4; c++) acc[c] = _mm256_loadu_si256((const __m256i *)(pr + 8 * c));
            }
            for (uint64_t g = pp[r]; g < pp[r + 1]; g++) {
                uint64_t q;
                int32_t w4;
                memcpy(&q, idx + 4 * g, 8);
                memcpy(&w4, val + 4 * g, 4);
                const __m256i w = _mm256_set1_epi32(w4), wa = _mm256_abs_epi8(w);
                const __m256i a = _mm256_loadu_si256((const __m256i *)(bb + ((q << 5) & (0xffffull << 5))));
                const __m256i b = _mm256_loadu_si256((const __m256i *)(bb + ((q >> 11) & (0xffffull << 5))));
                const __m256i c = _mm256_loadu_si256((const __m256i *)(bb + ((q >> 27) & (0xffffull << 5))));
                const __m256i d = _mm256_loadu_si256((const __m256i *)(bb + ((q >> 43) & (0xffffull << 5))));
                const __m256i ab0 = _mm256_unpacklo_epi8(a, b), ab1 = _mm256_unpackhi_epi8(a, b);
                const __m256i cd0 = _mm256_unpacklo_epi8(c, d), cd1 = _mm256_unpackhi_epi8(c, d);
                __m256i v[4];
                v[0] = _mm256_unpacklo_epi16(ab0, cd0), v[1] = _mm256_unpackhi_epi16(ab0, cd0);
                v[2] = _mm256_unpacklo_epi16(ab1, cd1), v[3] = _mm256_unpackhi_epi16(ab1, cd1);
                for (int j = 0; j < 4; j++) {
                    const __m256i pairs = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(v[j], w));
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
                }
            }
            if (last) {
                const __m256 ws = _mm256_set1_ps(wscale[r]), b = _mm256_set1_ps(bias[r]);
                for (int c = 0; c < 4; c++) {
                    const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xscale + 8 * c), ws);
                    const __m256 y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[c]), s, b);
                    _mm256_storeu_ps(dst + r * 32 + 8 * c, act ? gelu8_q(y) : y);
                }
            } else {
                for (int c = 0; c < 4; c++) _mm256_storeu_si256((__m256i *)(pr + 8 * c), acc[c]);
            }
        }
    }
}

/* What kernels_drivers.h needs besides the above: tile widths, no streaming stores, and the
 * attention's vector width, copy and most rows of a p @ v block. */
#define ATT_VEC 8
#define ATT_COPY(DST, SRC) _mm256_storeu_ps(DST, _mm256_loadu_ps(SRC))
#define ATT_MAX_PV_ROWS 6
#define LANES_OK(LANES) ((LANES) == 16 || (LANES) == 32)
#define STREAM_OUTPUT(OUT, N_TOK, N_OUT) 0
#define UNPACK_OUT(OBUF, N_OUT, OUT, T0, NT, LANES, STREAM) ((void)(STREAM), unpack(OBUF, N_OUT, OUT, T0, NT, LANES))
#include "kernels_drivers.h"
