/* The native kernels with AVX-512 (F, BW, DQ, VL) + FMA: the zmm twins of kernels_avx2.c,
 * with the same C signatures: the sparse products (`sb_spmm`, the fused feed-forward block
 * `sb_ffn`), encoder attention (`sb_attention`, head widths a multiple of 16) and the residual
 * add + LayerNorm (`sb_add_layernorm`).
 *
 * Weight layout: sparse_format.RowPanels, exactly as the AVX2 kernels read it, same panels
 * (input features cut into panels; within a panel one run of (uint16 index, fp32 value)
 * entries per output row, rows in natural order, no padding).
 *
 * Algorithm: as in kernels_avx2.c, a tile of 16, 32 or 64 tokens is transposed into
 * buf[feature][lane]; then, panel by panel, every output row accumulates w * buf[k] over its
 * entries (partial sums kept per row between panels) and the last panel's epilogue applies
 * the activation; the tile's output is transposed back.
 *
 * What changes with zmm registers: a row of a 64-token tile is 4 registers (of a 32-token
 * tile 2, of a 16-token tile 1), so every index and weight read, offset computation, loop
 * iteration and row epilogue serves twice the token lanes of the AVX2 kernel. What does not:
 * the bytes of activations loaded per weight and token. On the Ice Lake Xeon this was written
 * on, the L1 delivers 64 bytes per cycle either way (one zmm load or two ymm loads per
 * cycle, measured), and a sparse x dense product loads one activation vector per weight, so
 * the gain is what the AVX2 kernel spends around its loads: ~5-7 cycles per entry of a
 * 64-token tile against ~10-14 for two 32-token AVX2 tiles (1.5-2x). Four entries are read at
 * a time as in the AVX2 kernel (one 64-bit load for four indices, one 128-bit broadcast load
 * for four weights, spread by in-register permutes); an index becomes a byte offset into buf
 * with one shift and one mask. Accumulator sets: entries alternate between sets so that 8
 * FMA chains hide the FMA latency (64 tokens: 2 sets x 4 registers; 32: 4 x 2); 16-token
 * tiles (4 x 1) only serve inputs of few tokens. Measured and not kept: a masked block for
 * the last 0-3 entries of a row, and visiting rows sorted by run length (fewer mispredicted
 * loop exits): no faster.
 *
 * Threads: OpenMP (the libgomp torch has loaded), work handed out dynamically. Built on first
 * use by sparsebert.runtime.native (cc -O3 -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma
 * -fopenmp, and -mavx512vnni where the CPU has it), only on CPUs that report these flags.
 * The tile loops and helpers shared with kernels_avx2.c are in kernels_drivers.h and
 * kernels_common.h; this file keeps the zmm code.
 */
#include "kernels_common.h"

/* buf[k][lane] = x[t0 + lane][k] for a tile of `lanes` (16, 32 or 64) tokens; lanes past
 * the last token are zero. Full groups of 8 tokens go 16 features at a time (two 8x8
 * register transposes that read each token's 64-byte line whole); the feature tail and the
 * lanes of a partial tile element by element. */
static void pack(const float *x, int64_t n_in, int64_t t0, int64_t nt, float *buf, int64_t lanes) {
    const int64_t full = nt / 8 * 8;
    for (int64_t h = 0; h < full; h += 8) {
        int64_t k0 = 0;
        for (; k0 + 16 <= n_in; k0 += 16) {
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
        for (; k0 < n_in; k0++)
            for (int i = 0; i < 8; i++) buf[k0 * lanes + h + i] = x[(t0 + h + i) * n_in + k0];
    }
    if (full < lanes)
        for (int64_t k = 0; k < n_in; k++)
            for (int64_t i = full; i < lanes; i++) buf[k * lanes + i] = i < nt ? x[(t0 + i) * n_in + k] : 0.0f;
}

/* out[t0 + lane][o] = obuf[o][lane] for the tile's real tokens: full groups of 8 tokens go
 * 16 outputs at a time, so each token's 64-byte line is written whole. With `stream` (an
 * output far larger than L2, 64-byte aligned rows), those lines bypass the caches: a
 * regular store first reads each line from memory (~9 GB/s per core here) only to
 * overwrite it, while streaming stores go at twice that. */
static void unpack(const float *obuf, int64_t n_out, float *out, int64_t t0, int64_t nt, int64_t lanes,
                   int stream) {
    const int64_t full = nt / 8 * 8;
    for (int64_t h = 0; h < full; h += 8) {
        int64_t o0 = 0;
        for (; o0 + 16 <= n_out; o0 += 16) {
            __m256 r[8], s[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(obuf + (o0 + i) * lanes + h);
            for (int i = 0; i < 8; i++) s[i] = _mm256_loadu_ps(obuf + (o0 + 8 + i) * lanes + h);
            transpose8(r);
            transpose8(s);
            if (stream) {
                for (int i = 0; i < 8; i++) {
                    float *row = out + (t0 + h + i) * n_out + o0;
                    _mm512_stream_ps(row, _mm512_insertf32x8(_mm512_castps256_ps512(r[i]), s[i], 1));
                }
            } else {
                for (int i = 0; i < 8; i++) {
                    float *row = out + (t0 + h + i) * n_out + o0;
                    _mm256_storeu_ps(row, r[i]);
                    _mm256_storeu_ps(row + 8, s[i]);
                }
            }
        }
        for (; o0 + 8 <= n_out; o0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(obuf + (o0 + i) * lanes + h);
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + (t0 + h + i) * n_out + o0, r[i]);
        }
        for (; o0 < n_out; o0++)
            for (int i = 0; i < 8; i++) out[(t0 + h + i) * n_out + o0] = obuf[o0 * lanes + h + i];
    }
    for (int64_t i = full; i < nt; i++)
        for (int64_t o = 0; o < n_out; o++) out[(t0 + i) * n_out + o] = obuf[o * lanes + i];
    if (stream) _mm_sfence();
}

/* Stream an output of n_tok x n_out floats? Only when it is far larger than L2 (the next op
 * reads it from memory anyway) and every row starts on a 64-byte line. */
static int stream_output(const float *out, int64_t n_tok, int64_t n_out) {
    return n_tok * n_out * 4 >= ((int64_t)4 << 20) && ((uintptr_t)out % 64) == 0 && n_out % 16 == 0;
}

/* Exact GELU with the rational erf of kernels._gelu (Eigen's float erf), as gelu8 in
 * kernels_avx2.c: p / q as p times a Newton-refined reciprocal estimate (rcp14: ~1e-8
 * relative error after the step). */
ALWAYS_INLINE __m512 gelu16(__m512 x) {
    const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f)),
                                                 _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
    const __m512 z2 = _mm512_mul_ps(z, z);
    __m512 p = _mm512_fmadd_ps(z2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
    p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-2.10102402082508e-06f));
    p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-5.69250639462346e-05f));
    p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-7.34990630326855e-04f));
    p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-2.95459980854025e-03f));
    p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-1.60960333262415e-02f));
    p = _mm512_mul_ps(z, p);
    __m512 q = _mm512_fmadd_ps(z2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
    q = _mm512_fmadd_ps(z2, q, _mm512_set1_ps(-1.68282697438203e-03f));
    q = _mm512_fmadd_ps(z2, q, _mm512_set1_ps(-7.37332916720468e-03f));
    q = _mm512_fmadd_ps(z2, q, _mm512_set1_ps(-1.42647390514189e-02f));
    const __m512 r0 = _mm512_rcp14_ps(q);
    const __m512 r1 = _mm512_mul_ps(r0, _mm512_fnmadd_ps(q, r0, _mm512_set1_ps(2.0f)));
    const __m512 erf = _mm512_mul_ps(p, r1);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

/* Byte offset into buf of slot S of four packed uint16 indices q, for rows of 2^SH bytes
 * (the tile's lanes x 4): one shift and one mask instead of shift, zero-extend and scale. */
#define BYTE_OFFSET(Q, S, SH)                                                                     \
    ((16 * (S) >= (SH) ? ((Q) >> (16 * (S) - (SH))) : ((Q) << ((SH) - 16 * (S)))) & (0xffffull << (SH)))

/* Every output row of the tile in buf (LANES = 16 NV tokens):
 * dst[r][lane] = act(sum_k W[r][k] buf[k][lane] + b[r]); part holds partial sums between
 * panels (it may be dst). Entry 4i + s of a row goes to accumulator set s % SETS; SH is
 * log2 of a buf row's bytes. A macro so that every specialisation declares its accumulators
 * with constant sizes (GCC keeps them in registers; a variable-length array went through
 * the stack at every row). The asm barrier keeps an entry's address in one register, so its
 * NV loads use base + displacement addressing: an indexed address would split every FMA
 * with a memory operand into two micro-ops on Intel cores. */
#define DEF_ROWS(NAME, NV, SETS, SH)                                                              \
    static void NAME(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,        \
                     const uint16_t *idx, const float *val, const float *bias, int act, float *dst,  \
                     float *part) {                                                                  \
        const char *bb = (const char *)buf;                                                         \
        for (int64_t p = 0; p < n_panels; p++) {                                                     \
            const uint64_t *pp = ptr + p * (n_rows + 1);                                             \
            const int last = p == n_panels - 1;                                                      \
            for (int64_t r = 0; r < n_rows; r++) {                                                   \
                float *pr = part + r * 16 * NV;                                                      \
                __m512 acc[SETS][NV];                                                                \
                _Pragma("GCC unroll 16") for (int s = 1; s < SETS; s++)                              \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++) acc[s][c] = _mm512_setzero_ps(); \
                if (p == 0) {                                                                        \
                    const __m512 b = _mm512_set1_ps(bias[r]);                                        \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++) acc[0][c] = b;             \
                } else {                                                                             \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++) acc[0][c] = _mm512_loadu_ps(pr + 16 * c); \
                }                                                                                    \
                uint64_t j = pp[r];                                                                  \
                const uint64_t end = pp[r + 1];                                                      \
                for (; j + 4 <= end; j += 4) {                                                       \
                    uint64_t q;                                                                      \
                    memcpy(&q, idx + j, 8);                                                          \
                    const __m512 w4 = _mm512_broadcast_f32x4(_mm_loadu_ps(val + j));                 \
                    _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++) {                            \
                        const char *xk = bb + BYTE_OFFSET(q, s, SH);                                 \
                        __asm__("" : "+r"(xk));                                                      \
                        const __m512 w = _mm512_permute_ps(w4, 0x55 * s);                            \
                        _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++)                        \
                            acc[s % SETS][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps((const float *)xk + 16 * c), acc[s % SETS][c]); \
                    }                                                                                \
                }                                                                                    \
                for (; j < end; j++) { /* the last 0-3 entries (a masked block was no faster) */  \
                    const __m512 w = _mm512_set1_ps(val[j]);                                         \
                    const float *xk = buf + (int64_t)idx[j] * 16 * NV;                               \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++)                            \
                        acc[0][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + 16 * c), acc[0][c]);     \
                }                                                                                    \
                _Pragma("GCC unroll 16") for (int s = 1; s < SETS; s++)                              \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++) acc[0][c] = _mm512_add_ps(acc[0][c], acc[s][c]); \
                if (last) {                                                                          \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++)                            \
                        _mm512_storeu_ps(dst + r * 16 * NV + 16 * c, act ? gelu16(acc[0][c]) : acc[0][c]); \
                } else {                                                                             \
                    _Pragma("GCC unroll 16") for (int c = 0; c < NV; c++) _mm512_storeu_ps(pr + 16 * c, acc[0][c]); \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

/* 16 lanes: 1 register per row, 4 sets (rows of a 16-token tile only run for inputs of few
 * tokens); 32 lanes: 2 registers x 4 sets; 64: 4 x 2 (8 chains each). */
DEF_ROWS(rows16, 1, 4, 6)
DEF_ROWS(rows32, 2, 4, 7)
DEF_ROWS(rows64, 4, 2, 8)

static void run_rows(const float *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,
                     const uint16_t *idx, const float *val, const float *bias, int act, float *dst,
                     float *part, int64_t lanes) {
    if (lanes == 64)
        rows64(buf, ptr, n_panels, n_rows, idx, val, bias, act, dst, part);
    else if (lanes == 32)
        rows32(buf, ptr, n_panels, n_rows, idx, val, bias, act, dst, part);
    else
        rows16(buf, ptr, n_panels, n_rows, idx, val, bias, act, dst, part);
}

/* o = LayerNorm(x + r) * gamma + beta for one row of n_cols floats; o may be x. Masked
 * loads and stores take the tail of a row whose width is not a multiple of 16. */
static void add_norm_row(const float *xr, const float *rr, const float *gamma, const float *beta,
                         float eps, float *o, int64_t n_cols) {
    const int64_t nv = n_cols / 16 * 16;
    const __mmask16 tm = (__mmask16)((1u << (n_cols - nv)) - 1u);
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = 0; c < nv; c += 16) {
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(xr + c), _mm512_loadu_ps(rr + c));
        _mm512_storeu_ps(o + c, v);
        s = _mm512_add_ps(s, v);
    }
    if (tm) {
        const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(tm, xr + nv), _mm512_maskz_loadu_ps(tm, rr + nv));
        _mm512_mask_storeu_ps(o + nv, tm, v);
        s = _mm512_add_ps(s, v);
    }
    const float mean = _mm512_reduce_add_ps(s) / (float)n_cols;
    const __m512 mv = _mm512_set1_ps(mean);
    __m512 q = _mm512_setzero_ps();
    for (int64_t c = 0; c < nv; c += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(o + c), mv);
        q = _mm512_fmadd_ps(d, d, q);
    }
    if (tm) {
        const __m512 d = _mm512_maskz_sub_ps(tm, _mm512_maskz_loadu_ps(tm, o + nv), mv);
        q = _mm512_fmadd_ps(d, d, q);
    }
    const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(q) / (float)n_cols + eps);
    const __m512 iv = _mm512_set1_ps(inv);
    for (int64_t c = 0; c < nv; c += 16) {
        const __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(o + c), mv), iv);
        _mm512_storeu_ps(o + c, _mm512_fmadd_ps(n, _mm512_loadu_ps(gamma + c), _mm512_loadu_ps(beta + c)));
    }
    if (tm) {
        const __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, o + nv), mv), iv);
        _mm512_mask_storeu_ps(o + nv, tm, _mm512_fmadd_ps(n, _mm512_maskz_loadu_ps(tm, gamma + nv),
                                                          _mm512_maskz_loadu_ps(tm, beta + nv)));
    }
}

/* ---------------------------------------------------------------------------------------
 * Attention for encoders, zmm version of sb_attention in kernels_avx2.c (same arguments, same
 * phases: scores of a chunk of query rows, softmax, probabilities x values, per (batch, head),
 * with the next head's rows prefetched). What changes: 16 keys per register (keys padded to
 * a multiple of 16), 8 x 32 register blocks of scores (16 accumulators), and blocks of up to
 * 8 rows of probabilities x values; the head width D must be a multiple of 16 (else -2, and
 * the caller runs the AVX2 kernel).
 * --------------------------------------------------------------------------------------- */

ALWAYS_INLINE __m512 exp16(__m512 x) {
    /* exp for x <= 0, as exp8 in kernels_avx2.c: 2^n 2^f, f in [-0.5, 0.5], degree-5 polynomial. */
    const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-125.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.3266970636323094e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675459936261177e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550742521882057e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121727466583e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
    return _mm512_scalef_ps(p, n); /* p 2^n in one instruction (AVX2: convert, shift, add) */
}

/* Scores of R query rows (R <= 8) against 16 * NK keys (NK = 1 or 2) from key j:
 * pr[r][j..] = q[r] . k[j..] over D, kt = k transposed (kt[d][j], row length Sk16). A macro
 * so that each specialisation keeps its accumulators in registers (see kernels_avx2.c). */
#define QK_BLOCK(R, NK)                                                                  \
    do {                                                                                 \
        __m512 acc[R][NK];                                                               \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                             \
            _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps(); \
        for (int64_t d = 0; d < D; d++) {                                                \
            const float *kd = kt + d * Sk16 + j;                                         \
            __m512 kv[NK];                                                               \
            _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) kv[c] = _mm512_loadu_ps(kd + 16 * c); \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                       \
                const __m512 qv = _mm512_set1_ps(q[r * qs + d]);                         \
                _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]); \
            }                                                                            \
        }                                                                                \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                             \
            _Pragma("GCC unroll 16") for (int c = 0; c < NK; c++) _mm512_storeu_ps(pr + r * Sk16 + j + 16 * c, acc[r][c]); \
    } while (0)

#define DEF_QK(R)                                                                        \
    static void qk_##R(const float *q, int64_t qs, int64_t D, const float *kt, int64_t Sk16, float *pr) { \
        int64_t j = 0;                                                                   \
        for (; j + 32 <= Sk16; j += 32) QK_BLOCK(R, 2);                                  \
        if (j < Sk16) QK_BLOCK(R, 1);                                                    \
    }
DEF_QK(1)
DEF_QK(2)
DEF_QK(3)
DEF_QK(4)
DEF_QK(5)
DEF_QK(6)
DEF_QK(7)
DEF_QK(8)
typedef void (*qk_fn)(const float *, int64_t, int64_t, const float *, int64_t, float *);
static const qk_fn QK_ROWS[9] = {NULL, qk_1, qk_2, qk_3, qk_4, qk_5, qk_6, qk_7, qk_8};
#define QROWS 8 /* query rows per score block */

/* p[j] = exp(scale p[j] + bias[j] - max) over the row's Sk16 scores, keys from n_k on masked
 * (zero); returns 1 / sum, or 0 for a row masked everywhere (it becomes all zeros). */
static float softmax_row(float *p, const float *bias, float scale, int64_t n_k, int64_t Sk16) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    const __m512 sc = _mm512_set1_ps(scale);
    const int64_t full = n_k / 16 * 16;
    for (int64_t j = 0; j < full; j += 16) {
        const __m512 sv = bias ? _mm512_fmadd_ps(_mm512_loadu_ps(p + j), sc, _mm512_loadu_ps(bias + j))
                               : _mm512_mul_ps(_mm512_loadu_ps(p + j), sc);
        _mm512_storeu_ps(p + j, sv);
        m = _mm512_max_ps(m, sv);
    }
    if (full < Sk16) { /* the last, partial vector of keys: -inf past n_k */
        const __mmask16 km = (__mmask16)((1u << (n_k - full)) - 1u);
        __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, p + full), sc);
        if (bias) sv = _mm512_add_ps(sv, _mm512_maskz_loadu_ps(km, bias + full));
        sv = _mm512_mask_blend_ps(km, _mm512_set1_ps(-INFINITY), sv);
        _mm512_storeu_ps(p + full, sv);
        m = _mm512_max_ps(m, sv);
    }
    const float mx = _mm512_reduce_max_ps(m);
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < Sk16; j++) p[j] = 0.0f;
        return 0.0f;
    }
    const __m512 mv = _mm512_set1_ps(mx);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t j = 0;
    for (; j + 32 <= Sk16; j += 32) {
        const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), mv));
        const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j + 16), mv));
        _mm512_storeu_ps(p + j, e0), _mm512_storeu_ps(p + j + 16, e1);
        s0 = _mm512_add_ps(s0, e0), s1 = _mm512_add_ps(s1, e1);
    }
    if (j < Sk16) {
        const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), mv));
        _mm512_storeu_ps(p + j, e0);
        s0 = _mm512_add_ps(s0, e0);
    }
    return 1.0f / _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

/* out[r] = inv[r] * (p[r] @ v) for R rows (row stride ps) over S_k keys, ND vectors of 16 per
 * output row: R * ND <= 24 accumulators, each loaded vector of v feeds R FMAs. */
#define PV_BLOCK(R, ND)                                                                  \
    do {                                                                                 \
        __m512 acc[R][ND];                                                               \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                             \
            _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) acc[r][c] = _mm512_setzero_ps(); \
        for (int64_t j = 0; j < S_k; j++) {                                              \
            const float *vr = vb + j * 16 * ND;                                          \
            __m512 vv[ND];                                                               \
            _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c); \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                       \
                const __m512 w = _mm512_set1_ps(p[r * ps + j]);                          \
                _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]); \
            }                                                                            \
        }                                                                                \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                           \
            const __m512 iv = _mm512_set1_ps(inv[r]);                                    \
            _Pragma("GCC unroll 16") for (int c = 0; c < ND; c++) _mm512_storeu_ps(outs[r] + 16 * c, _mm512_mul_ps(acc[r][c], iv)); \
        }                                                                                \
    } while (0)

/* Any head width (nd <= 16 vectors), one row at a time: the fallback for uncommon widths. */
static void pv_row_any(const float *p, const float *vb, int64_t S_k, int64_t nd, float *out, float inv) {
    __m512 acc[16];
    for (int64_t c = 0; c < nd; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S_k; j++) {
        const __m512 w = _mm512_set1_ps(p[j]);
        for (int64_t c = 0; c < nd; c++) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vb + j * 16 * nd + 16 * c), acc[c]);
    }
    const __m512 iv = _mm512_set1_ps(inv);
    for (int64_t c = 0; c < nd; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], iv));
}

/* Rows per PV block for a head width of nd vectors: R * nd <= 24, at most 8. */
static int pv_rows_for(int64_t nd) { return nd > 24 ? 1 : (int)(24 / nd > 8 ? 8 : 24 / nd); }

typedef void (*pv_fn)(const float *, int64_t, const float *, int64_t, float *const *, const float *);
#define DEF_PV(ND, R)                                                                                  \
    static void pv_block_##ND(const float *p, int64_t ps, const float *vb, int64_t S_k, float *const *outs, \
                              const float *inv) { PV_BLOCK(R, ND); }                                   \
    static void pv_one_##ND(const float *p, int64_t ps, const float *vb, int64_t S_k, float *const *outs,   \
                            const float *inv) { PV_BLOCK(1, ND); }
DEF_PV(1, 8)
DEF_PV(2, 8)
DEF_PV(3, 8)
DEF_PV(4, 6)
DEF_PV(6, 4)
DEF_PV(8, 3)

/* R rows of out = inv * (p @ v): R = pv_rows_for(nd) or fewer. */
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


/* ---------------------------------------------------------------------------------------
 * Sparse INT8 (weights int8 per output row, activations int8 per token, int32 sums): the
 * zmm primitives of kernels_drivers.h (which holds the tile loops, `sb_spmm_i8`, `sb_ffn_i8`).
 *
 * Token buffer: buf[k][64] uint8 = q + 128 for the 64 tokens of a tile (q in [-127, 127],
 * the token's activations quantised by its own scale). VPDPBUSD multiplies 4 unsigned bytes
 * by 4 signed bytes per 32-bit lane and adds the 4 products to the lane, so one dword lane is
 * one token and its 4 bytes the activations of the 4 input features of one weight group
 * (sparse_format.Int8RowGroups: any 4 non-zeros of a row, padded with zero weights). The
 * dword operands are built from the 4 features' buffer rows with 8 in-lane byte/word unpacks
 * (4 registers of 16 tokens each), so per group of 4 weights and 64 tokens: 4 loads, 8
 * shuffles, 4 VPDPBUSD, against 16 loads and 16 FMAs for 4 fp32 weights. The shuffles (port
 * 5 only) bound it at 8 cycles a group; measured ~8 in the FFN. Tried and dropped: a buffer
 * with two copies of each feature as 16-bit words (value in the low / high byte), so that
 * the byte interleave is an OR of two loads and only the 4 word unpacks remain: 25% slower
 * (4x the buffer bytes, out of L1, or narrower panels with more padding and partial sums). The +128 offset
 * (VPDPBUSD's first operand is unsigned) is exact: every row starts from -128 * sum(w).
 * The unpacks work within 128-bit lanes, so register j, dword 4L + i holds buffer position
 * 16L + 4j + i: `i8_quantize` stores token 16j + 4L + i there (a free side effect of its
 * saturating packs), and register j then holds tokens 16j..16j+15 in order.
 * Without AVX512-VNNI (Skylake-X), VPDPBUSD is emulated exactly: even and odd bytes widened
 * to 16 bits, two VPMADDWD.
 * --------------------------------------------------------------------------------------- */

#define I8_LANES 64
#define I8_ROW_BYTES 64 /* buffer bytes per feature */

/* GELU for the INT8 path, whose outputs are quantised to 8 bits next: max(x, 0) + h(|x|)
 * with h(u) = -u Phi(-u) a degree-10 polynomial in t = u / 2.25 - 1 over u in [0, 4.5]
 * (Chebyshev fit; |h| < 3e-5 beyond): within 5e-5 of the exact GELU, 14 instructions against
 * gelu16's 24 (the epilogue of the first feed-forward matrix is as costly as its int8 sums). */
ALWAYS_INLINE __m512 gelu16_q(__m512 x) {
    const __m512 u = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(4.5f));
    const __m512 t = _mm512_fmsub_ps(u, _mm512_set1_ps(1.0f / 2.25f), _mm512_set1_ps(1.0f));
    __m512 p = _mm512_set1_ps(4.582455031e-02f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-2.111288274e-02f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.839377807e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.750285817e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.110028976e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-4.339797495e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.009967425e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.470374063e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-2.463748948e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.330496986e-01f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-2.750082308e-02f));
    return _mm512_add_ps(_mm512_max_ps(x, _mm512_setzero_ps()), p);
}


/* xscale[lane] = amax / 127 over the tile's n features of fbuf[k][lane] (float, 64 lanes,
 * natural token order); inv[c] = 127 / amax per lane (0 for an all-zero token). */
static void i8_scales(const float *fbuf, int64_t n, float *xscale, __m512 inv[4]) {
    __m512 m[4];
    __mmask16 nan[4] = {0, 0, 0, 0};
    for (int c = 0; c < 4; c++) m[c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k++)
        for (int c = 0; c < 4; c++) {
            const __m512 v = _mm512_loadu_ps(fbuf + k * 64 + 16 * c);
            m[c] = _mm512_max_ps(m[c], _mm512_abs_ps(v));
            nan[c] |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
    for (int c = 0; c < 4; c++) {
        const __mmask16 nz = _mm512_cmp_ps_mask(m[c], _mm512_setzero_ps(), _CMP_GT_OQ);
        inv[c] = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.0f), m[c]);
        /* a token with a NaN gets a NaN scale, so its outputs are NaN (as in fp32) */
        const __m512 xs = _mm512_mul_ps(m[c], _mm512_set1_ps(1.0f / 127.0f));
        _mm512_storeu_ps(xscale + 16 * c, _mm512_mask_mov_ps(xs, nan[c], _mm512_set1_ps(NAN)));
    }
}

/* buf[k] = the 64 quantised activations of feature k, + 128, in the order the unpacks of
 * i8_rows need (see above): the saturating packs of 4 x 16 int32 give it directly. */
static void i8_quantize(const float *fbuf, int64_t n, const __m512 inv[4], uint8_t *buf) {
    const __m512i off = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < n; k++) {
        __m512i q[4];
        for (int c = 0; c < 4; c++)
            q[c] = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(fbuf + k * 64 + 16 * c), inv[c])), off);
        const __m512i p01 = _mm512_packs_epi32(q[0], q[1]), p23 = _mm512_packs_epi32(q[2], q[3]);
        _mm512_storeu_si512((void *)(buf + k * 64), _mm512_packus_epi16(p01, p23));
    }
}

static void i8_prepare(const float *fbuf, int64_t n, uint8_t *buf, float *xscale) {
    __m512 inv[4];
    i8_scales(fbuf, n, xscale, inv);
    i8_quantize(fbuf, n, inv, buf);
}

ALWAYS_INLINE __m512i dpbusd(__m512i acc, __m512i u, __m512i w) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, w);
#else
    const __m512i lo = _mm512_set1_epi16(0x00ff);
    const __m512i we = _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8), wo = _mm512_srai_epi16(w, 8);
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_and_si512(u, lo), we));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_srli_epi16(u, 8), wo));
#endif
}

/* Every output row of the tile: dst[r][lane] = act((sum - 128 rowsum) * wscale[r] *
 * xscale[lane] + bias[r]); part holds the int32 partial sums between panels. */
static void i8_rows(const uint8_t *buf, const uint64_t *ptr, int64_t n_panels, int64_t n_rows,
                    const uint16_t *idx, const int8_t *val, const int32_t *comp, const float *wscale,
                    const float *bias, int act, const float *xscale, float *dst, int32_t *part) {
    const char *bb = (const char *)buf;
    for (int64_t p = 0; p < n_panels; p++) {
        const uint64_t *pp = ptr + p * (n_rows + 1);
        const int last = p == n_panels - 1;
        for (int64_t r = 0; r < n_rows; r++) {
            int32_t *pr = part + r * 64;
            __m512i acc[4];
            if (p == 0) {
                for (int c = 0; c < 4; c++) acc[c] = _mm512_set1_epi32(-comp[r]);
            } else {
                for (int c = 0; c < 4; c++) acc[c] = _mm512_loadu_si512((const void *)(pr + 16 * c));
            }
            for (uint64_t g = pp[r]; g < pp[r + 1]; g++) {
                /* four zero-extending 16-bit loads and shifts: fewer scalar micro-ops than
                 * one 64-bit load split by shifts and masks (the scalar ports are short
                 * here: p0 and p5 run the vector work) */
                int32_t w4;
                memcpy(&w4, val + 4 * g, 4);
                const __m512i w = _mm512_set1_epi32(w4);
                const uint16_t *ig = idx + 4 * g;
                const __m512i a = _mm512_loadu_si512((const void *)(bb + ((uint64_t)ig[0] << 6)));
                const __m512i b = _mm512_loadu_si512((const void *)(bb + ((uint64_t)ig[1] << 6)));
                const __m512i c = _mm512_loadu_si512((const void *)(bb + ((uint64_t)ig[2] << 6)));
                const __m512i d = _mm512_loadu_si512((const void *)(bb + ((uint64_t)ig[3] << 6)));
                const __m512i ab0 = _mm512_unpacklo_epi8(a, b), ab1 = _mm512_unpackhi_epi8(a, b);
                const __m512i cd0 = _mm512_unpacklo_epi8(c, d), cd1 = _mm512_unpackhi_epi8(c, d);
                acc[0] = dpbusd(acc[0], _mm512_unpacklo_epi16(ab0, cd0), w);
                acc[1] = dpbusd(acc[1], _mm512_unpackhi_epi16(ab0, cd0), w);
                acc[2] = dpbusd(acc[2], _mm512_unpacklo_epi16(ab1, cd1), w);
                acc[3] = dpbusd(acc[3], _mm512_unpackhi_epi16(ab1, cd1), w);
            }
            if (last) {
                const __m512 ws = _mm512_set1_ps(wscale[r]), b = _mm512_set1_ps(bias[r]);
                for (int c = 0; c < 4; c++) {
                    const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(xscale + 16 * c), ws);
                    const __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[c]), s, b);
                    _mm512_storeu_ps(dst + r * 64 + 16 * c, act ? gelu16_q(y) : y);
                }
            } else {
                for (int c = 0; c < 4; c++) _mm512_storeu_si512((void *)(pr + 16 * c), acc[c]);
            }
        }
    }
}

/* What kernels_drivers.h needs besides the above: tile widths, streaming stores for outputs
 * far larger than L2. */
#define ATT_VEC 16
#define ATT_COPY(DST, SRC) _mm512_storeu_ps(DST, _mm512_loadu_ps(SRC))
#define ATT_MAX_PV_ROWS 8
#define LANES_OK(LANES) ((LANES) == 16 || (LANES) == 32 || (LANES) == 64)
#define STREAM_OUTPUT(OUT, N_TOK, N_OUT) stream_output(OUT, N_TOK, N_OUT)
#define UNPACK_OUT(OBUF, N_OUT, OUT, T0, NT, LANES, STREAM) unpack(OBUF, N_OUT, OUT, T0, NT, LANES, STREAM)
#include "kernels_drivers.h"
