/* A decode step on the CPU, for its few rows (float32): the matrix products, the attention of a
 * layer (`attention`, below), the residual stream's add and RMSNorm (`add_rms_norm`), each a call
 * of its own from agent/decode_kernel.py, and the whole step in one call (`decode_step`, last),
 * which runs the same parts one after another in one parallel region.
 *
 * The products: y[rows, out] = x[rows, in] @ w^T, w [out, in] either
 *   - float32, row-major as PyTorch holds it (`f32_product`),
 *   - bfloat16, packed in blocks of outputs by pairs of inputs, where the CPU has AVX-512 BF16
 *     dot products (`bf16_product`, below), or
 *   - int8 with a float32 scale per output row, w = q * scale (`int8_product`), q packed: outputs
 *     in groups of PACK rows, and within a group the inputs in chunks of WIDTH (a vector's: 8, or
 *     16 with AVX-512), each chunk holding those inputs of the group's PACK rows one after
 *     another, q[g][k / WIDTH][o][k % WIDTH] for output g * PACK + o, so that a tile reads its
 *     weights as one sequential stream (row-major int8 rows of 576 inputs are 9 cache lines: too
 *     short for the hardware prefetcher, which read them at less than half the speed).
 *
 * A decode step reads every weight once, so its products are bound by reading w: each weight is
 * loaded (and widened to float32) once per tile of up to 4 rows and multiplied into each of the
 * tile's rows, and prefetched ahead of the tile. The outputs are split into blocks, one OpenMP
 * task each, on the team PyTorch's own threads use (agent/native.py loads the library after
 * torch); a block's weights stay in the core's cache while the tiles of rows go over them, so
 * they come from memory once whatever the number of rows. Each part is written for the team it
 * is called in (orphaned `omp for` loops), and the exported functions open a region for it. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lora_kernel.c" /* the LoRA updates of a whole step's layers (decode_step) */

#define PACK 4   /* int8: output rows per group */
#define BLOCK 16 /* output rows of one task: a multiple of PACK and of every tile's outputs */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The products' vectors: WIDTH float32, 16 where the CPU has AVX-512 (half the instructions of
 * AVX2's 8 for the same weights: on 2 AVX-512 Xeon cores, int8 products of one row are bound by
 * widening the codes to float32, not by reading them), else 8. */
#ifdef __AVX512F__
#define WIDTH 16
typedef __m512 vec_t;
#define VZERO _mm512_setzero_ps
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VSUM _mm512_reduce_add_ps
static inline vec_t widen(const int8_t *p) { /* WIDTH int8 -> WIDTH float32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
#define WIDTH 8
typedef __m256 vec_t;
#define VZERO _mm256_setzero_ps
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VSUM hsum
static inline vec_t widen(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif

int64_t vector_width(void) { return WIDTH; } /* the inputs of a chunk of packed int8 codes */

/* y[r0 + r][o0 + o] (times scale[o0 + o] when scale is not NULL) for R rows of x from row r0 and
 * O outputs from o0, whose 8 weights of inputs [k, k + 8) start at w + o * step_o + k / 8 * step_k
 * (elements of `type`, loaded by LOAD); accumulated in R * O vector registers (R * O + O + 1 of
 * the 16 AVX2 ones). */
/* Weights are prefetched PREFETCH bytes ahead of the tile reading them: on 2 AVX-512 Xeon cores
 * the hardware prefetchers alone kept an int8 step's products at 17 GB/s, and this brought them
 * to 33 (4.0 against 7.8 ms; 1 and 2 KiB ahead were slower, 8 and 16 no faster). int8 codes are
 * one stream (a line per step of a tile), float32 rows one stream each. */
#define PREFETCH 4096
#define PREFETCH_int8(w, step_o, O) _mm_prefetch((const char *)(w) + PREFETCH, _MM_HINT_T0)
#define PREFETCH_f32(w, step_o, O) \
    for (int o = 0; o < O; o++) _mm_prefetch((const char *)((w) + o * (step_o)) + PREFETCH, _MM_HINT_T0)

#define PRODUCT_TILE(name, type, LOAD, R, O)                                                           \
    static inline void name##_##R##_##O(const float *x, int64_t r0, int64_t in, const type *w,        \
                                        int64_t step_o, int64_t step_k, const float *scale, float *y, \
                                        int64_t out, int64_t o0) {                                    \
        vec_t acc[R][O];                                                                               \
        for (int r = 0; r < R; r++)                                                                   \
            for (int o = 0; o < O; o++) acc[r][o] = VZERO();                                         \
        const float *x0 = x + r0 * in;                                                                 \
        for (int64_t k = 0; k < in; k += WIDTH, w += step_k) {                                        \
            PREFETCH_##name(w, step_o, O);                                                             \
            vec_t wv[O];                                                                               \
            for (int o = 0; o < O; o++) wv[o] = LOAD(w + o * step_o);                                 \
            for (int r = 0; r < R; r++) {                                                             \
                vec_t xv = VLOAD(x0 + r * in + k);                                                   \
                for (int o = 0; o < O; o++) acc[r][o] = VFMA(xv, wv[o], acc[r][o]);                   \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; r++)                                                                   \
            for (int o = 0; o < O; o++) {                                                             \
                float sum = VSUM(acc[r][o]);                                                           \
                y[(r0 + r) * out + o0 + o] = scale ? sum * scale[o0 + o] : sum;                       \
            }                                                                                          \
    }

/* The tiles of one weight type, and the outputs [o0, o0 + BLOCK) of every row by them, in tiles of
 * up to 4 rows by 4 or 2 outputs. The weights of a group of 4 outputs from o start at q + o * in
 * in both layouts (row-major, and packed in groups of PACK = 4). */
#define PRODUCT(name, type, LOAD)                                                                      \
    PRODUCT_TILE(name, type, LOAD, 1, 4)                                                               \
    PRODUCT_TILE(name, type, LOAD, 2, 4)                                                               \
    PRODUCT_TILE(name, type, LOAD, 3, 2)                                                               \
    PRODUCT_TILE(name, type, LOAD, 4, 2)                                                               \
    static void name##_block(const float *x, int64_t rows, int64_t in, const type *q, int64_t step_o,  \
                             int64_t step_k, const float *scale, float *y, int64_t out, int64_t o0) { \
        for (int64_t r = 0; r < rows;) {                                                               \
            int64_t left = rows - r;                                                                   \
            for (int64_t o = o0; o < o0 + BLOCK; o += 4) {                                            \
                const type *w = q + o * in, *w2 = w + 2 * step_o;                                     \
                if (left >= 4) {                                                                       \
                    name##_4_2(x, r, in, w, step_o, step_k, scale, y, out, o);                         \
                    name##_4_2(x, r, in, w2, step_o, step_k, scale, y, out, o + 2);                    \
                } else if (left == 3) {                                                                \
                    name##_3_2(x, r, in, w, step_o, step_k, scale, y, out, o);                         \
                    name##_3_2(x, r, in, w2, step_o, step_k, scale, y, out, o + 2);                    \
                } else if (left == 2) {                                                                \
                    name##_2_4(x, r, in, w, step_o, step_k, scale, y, out, o);                         \
                } else {                                                                               \
                    name##_1_4(x, r, in, w, step_o, step_k, scale, y, out, o);                         \
                }                                                                                      \
            }                                                                                          \
            r += left >= 4 ? 4 : left;                                                                 \
        }                                                                                              \
    }

PRODUCT(int8, int8_t, widen)
PRODUCT(f32, float, VLOAD)

/* bfloat16 weights, by AVX-512 BF16 dot products. Each instruction multiplies a pair of a row's
 * inputs (two bfloat16 in 32 bits, broadcast) by the same pair of inputs of 16 outputs and adds
 * both products to the outputs' 16 float32 sums: the sums are the outputs themselves, so nothing
 * is summed across lanes at the end, and the weights are never widened. w is packed for it
 * (agent/decode_kernel.py's `pack_bf16`): the outputs in blocks of BF16_BLOCK (the last block the
 * rest, a multiple of 16), and a block's weights by pairs of inputs, w[k / 2][o][k % 2] (the
 * layout of lora_kernel.c's pairs), one sequential stream per block and blocks one after another.
 * The rows are bfloat16 too, as PyTorch's bfloat16 products take them: x [rows, in / 2] pairs.
 * On 2 AVX-512 BF16 EPYC cores the embedded model's products of a step (one call per product)
 * took 5.9 ms for 1 row and 7.5 for 16, against 11.4 and 15.1 by PyTorch's bfloat16 F.linear
 * (scratch). */
#ifdef __AVX512BF16__
#define BF16_BLOCK 48

/* y[r][0:16 nv] = x[r] . w's nv vectors of 16 outputs, for nr rows (x[r] at x + r * pairs); nr and
 * nv constants where inlined, so that the nr * nv sums stay in registers */
static inline __attribute__((always_inline)) void bf16_tile(const uint32_t *x, int64_t pairs, const int nr,
                                                            const int nv, const uint32_t *w, float *y, int64_t out) {
    __m512 sum[8][3];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) sum[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const uint32_t *wp = w + p * nv * 16;
        __m512bh wv[3];
        for (int v = 0; v < nv; v++) {
            _mm_prefetch((const char *)(wp + 16 * v) + PREFETCH, _MM_HINT_T0);
            wv[v] = (__m512bh)_mm512_loadu_si512(wp + 16 * v);
        }
        for (int r = 0; r < nr; r++) {
            __m512bh xr = (__m512bh)_mm512_set1_epi32((int)x[r * pairs + p]);
            for (int v = 0; v < nv; v++) sum[r][v] = _mm512_dpbf16_ps(sum[r][v], xr, wv[v]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(y + r * out + 16 * v, sum[r][v]);
}

#define BF16_CASE(R, V)                         \
    case R * 4 + V:                             \
        bf16_tile(x, pairs, R, V, w, y, out); \
        return;
#define BF16_CASES(R) BF16_CASE(R, 1) BF16_CASE(R, 2) BF16_CASE(R, 3)

static void bf16_rows(const uint32_t *x, int64_t pairs, int64_t nr, int64_t nv, const uint32_t *w, float *y,
                      int64_t out) {
    switch (nr * 4 + nv) { BF16_CASES(1) BF16_CASES(2) BF16_CASES(4) BF16_CASES(8) }
}

/* the outputs of block b (of BF16_BLOCK) for every row: tiles of 8 rows, then 4, 2, 1 */
static void bf16_block(const uint32_t *x, int64_t rows, int64_t in, const uint16_t *w, float *y, int64_t out,
                       int64_t b) {
    const int64_t pairs = in / 2, o0 = b * BF16_BLOCK, nv = (out - o0 < BF16_BLOCK ? out - o0 : BF16_BLOCK) / 16;
    const uint32_t *wb = (const uint32_t *)(w + o0 * in);
    for (int64_t r = 0; r < rows;) {
        int64_t nr = rows - r >= 8 ? 8 : rows - r >= 4 ? 4 : rows - r >= 2 ? 2 : 1;
        bf16_rows(x + r * pairs, pairs, nr, nv, wb, y + r * out + o0, out);
        r += nr;
    }
}

/* x [rows, n] float32 -> xb [rows, n] bfloat16, rounded to nearest even as PyTorch rounds (n a
 * multiple of 16) */
static void rows_to_bf16_pairs(const float *x, int64_t rows, int64_t n, uint16_t *xb) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = r * n; i < (r + 1) * n; i += 16)
            _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

int bf16_products(void) { return 1; }
#else
int bf16_products(void) { return 0; }
#endif

/* A weight matrix [out, in] as a whole decode step reads it: float32 row-major when neither scale
 * nor bf16, bfloat16 packed (above) when bf16, else int8 packed (above) with a float32 scale per
 * output row. */
typedef struct {
    const void *w;
    const float *scale;
    int64_t out, in, bf16;
} weight_t;

/* y [rows, out] = x [rows, in] @ w^T, by the threads of the team it is called in (an orphaned
 * `omp for`, which runs on the calling thread alone outside a parallel region); out is a
 * multiple of BLOCK and in of WIDTH (agent/decode_kernel.py checks). For bfloat16 weights the
 * rows are first rounded to bfloat16 into xb [rows, in] (a barrier), unless x is NULL: then xb
 * holds them already. */
static void product(const weight_t *w, const float *x, int64_t rows, float *y, uint16_t *xb) {
#ifdef __AVX512BF16__
    if (w->bf16) {
        if (x) rows_to_bf16_pairs(x, rows, w->in, xb);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (w->out + BF16_BLOCK - 1) / BF16_BLOCK; b++)
            bf16_block((const uint32_t *)xb, rows, w->in, (const uint16_t *)w->w, y, w->out, b);
        return;
    }
#endif
#pragma omp for schedule(static)
    for (int64_t o = 0; o < w->out; o += BLOCK) {
        if (w->scale)
            int8_block(x, rows, w->in, (const int8_t *)w->w, WIDTH, WIDTH * PACK, w->scale, y, w->out, o);
        else
            f32_block(x, rows, w->in, (const float *)w->w, w->in, WIDTH, NULL, y, w->out, o);
    }
}

void int8_product(const float *x, int64_t rows, int64_t in, const int8_t *q, const float *scale, float *y,
                  int64_t out, int threads) {
    weight_t w = {q, scale, out, in, 0};
#pragma omp parallel num_threads(threads)
    product(&w, x, rows, y, NULL);
}

void f32_product(const float *x, int64_t rows, int64_t in, const float *w, float *y, int64_t out, int threads) {
    weight_t weight = {w, NULL, out, in, 0};
#pragma omp parallel num_threads(threads)
    product(&weight, x, rows, y, NULL);
}

/* y [rows, out] float32 = xb [rows, in] bfloat16 @ w^T, w bfloat16 packed: called only where
 * bf16_products() (agent/decode_kernel.py's `takes`) */
void bf16_product(const uint16_t *xb, int64_t rows, int64_t in, const uint16_t *w, float *y, int64_t out,
                  int threads) {
    weight_t weight = {w, NULL, out, in, 1};
#pragma omp parallel num_threads(threads)
    product(&weight, NULL, rows, y, (uint16_t *)xb);
}

/* e^x for x <= 0 (a softmax's shifted scores), 8 at a time: x = n ln 2 + r, e^r by Cephes's
 * polynomial, 2^n into the exponent; within 2 ulp of expf, 0 below -87. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* x [d] rotated by RoPE at one position (cos, sin [d], the halves' pairs as Llama pairs them) */
static inline void rope(const float *x, const float *cos, const float *sin, float *out, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int64_t i = half; i < d; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* scores[j] = (q . keys[j]) * scale for j in [0, length), keys [length, d], d a multiple of 8:
 * four keys at a time, so that four chains of multiply-adds run side by side (one key's chain
 * alone waits on each add's latency). */
static void scores_of(const float *q, const float *keys, int64_t length, int64_t d, float scale, float *scores) {
    int64_t j = 0;
    for (; j + 4 <= length; j += 4) {
        const float *k = keys + j * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < d; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * d + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * d + i), a3);
        }
        scores[j] = hsum(a0) * scale, scores[j + 1] = hsum(a1) * scale;
        scores[j + 2] = hsum(a2) * scale, scores[j + 3] = hsum(a3) * scale;
    }
    for (; j < length; j++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + j * d + i), a);
        scores[j] = hsum(a) * scale;
    }
}

/* out[0:d] = sum over j of weights[j] * values[j] * norm, values [length, d]: 8 values of a row at
 * a time in registers, each a chain of its own */
static void weighted_sum(const float *weights, const float *values, int64_t length, int64_t d, float norm,
                         float *out) {
    for (int64_t i0 = 0; i0 < d; i0 += 64) {
        int64_t n = d - i0 < 64 ? (d - i0) / 8 : 8;
        __m256 acc[8];
        for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
        for (int64_t j = 0; j < length; j++) {
            __m256 w = _mm256_set1_ps(weights[j]);
            const float *row = values + j * d + i0;
            if (n == 8)
                for (int v = 0; v < 8; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * v), acc[v]);
            else
                for (int v = 0; v < n; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * v), acc[v]);
        }
        for (int v = 0; v < n; v++) _mm256_storeu_ps(out + i0 + 8 * v, _mm256_mul_ps(acc[v], _mm256_set1_ps(norm)));
    }
}

/* One decode step's attention in one layer, for the sequences in slots [0, rows) of the cache:
 * qkv [rows, (heads + 2 * kv_heads) * d] as projected (q, k, v heads of d values, before RoPE);
 * sequence b's new token is at positions[b], and cos, sin [max_length, d] the RoPE tables. Its k
 * (rotated) and v go to position positions[b] of slot b of k_cache, v_cache [slots, kv_heads,
 * max_length, d]; each of its query heads (rotated) attends to its keys [0, positions[b]], query
 * head h to key head h / (heads / kv_heads); out [rows, heads * d]. */
static void attention_team(const float *qkv, const int64_t *positions, int64_t rows, int64_t heads,
                           int64_t kv_heads, int64_t d, const float *cos, const float *sin, float *k_cache,
                           float *v_cache, int64_t max_length, float *out) {
    const int64_t width = (heads + 2 * kv_heads) * d, group = heads / kv_heads;
    const float scale = 1.f / sqrtf((float)d);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows * kv_heads; t++) { /* the new keys and values into the cache */
        int64_t b = t / kv_heads, h = t % kv_heads, p = positions[b];
        const float *k = qkv + b * width + (heads + h) * d, *v = k + kv_heads * d;
        int64_t at = ((b * kv_heads + h) * max_length + p) * d;
        rope(k, cos + p * d, sin + p * d, k_cache + at, d);
        memcpy(v_cache + at, v, sizeof(float) * d);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows * heads; t++) {
        int64_t b = t / heads, h = t % heads, p = positions[b], length = p + 1;
        int64_t head = (b * kv_heads + h / group) * max_length * d;
        const float *keys = k_cache + head, *values = v_cache + head;
        float q[d], weights[(length + 7) / 8 * 8];
        rope(qkv + b * width + h * d, cos + p * d, sin + p * d, q, d);
        scores_of(q, keys, length, d, scale, weights);
        float top = -INFINITY;
        for (int64_t j = 0; j < length; j++) top = weights[j] > top ? weights[j] : top;
        for (int64_t j = length; j % 8; j++) weights[j] = -INFINITY;
        __m256 total = _mm256_setzero_ps(), shift = _mm256_set1_ps(top);
        for (int64_t j = 0; j < length; j += 8) {
            __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(weights + j), shift));
            _mm256_storeu_ps(weights + j, e);
            total = _mm256_add_ps(total, e);
        }
        weighted_sum(weights, values, length, d, 1.f / hsum(total), out + b * heads * d + h * d);
    }
}

void attention(const float *qkv, const int64_t *positions, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d,
               const float *cos, const float *sin, float *k_cache, float *v_cache, int64_t max_length, float *out,
               int threads) {
#pragma omp parallel num_threads(threads)
    attention_team(qkv, positions, rows, heads, kv_heads, d, cos, sin, k_cache, v_cache, max_length, out);
}

/* The residual stream's step between two products, for row r of a decode step: x [n] += delta [n]
 * (unless delta is NULL), then h = RMSNorm(x) as Llama computes it in float32,
 * w * (x / sqrt(mean(x^2) + eps)). */
static void add_rms_norm_row(float *xr, const float *delta, const float *w, float eps, float *hr, int64_t n) {
    if (delta)
        for (int64_t i = 0; i < n; i++) xr[i] += delta[i];
    __m256 squares = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(xr + i);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    float sum = hsum(squares);
    for (; i < n; i++) sum += xr[i] * xr[i];
    float scale = 1.f / sqrtf(sum / (float)n + eps);
    for (i = 0; i < n; i++) hr[i] = w[i] * (xr[i] * scale);
}

/* add_rms_norm_row for rows [rows, n] (delta NULL or [rows, n]), on the calling thread: a few
 * thousand values. */
void add_rms_norm(float *x, const float *delta, const float *w, float eps, float *h, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) add_rms_norm_row(x + r * n, delta ? delta + r * n : NULL, w, eps, h + r * n, n);
}

/* silu(g) * u for 8 values: g * sigmoid(g), sigmoid from e = e^-|g| (never overflows) */
static inline __m256 silu_times(__m256 g, __m256 u) {
    __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.f), g);
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), magnitude));
    __m256 one = _mm256_set1_ps(1.f), denominator = _mm256_add_ps(one, e);
    __m256 positive = _mm256_div_ps(one, denominator), negative = _mm256_div_ps(e, denominator);
    __m256 sigmoid = _mm256_blendv_ps(positive, negative, g); /* by g's sign bit */
    return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u);
}

/* A whole decode step: every layer and the LM head in one parallel region, one call from Python
 * for a step instead of about 400 (each product, attention, norm and LoRA update a call of its
 * own, and a parallel region each). The parts are those above, as orphaned worksharing loops,
 * so that a barrier separates each from the next; the arithmetic is theirs, in the same order
 * as agent/llama.py's step by parts, whose tokens it gives. */

typedef struct {
    weight_t qkv, o, gate_up, down;                           /* fused as agent/llama.py fuses them */
    const float *input_norm, *post_attention_norm, *next_norm; /* next: the next layer's input norm, or the final */
} layer_t;

typedef struct {
    int64_t layers, hidden, intermediate, heads, kv_heads, head_dim;
    float eps;
    const layer_t *layer;
    weight_t lm_head;
} model_t;

/* The step of `rows` sequences, float32: x [rows, hidden] their new tokens' embeddings (the
 * residual stream, updated in place); row b at positions[b] of slot b of each layer's cache
 * (k_cache[l], v_cache[l] [slots, kv_heads, max_length, head_dim]; RoPE's cos, sin [max_length,
 * head_dim]); lora NULL, or [layers * 4] input groups (attn_in, attn_out, mlp_in, mlp_out of each
 * layer), each the step's adapters' groups [adapters] (NULL where none has it), whose rows by
 * adapter are order and starts (as lora_team's). Writes logits [rows, vocab]. */
void decode_step(const model_t *m, float *x, int64_t rows, const int64_t *positions, float *const *k_cache,
                 float *const *v_cache, const float *cos, const float *sin, int64_t max_length,
                 const group_t *const *const *lora, int64_t adapters, const int64_t *order, const int64_t *starts,
                 float *logits, int threads) {
    const int64_t hidden = m->hidden, inter = m->intermediate, d = m->head_dim;
    const int64_t width = m->layer[0].qkv.out, q_size = m->heads * d;
    int64_t cols = 0, in; /* the widest group of the step's adapters */
    for (int64_t i = 0; lora && i < m->layers * 4; i++) {
        int64_t widest_here = lora[i] ? widest(lora[i], adapters, &in) : 0;
        cols = widest_here > cols ? widest_here : cols;
    }
    const int64_t listed = lora ? starts[adapters] : 0;
    float *h = malloc(sizeof(float) * rows * (2 * hidden + width + q_size + 3 * inter));
    float *out = h + rows * hidden, *qkv = out + rows * hidden, *attended = qkv + rows * width;
    float *gate_up = attended + rows * q_size, *act = gate_up + rows * 2 * inter;
    float *xa = malloc(sizeof(float) * (2 * listed * cols + 1));
    uint16_t *xb = malloc(sizeof(uint16_t) * rows * (inter > q_size ? inter : q_size > hidden ? q_size : hidden));
    const float **x_of = malloc(sizeof(float *) * (3 * listed + 1)); /* the listed rows of h, attended, act */
    const float **of_h = x_of, **of_attended = x_of + listed, **of_act = x_of + 2 * listed;
    for (int64_t i = 0; i < listed; i++) {
        of_h[i] = h + order[i] * hidden;
        of_attended[i] = attended + order[i] * q_size;
        of_act[i] = act + order[i] * inter;
    }
    const group_t *const *none[4] = {NULL, NULL, NULL, NULL};

#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            add_rms_norm_row(x + r * hidden, NULL, m->layer[0].input_norm, m->eps, h + r * hidden, hidden);
        for (int64_t l = 0; l < m->layers; l++) {
            const layer_t *layer = &m->layer[l];
            const group_t *const *const *g = lora ? lora + 4 * l : none;
            product(&layer->qkv, h, rows, qkv, xb);
            lora_team(g[0], qkv, width, of_h, 0, adapters, order, starts, xa, cols);
            attention_team(qkv, positions, rows, m->heads, m->kv_heads, d, cos, sin, k_cache[l], v_cache[l], max_length,
                           attended);
            product(&layer->o, attended, rows, out, xb);
            lora_team(g[1], out, hidden, of_attended, 0, adapters, order, starts, xa, cols);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                add_rms_norm_row(x + r * hidden, out + r * hidden, layer->post_attention_norm, m->eps, h + r * hidden,
                                 hidden);
            product(&layer->gate_up, h, rows, gate_up, xb);
            lora_team(g[2], gate_up, 2 * inter, of_h, 0, adapters, order, starts, xa, cols);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * inter; i += 8) { /* inter is a multiple of 8 */
                const float *gate = gate_up + i / inter * 2 * inter + i % inter;
                _mm256_storeu_ps(act + i, silu_times(_mm256_loadu_ps(gate), _mm256_loadu_ps(gate + inter)));
            }
            product(&layer->down, act, rows, out, xb);
            lora_team(g[3], out, hidden, of_act, 0, adapters, order, starts, xa, cols);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                add_rms_norm_row(x + r * hidden, out + r * hidden, layer->next_norm, m->eps, h + r * hidden, hidden);
        }
        product(&m->lm_head, h, rows, logits, xb);
    }
    free(h);
    free(xa);
    free(xb);
    free(x_of);
}
