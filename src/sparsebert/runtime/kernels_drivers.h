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
