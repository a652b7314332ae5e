/* A decode step on the CPU, for its few rows (float32), in three parts that agent/decode_kernel.py
 * calls: the matrix products, the attention of a layer (`attention`, below), and the residual
 * stream's add and RMSNorm (`add_rms_norm`, last).
 *
 * The products: y[rows, out] = x[rows, in] @ w^T, w [out, in] either
 *   - float32, row-major as PyTorch holds it (`f32_product`), or
 *   - int8 with a float32 scale per output row, w = q * scale (`int8_product`), q packed: outputs
 *     in groups of PACK rows, and within a group the inputs in chunks of 8, each chunk holding
 *     those 8 inputs of the group's PACK rows one after another, q[g][k / 8][o][k % 8] for output
 *     g * PACK + o, so that a tile reads its weights as one sequential stream (row-major int8
 *     rows of 576 inputs are 9 cache lines: too short for the hardware prefetcher, which read
 *     them at less than half the speed).
 *
 * A decode step reads every weight once, so its products are bound by reading w: each weight is
 * loaded (and widened to float32) once per tile of up to 4 rows and multiplied into each of the
 * tile's rows (AVX2 and FMA, 8 weights a vector). The outputs are split into blocks, one OpenMP
 * task each, on the team PyTorch's own threads use (agent/native.py loads the library after
 * torch); a block's weights stay in the core's cache while the tiles of rows go over them, so
 * they come from memory once whatever the number of rows. agent/decode_kernel.py calls it. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PACK 4   /* int8: output rows per group */
#define BLOCK 16 /* output rows of one task: a multiple of PACK and of every tile's outputs */

static inline __m256 widen(const int8_t *p) { /* 8 int8 -> 8 float32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[r0 + r][o0 + o] (times scale[o0 + o] when scale is not NULL) for R rows of x from row r0 and
 * O outputs from o0, whose 8 weights of inputs [k, k + 8) start at w + o * step_o + k / 8 * step_k
 * (elements of `type`, loaded by LOAD); accumulated in R * O vector registers (R * O + O + 1 of
 * the 16 AVX2 ones). */
#define TILE(name, type, LOAD, R, O)                                                                   \
    static inline void name##_##R##_##O(const float *x, int64_t r0, int64_t in, const type *w,        \
                                        int64_t step_o, int64_t step_k, const float *scale, float *y, \
                                        int64_t out, int64_t o0) {                                    \
        __m256 acc[R][O];                                                                              \
        for (int r = 0; r < R; r++)                                                                   \
            for (int o = 0; o < O; o++) acc[r][o] = _mm256_setzero_ps();                             \
        const float *x0 = x + r0 * in;                                                                 \
        for (int64_t k = 0; k < in; k += 8, w += step_k) {                                            \
            __m256 wv[O];                                                                              \
            for (int o = 0; o < O; o++) wv[o] = LOAD(w + o * step_o);                                 \
            for (int r = 0; r < R; r++) {                                                             \
                __m256 xv = _mm256_loadu_ps(x0 + r * in + k);                                        \
                for (int o = 0; o < O; o++) acc[r][o] = _mm256_fmadd_ps(xv, wv[o], acc[r][o]);       \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; r++)                                                                   \
            for (int o = 0; o < O; o++) {                                                             \
                float sum = hsum(acc[r][o]);                                                           \
                y[(r0 + r) * out + o0 + o] = scale ? sum * scale[o0 + o] : sum;                       \
            }                                                                                          \
    }

/* The tiles of one weight type, and the outputs [o0, o0 + BLOCK) of every row by them, in tiles of
 * up to 4 rows by 4 or 2 outputs. The weights of a group of 4 outputs from o start at q + o * in
 * in both layouts (row-major, and packed in groups of PACK = 4). */
#define PRODUCT(name, type, LOAD)                                                                      \
    TILE(name, type, LOAD, 1, 4)                                                                       \
    TILE(name, type, LOAD, 2, 4)                                                                       \
    TILE(name, type, LOAD, 3, 2)                                                                       \
    TILE(name, type, LOAD, 4, 2)                                                                       \
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
PRODUCT(f32, float, _mm256_loadu_ps)

/* out must be a multiple of BLOCK and in of 8 (agent/decode_kernel.py checks). */
void int8_product(const float *x, int64_t rows, int64_t in, const int8_t *q, const float *scale, float *y,
                  int64_t out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += BLOCK) int8_block(x, rows, in, q, 8, 8 * PACK, scale, y, out, o);
}

void f32_product(const float *x, int64_t rows, int64_t in, const float *w, float *y, int64_t out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += BLOCK) f32_block(x, rows, in, w, in, 8, NULL, y, out, o);
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
void attention(const float *qkv, const int64_t *positions, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d,
               const float *cos, const float *sin, float *k_cache, float *v_cache, int64_t max_length, float *out,
               int threads) {
    const int64_t width = (heads + 2 * kv_heads) * d, group = heads / kv_heads;
    const float scale = 1.f / sqrtf((float)d);
#pragma omp parallel num_threads(threads)
    {
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
}

/* The residual stream's step between two products, for a decode step's rows: x [rows, n] += delta
 * [rows, n] (unless delta is NULL), then h = RMSNorm(x) as Llama computes it in float32,
 * w * (x / sqrt(mean(x^2) + eps)). On the calling thread: a few thousand values. */
void add_rms_norm(float *x, const float *delta, const float *w, float eps, float *h, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * n, *hr = h + r * n;
        if (delta)
            for (int64_t i = 0; i < n; i++) xr[i] += delta[r * n + i];
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
}
