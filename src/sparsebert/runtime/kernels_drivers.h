/* The drivers of both kernel files: the OpenMP tile loops behind the exported sparse
 * products (fp32 `sb_spmm`, `sb_ffn`; INT8 `sb_spmm_i8`, `sb_ffn_i8`) and the row loop of
 * `sb_add_layernorm`, included at the end of kernels_avx2.c and kernels_avx512.c, which
 * define what differs by instruction set before it:
 *   LANES_OK(lanes)         the fp32 tile widths the file's kernels have
 *   pack, run_rows          fp32 tile transpose-in, the rows of a matrix over a tile
 *   UNPACK_OUT(obuf, n_out, out, t0, nt, lanes, stream), STREAM_OUTPUT(out, n_tok, n_out)
 *                           the transpose back, and whether it may use streaming stores
 *   add_norm_row            o = LayerNorm(x + r) * gamma + beta for one row
 *   I8_LANES, I8_ROW_BYTES  INT8 tokens per tile, token-buffer bytes per feature
 *   i8_prepare              fbuf[k][lane] floats -> per-token scales + the int8 buffer
 *   i8_rows                 the rows of an INT8 matrix over a tile (int32 sums,
 *                           dequantised epilogue with bias and activation)
 *   ATT_VEC, ATT_COPY, ATT_MAX_PV_ROWS, and QK_ROWS, QROWS, softmax_row, pv_rows_for,
 *   pv_any, transpose8      the attention's vector width, vector copy, blocks (sb_attention)
 * (and kernels_common.h's scratch).
 */

/* out = act(x @ W.T + b); x: (n_tok, n_in), out: (n_tok, n_out), both row-major float32;
 * W: sparse_format.RowPanels, n_out rows of n_panels panels (ptr: n_panels x (n_out + 1)
 * entry offsets). With a residual (n_tok, n_out), each tile's output rows then become
 * LayerNorm(out + residual) * gamma + beta while still in cache: a BERT output block's
 * dense + add & norm in one pass (NULL residual: none).
 * Work: `lanes`-token tiles handed out one at a time (dynamic: a thread slowed by other
 * load on a shared machine takes fewer). Returns 0, -1 if out of memory, -2 for an
 * unsupported tile width. */
int sb_spmm(const float *x, int64_t n_tok, int64_t n_in, const uint64_t *ptr, int64_t n_panels,
            const uint16_t *idx, const float *val, const float *bias, int act, float *out,
            int64_t n_out, int threads, int64_t lanes, const float *residual, const float *gamma,
            const float *beta, float eps) {
    if (!LANES_OK(lanes)) return -2;
    const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
    const int workers = (int)(threads < n_tiles ? threads : n_tiles);
    const int stream = !residual && STREAM_OUTPUT(out, n_tok, n_out);
    int failed = 0;
#pragma omp parallel num_threads(workers > 0 ? workers : 1) reduction(| : failed)
    {
        /* Partial sums and finished rows share one buffer: a row's partial sum is read
         * before its result overwrites it, and the tile's footprint in L2 shrinks. */
        float *buf = scratch(n_in * lanes), *obuf = scratch(n_out * lanes);
        const int ok = buf && obuf;
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ok) continue;
            const int64_t t0 = t * lanes, nt = n_tok - t0 < lanes ? n_tok - t0 : lanes;
            pack(x, n_in, t0, nt, buf, lanes);
            run_rows(buf, ptr, n_panels, n_out, idx, val, bias, act, obuf, obuf, lanes);
            UNPACK_OUT(obuf, n_out, out, t0, nt, lanes, stream);
            if (residual)
                for (int64_t i = t0; i < t0 + nt; i++)
                    add_norm_row(out + i * n_out, residual + i * n_out, gamma, beta, eps, out + i * n_out, n_out);
        }
        free(buf), free(obuf);
    }
    return failed ? -1 : 0;
}

/* Feed-forward block out = W2 gelu(W1 x + b1) + b2, tile by tile: the hidden activations of
 * a tile go from W1's epilogue straight into W2's token buffer and never reach memory.
 * With a residual, the tile's rows then become LayerNorm(out + residual) * gamma + beta
 * (as in sb_spmm): the whole BERT feed-forward sublayer in one pass. */
int sb_ffn(const float *x, int64_t n_tok, int64_t n_in,
           const uint64_t *ptr1, int64_t n_panels1, const uint16_t *idx1, const float *val1,
           const float *bias1, int64_t n_hidden,
           const uint64_t *ptr2, int64_t n_panels2, const uint16_t *idx2, const float *val2,
           const float *bias2, float *out, int64_t n_out, int threads, int64_t lanes,
           const float *residual, const float *gamma, const float *beta, float eps) {
    if (!LANES_OK(lanes)) return -2;
    const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
    const int workers = (int)(threads < n_tiles ? threads : n_tiles);
    const int stream = !residual && STREAM_OUTPUT(out, n_tok, n_out);
    int failed = 0;
#pragma omp parallel num_threads(workers > 0 ? workers : 1) reduction(| : failed)
    {
        /* hidden and obuf also hold their matrix's partial sums (see sb_spmm) */
        float *buf = scratch(n_in * lanes), *hidden = scratch(n_hidden * lanes);
        float *obuf = scratch(n_out * lanes);
        const int ok = buf && hidden && obuf;
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ok) continue;
            const int64_t t0 = t * lanes, nt = n_tok - t0 < lanes ? n_tok - t0 : lanes;
            pack(x, n_in, t0, nt, buf, lanes);
            run_rows(buf, ptr1, n_panels1, n_hidden, idx1, val1, bias1, 1, hidden, hidden, lanes);
            run_rows(hidden, ptr2, n_panels2, n_out, idx2, val2, bias2, 0, obuf, obuf, lanes);
            UNPACK_OUT(obuf, n_out, out, t0, nt, lanes, stream);
            if (residual)
                for (int64_t i = t0; i < t0 + nt; i++)
                    add_norm_row(out + i * n_out, residual + i * n_out, gamma, beta, eps, out + i * n_out, n_out);
        }
        free(buf), free(hidden), free(obuf);
    }
    return failed ? -1 : 0;
}

/* out = LayerNorm(x + residual) * gamma + beta, row by row (rows of n_cols floats). The
 * transformer block's "add & norm" in one pass over memory instead of two torch ops. */
int sb_add_layernorm(const float *x, const float *residual, const float *gamma, const float *beta,
                     float eps, float *out, int64_t n_rows, int64_t n_cols, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < n_rows; r++)
        add_norm_row(x + r * n_cols, residual + r * n_cols, gamma, beta, eps, out + r * n_cols, n_cols);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Sparse INT8. Weight layout: sparse_format.Int8RowGroups: input features cut into panels;
 * within a panel one run of groups per output row, a group = 4 uint16 indices + 4 int8
 * weights (any 4 non-zeros of the row, the last group of a run padded with zero weights);
 * ptr counts groups. comp[r] = 128 * sum of row r's int8 weights, wscale[r] its scale.
 * --------------------------------------------------------------------------------------- */

/* out = act(x @ W.T + b) with W int8 per row and x quantised per token; optionally followed
 * by LayerNorm(out + residual) * gamma + beta per token (as sb_spmm). Returns 0, or -1 if
 * out of memory. */
int sb_spmm_i8(const float *x, int64_t n_tok, int64_t n_in, const uint64_t *ptr, int64_t n_panels,
               const uint16_t *idx, const int8_t *val, const int32_t *comp, const float *wscale,
               const float *bias, int act, float *out, int64_t n_out, int threads,
               const float *residual, const float *gamma, const float *beta, float eps) {
    const int64_t lanes = I8_LANES;
    const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
    const int workers = (int)(threads < n_tiles ? threads : n_tiles);
    const int stream = !residual && STREAM_OUTPUT(out, n_tok, n_out);
    int failed = 0;
#pragma omp parallel num_threads(workers > 0 ? workers : 1) reduction(| : failed)
    {
        float *fbuf = scratch(n_in * lanes), *obuf = scratch(n_out * lanes), *xscale = scratch(lanes);
        uint8_t *buf = (uint8_t *)scratch(n_in * I8_ROW_BYTES / 4 + 16);
        int32_t *part = n_panels > 1 ? (int32_t *)scratch(n_out * lanes) : NULL;
        const int ok = fbuf && obuf && xscale && buf && (n_panels <= 1 || part);
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ok) continue;
            const int64_t t0 = t * lanes, nt = n_tok - t0 < lanes ? n_tok - t0 : lanes;
            pack(x, n_in, t0, nt, fbuf, lanes);
            i8_prepare(fbuf, n_in, buf, xscale);
            i8_rows(buf, ptr, n_panels, n_out, idx, val, comp, wscale, bias, act, xscale, obuf, part);
            UNPACK_OUT(obuf, n_out, out, t0, nt, lanes, stream);
            if (residual)
                for (int64_t i = t0; i < t0 + nt; i++)
                    add_norm_row(out + i * n_out, residual + i * n_out, gamma, beta, eps, out + i * n_out, n_out);
        }
        free(fbuf), free(obuf), free(xscale), free(buf), free(part);
    }
    return failed ? -1 : 0;
}

/* Feed-forward block out = W2 gelu(W1 x + b1) + b2 in INT8, tile by tile: the tile's GELU
 * outputs are quantised per token again (their own scales) for W2 without leaving the
 * core's caches; optionally with the add & norm (as sb_ffn). */
int sb_ffn_i8(const float *x, int64_t n_tok, int64_t n_in,
              const uint64_t *ptr1, int64_t n_panels1, const uint16_t *idx1, const int8_t *val1,
              const int32_t *comp1, const float *wscale1, const float *bias1, int64_t n_hidden,
              const uint64_t *ptr2, int64_t n_panels2, const uint16_t *idx2, const int8_t *val2,
              const int32_t *comp2, const float *wscale2, const float *bias2,
              float *out, int64_t n_out, int threads,
              const float *residual, const float *gamma, const float *beta, float eps) {
    const int64_t lanes = I8_LANES;
    const int64_t n_tiles = (n_tok + lanes - 1) / lanes;
    const int workers = (int)(threads < n_tiles ? threads : n_tiles);
    const int stream = !residual && STREAM_OUTPUT(out, n_tok, n_out);
    const int64_t n_wide = n_hidden > n_out ? n_hidden : n_out;
    int failed = 0;
#pragma omp parallel num_threads(workers > 0 ? workers : 1) reduction(| : failed)
    {
        float *fbuf = scratch(n_in * lanes), *hidden = scratch(n_hidden * lanes);
        float *obuf = scratch(n_out * lanes), *xscale = scratch(lanes);
        uint8_t *buf = (uint8_t *)scratch(n_in * I8_ROW_BYTES / 4 + 16);
        uint8_t *hbuf = (uint8_t *)scratch(n_hidden * I8_ROW_BYTES / 4 + 16);
        int32_t *part = n_panels1 > 1 || n_panels2 > 1 ? (int32_t *)scratch(n_wide * lanes) : NULL;
        const int ok = fbuf && hidden && obuf && xscale && buf && hbuf && (part || (n_panels1 <= 1 && n_panels2 <= 1));
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ok) continue;
            const int64_t t0 = t * lanes, nt = n_tok - t0 < lanes ? n_tok - t0 : lanes;
            pack(x, n_in, t0, nt, fbuf, lanes);
            i8_prepare(fbuf, n_in, buf, xscale);
            i8_rows(buf, ptr1, n_panels1, n_hidden, idx1, val1, comp1, wscale1, bias1, 1, xscale, hidden, part);
            i8_prepare(hidden, n_hidden, hbuf, xscale);
            i8_rows(hbuf, ptr2, n_panels2, n_out, idx2, val2, comp2, wscale2, bias2, 0, xscale, obuf, part);
            UNPACK_OUT(obuf, n_out, out, t0, nt, lanes, stream);
            if (residual)
                for (int64_t i = t0; i < t0 + nt; i++)
                    add_norm_row(out + i * n_out, residual + i * n_out, gamma, beta, eps, out + i * n_out, n_out);
        }
        free(fbuf), free(hidden), free(obuf), free(xscale), free(buf), free(hbuf), free(part);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------
 * Dense attention softmax(q k^T * scale + bias) v per (batch, head), from the file's score,
 * softmax and p @ v blocks (QK_ROWS, QROWS, softmax_row, pv_rows_for, pv_any, transpose8)
 * and its vector width ATT_VEC, vector copy ATT_COPY and ATT_MAX_PV_ROWS.
 * --------------------------------------------------------------------------------------- */

/* Prefetch n rows of D floats, `stride` floats apart, into L2. A head's rows are scattered
 * (in BERT each token's q, k and v rows are 3 x hidden floats apart, a page or more), which
 * the hardware prefetchers do not follow: reading them cold cost ~30% of the kernel. */
static void prefetch_rows(const float *base, int64_t stride, int64_t n, int64_t D) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < D; c += 16) _mm_prefetch((const char *)(base + i * stride + c), _MM_HINT_T1);
}

int sb_attention(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t S,
                 int64_t S_k, int64_t D, const int64_t *q_strides, const int64_t *k_strides,
                 const int64_t *v_strides, const float *bias, int64_t bias_b, int64_t bias_i,
                 float scale, float *out, int threads) {
    if (D % ATT_VEC != 0 || D > 256 || S_k < 1) return -2;
    const int64_t SkV = (S_k + ATT_VEC - 1) / ATT_VEC * ATT_VEC; /* keys padded to whole vectors (masked scores) */
    const int64_t nd = D / ATT_VEC;
    const int pv_rows = pv_rows_for(nd);
    /* query rows per chunk: scores of at most ~256 KiB per thread, whole blocks of QROWS */
    const int64_t fit = (65536 / SkV) / QROWS * QROWS;
    const int64_t chunk = fit < QROWS ? QROWS : (fit < S ? fit : S);
    const int64_t per = B * H / (4 * (threads > 0 ? threads : 1));
    const int64_t grab = per < 1 ? 1 : (per < H ? per : H);
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        float *kt = scratch(D * SkV);        /* k transposed: kt[d][j] */
        float *pr = scratch(chunk * SkV);    /* scores / probabilities of a chunk of query rows */
        float *inv = scratch(chunk);         /* 1 / softmax sum per row of the chunk */
        float *vl = scratch(S_k * D);        /* this head's v rows, contiguous */
        const int ok = kt && pr && inv && vl;
        failed |= !ok;
        /* Dynamic scheduling (up to a batch row's H heads per grab, at least ~4 grabs per
         * thread): on a shared machine one thread can run slower than the other, and static
         * halves would wait for it. The prefetch of the next head stays within the grab. */
#pragma omp for schedule(dynamic, grab)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!ok) continue;
            const int64_t b = bh / H, h = bh % H;
            const float *qs = q + b * q_strides[0] + h * q_strides[1];
            const float *kb = k + b * k_strides[0] + h * k_strides[1];
            const float *vs = v + b * v_strides[0] + h * v_strides[1];
            if ((bh + 1) % grab != 0 && bh + 1 < B * H) { /* next head's rows into L2 meanwhile */
                const int64_t b1 = (bh + 1) / H, h1 = (bh + 1) % H;
                prefetch_rows(q + b1 * q_strides[0] + h1 * q_strides[1], q_strides[2], S, D);
                prefetch_rows(k + b1 * k_strides[0] + h1 * k_strides[1], k_strides[2], S_k, D);
                prefetch_rows(v + b1 * v_strides[0] + h1 * v_strides[1], v_strides[2], S_k, D);
            }
            for (int64_t j = 0; j < S_k; j++)
                for (int64_t c = 0; c < D; c += ATT_VEC) ATT_COPY(vl + j * D + c, vs + j * v_strides[2] + c);
            int64_t j0 = 0;
            for (; j0 + 8 <= S_k; j0 += 8)
                for (int64_t d0 = 0; d0 < D; d0 += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(kb + (j0 + i) * k_strides[2] + d0);
                    transpose8(r);
                    for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (d0 + i) * SkV + j0, r[i]);
                }
            for (int64_t j = j0; j < SkV; j++)
                for (int64_t d = 0; d < D; d++) kt[d * SkV + j] = j < S_k ? kb[j * k_strides[2] + d] : 0.0f;
            /* Phases over a chunk of query rows (all rows for short sequences): scores,
             * softmax, then p @ v, so that the transposed keys and the values (16 KiB
             * each at S = 128, D = 32) do not compete for L1 within a phase; the scores
             * stream through L2. */
            for (int64_t c0 = 0; c0 < S; c0 += chunk) {
                const int64_t nc = S - c0 < chunk ? S - c0 : chunk;
                for (int64_t i0 = 0; i0 < nc; i0 += QROWS) {
                    const int nr = nc - i0 < QROWS ? (int)(nc - i0) : QROWS;
                    QK_ROWS[nr](qs + (c0 + i0) * q_strides[2], q_strides[2], D, kt, SkV, pr + i0 * SkV);
                }
                for (int64_t i = 0; i < nc; i++) {
                    const float *brow = bias ? bias + b * bias_b + (c0 + i) * bias_i : NULL;
                    inv[i] = softmax_row(pr + i * SkV, brow, scale, S_k, SkV);
                }
                for (int64_t i0 = 0; i0 < nc; i0 += pv_rows) {
                    const int n = nc - i0 < pv_rows ? (int)(nc - i0) : pv_rows;
                    float *outs[ATT_MAX_PV_ROWS];
                    for (int r = 0; r < n; r++) outs[r] = out + ((b * S + c0 + i0 + r) * H + h) * D;
                    pv_any(pr + i0 * SkV, SkV, vl, S_k, nd, outs, inv + i0, n);
                }
            }
        }
        free(kt), free(pr), free(inv), free(vl);
    }
    return failed ? -1 : 0;
}
