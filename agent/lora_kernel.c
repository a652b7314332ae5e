/* The LoRA updates of one input group of one layer, for the few rows of a decode step, each row
 * with its own adapter: out[row, projection's slice] += (x[row] @ A) @ B, every adapter's A and B
 * read once for all of its rows, where the adapter holds them (nothing is stacked or copied).
 * agent/lora_kernel.py compiles it for the CPU it runs on and calls it once per layer and input
 * group; float32 arithmetic on bfloat16 or float32 values (each adapter's matrices in their own,
 * the rows in theirs). agent/decode_kernel.c includes it for the whole decode step; a prefill's
 * rows of one adapter are `lora_rows`' (last).
 *
 * Two phases in one OpenMP region, on the team PyTorch's own threads use (the library is loaded
 * after torch, whose libgomp it then shares):
 *   1. xa = x @ A for each adapter's rows, its inputs split in two halves, one per task, so that
 *      one adapter keeps both threads busy;
 *   2. for each projection, adapter and chunk of output columns: xa's columns of that
 *      projection @ B, added to the rows' outputs.
 * Both are register tiles of RB rows by TW columns, accumulating one input (or rank) at a time:
 * x @ A has 16-48 columns and @ B sums over the rank (16), shapes for which a general matrix
 * product spends more on its calls and packing than on the arithmetic. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#define VEC 16
#else
#define VEC 8
#endif
#define TW (3 * VEC)    /* columns of a register tile: 3 vectors */
#define RB 4            /* rows of a register tile */
#define CHUNK (4 * TW)  /* output columns of one task of phase 2 */
/* A tile prefetches its matrix's lines `ahead` bytes on from those it reads (the engine serving 8
 * tenants on 2 AVX-512 Xeon cores spent 13.3 ms a step in these updates without, 7.7 with A's):
 * A_AHEAD in A, whose rows a tile reads one after another, and in B the next tile's columns. */
#define A_AHEAD 4096

typedef struct {
    const void *b;   /* [width, size]: this projection's B, transposed */
    int64_t col;     /* its first column in xa */
    int64_t width;   /* its columns in xa (the rank) */
    int64_t offset;  /* its first column in the fused output */
    int64_t size;    /* its output columns */
} projection_t;

typedef struct {     /* one adapter's group */
    const void *a;   /* [in, cols]: the group's A, transposed */
    int64_t in, cols, projections;
    int64_t bf16;    /* its A and B are bfloat16 in pairs of rows (tile_pairs), else float32 */
    projection_t projection[3];
} group_t;

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* acc[r][0:n] = sum over k in [k0, k1) of x[r][k] * m[k][0:n], for nr <= RB rows and n <= TW
 * columns of m, prefetching m's lines `ahead` bytes on from each row read; m's rows `stride`
 * elements apart, either
 *   - float32 (tile_f32): m[k][c] at m[k * stride + c], or
 *   - bfloat16 in pairs of rows (tile_pairs; agent/lora_kernel.py's `pairs`): rows 2p and 2p + 1
 *     interleaved, m[k][c] the low (k even) or high half of the 32-bit m[k / 2 * stride + c], as
 *     AMX tiles read a matrix they multiply by (`lora_rows`); k0 and k1 even.
 * Tiles of 1 to RB rows by 1 to 3 whole vectors take a loop of constant bounds each (one row for a
 * single stream, two for 8 tenants' 16 rows; 16, 32 or 48 columns of A for rank 16), which the
 * compiler unrolls into registers; other shapes take the general loop. */
#define F32_ADD(sum, xr, k, w) sum += xr[k] * (w)
#define PAIRS_ADD(sum, xr, k, w)              \
    sum += xr[k] * from_bits((w) << 16);      \
    sum += xr[k + 1] * from_bits((w) & 0xffff0000u)
#define TILE(name, type, STEP, ADD)                                                                    \
    static inline __attribute__((always_inline)) void name##_fixed(                                   \
        float acc[RB][TW], const float *const *x, const int nr, const int nv, const type *m,           \
        int64_t stride, int64_t k0, int64_t k1, int64_t ahead) {                                    \
        float sum[RB][TW] = {{0}}; /* in registers, stored once */                                  \
        for (int64_t k = k0; k < k1; k += STEP) {                                                   \
            const type *restrict mk = m + k / STEP * stride;                                        \
            for (int v = 0; v < nv * VEC * (int)sizeof(type); v += 64)                              \
                __builtin_prefetch((const char *)mk + ahead + v);                                   \
            for (int r = 0; r < nr; r++)                                                            \
                for (int v = 0; v < nv * VEC; v++) { ADD(sum[r][v], x[r], k, mk[v]); }             \
        }                                                                                           \
        for (int r = 0; r < nr; r++)                                                                \
            for (int v = 0; v < nv * VEC; v++) acc[r][v] = sum[r][v];                               \
    }                                                                                               \
    static inline void name(float acc[RB][TW], const float *const *x, int64_t nr, const type *m,      \
                            int64_t stride, int64_t k0, int64_t k1, int64_t n, int64_t ahead) {        \
        if (n % VEC == 0) {                                                                            \
            switch (nr * 4 + n / VEC) {                                                                \
                FIXED(name, 1) FIXED(name, 2) FIXED(name, 3) FIXED(name, 4)                            \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < nr; r++)                                                                   \
            for (int v = 0; v < n; v++) acc[r][v] = 0.f;                                               \
        for (int64_t k = k0; k < k1; k += STEP) {                                                      \
            const type *restrict mk = m + k / STEP * stride;                                           \
            for (int r = 0; r < nr; r++)                                                               \
                for (int v = 0; v < n; v++) { ADD(acc[r][v], x[r], k, mk[v]); }                       \
        }                                                                                              \
    }
#define CASE(name, nr, nv) \
    case nr * 4 + nv:      \
        name##_fixed(acc, x, nr, nv, m, stride, k0, k1, ahead); \
        return;
#define FIXED(name, nr) CASE(name, nr, 1) CASE(name, nr, 2) CASE(name, nr, 3)
TILE(tile_f32, float, 1, F32_ADD)
TILE(tile_pairs, uint32_t, 2, PAIRS_ADD)

/* the tile of the matrix m from its column `at` (float32, or bfloat16 in pairs of rows when bf16) */
static inline void tile(float acc[RB][TW], const float *const *x, int64_t nr, const void *m, int bf16, int64_t at,
                        int64_t stride, int64_t k0, int64_t k1, int64_t n, int64_t ahead) {
    if (bf16)
        tile_pairs(acc, x, nr, (const uint32_t *)m + at, stride, k0, k1, n, ahead);
    else
        tile_f32(acc, x, nr, (const float *)m + at, stride, k0, k1, n, ahead);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The updates of one group by the threads of the team it is called in (orphaned `omp for`s, two
 * barriers): g[i] is adapter i's group (NULL where it has none), its rows order[starts[i]:starts[i
 * + 1]] (rows of out [.., out_stride]), none where g is NULL; the input of the i-th listed row is x_of[i] (float32,
 * [in]); xa [2, rows, stride] is scratch for the listed rows, stride at least every group's cols.
 * out is bfloat16 when out_bf16, else float32; each adapter's matrices are in their own dtype
 * (group_t's bf16). */
static void lora_team(const group_t *const *g, void *out, int64_t out_stride, const float *const *x_of, int out_bf16,
                      int64_t adapters, const int64_t *order, const int64_t *starts, float *xa, int64_t stride) {
    if (!g) return;
    int64_t tasks = 0;
    for (int64_t i = 0; i < adapters; i++)
        for (int64_t p = 0; g[i] && p < g[i]->projections; p++) tasks += (g[i]->projection[p].size + CHUNK - 1) / CHUNK;

    /* phase 1, xa = x @ A: each adapter's inputs in two halves, a task each, whose sums go to the
     * two halves of xa and are added in phase 2 (no barrier for them). Split by columns instead, an
     * adapter's 16 columns of o_proj's or down_proj's A left one thread idle: on 2 AVX-512 Xeon
     * cores a whole int8 step's updates (bfloat16 adapters) took 0.87 ms against 0.66 for a single
     * stream, 3.25 against 2.57 for 4 tenants' rows. */
    const int64_t half = starts[adapters] * stride; /* xa's second half */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < adapters * 2; t++) {
        const group_t *a = g[t / 2];
        if (!a) continue;
        int64_t mid = a->in / 4 * 2, k0 = t % 2 ? mid : 0, k1 = t % 2 ? a->in : mid; /* even */
        float *sums = xa + t % 2 * half;
        for (int64_t i0 = starts[t / 2]; i0 < starts[t / 2 + 1]; i0 += RB) {
            int64_t nr = min64(starts[t / 2 + 1] - i0, RB);
            for (int64_t c0 = 0; c0 < a->cols; c0 += TW) {
                int64_t n = min64(a->cols - c0, TW);
                float acc[RB][TW];
                tile(acc, x_of + i0, nr, a->a, a->bf16, c0, a->cols, k0, k1, n, A_AHEAD);
                for (int64_t r = 0; r < nr; r++) memcpy(sums + (i0 + r) * stride + c0, acc[r], sizeof(float) * n);
            }
        }
    }

    /* phase 2, out += xa @ B: tasks of (adapter, projection, chunk of output columns) */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t task = t, adapter = 0, p = 0, chunks = 0;
        for (;; adapter++) { /* task -> (adapter, projection, chunk) */
            for (p = 0; g[adapter] && p < g[adapter]->projections; p++) {
                chunks = (g[adapter]->projection[p].size + CHUNK - 1) / CHUNK;
                if (task < chunks) break;
                task -= chunks;
            }
            if (g[adapter] && p < g[adapter]->projections) break;
        }
        const projection_t *pr = &g[adapter]->projection[p];
        const int bf16 = g[adapter]->bf16;
        int64_t j0 = task * CHUNK, j1 = min64(pr->size, j0 + CHUNK), end = starts[adapter + 1];
        for (int64_t i0 = starts[adapter]; i0 < end; i0 += RB) {
            int64_t nr = min64(end - i0, RB);
            float xs[RB][pr->width]; /* the rows' xa: the two halves' sums added */
            const float *xa_of[RB];
            for (int64_t r = 0; r < nr; r++) {
                const float *x0 = xa + (i0 + r) * stride + pr->col, *x1 = x0 + half;
                for (int64_t k = 0; k < pr->width; k++) xs[r][k] = x0[k] + x1[k];
                xa_of[r] = xs[r];
            }
            for (int64_t j = j0; j < j1; j += TW) {
                int64_t n = min64(j1 - j, TW);
                float acc[RB][TW];
                tile(acc, xa_of, nr, pr->b, bf16, j, pr->size, 0, pr->width, n, TW * 4);
                for (int64_t r = 0; r < nr; r++) {
                    int64_t at = order[i0 + r] * out_stride + pr->offset + j;
                    if (out_bf16) {
                        uint16_t *o = (uint16_t *)out + at;
                        for (int64_t v = 0; v < n; v++) o[v] = to_bf16(from_bf16(o[v]) + acc[r][v]);
                    } else {
                        float *o = (float *)out + at;
                        for (int64_t v = 0; v < n; v++) o[v] += acc[r][v];
                    }
                }
            }
        }
    }
}

/* The widest group of g [adapters] (their columns of xa), and its inputs in `in` (the same for
 * every adapter of a group); 0 where none has the group. */
static int64_t widest(const group_t *const *g, int64_t adapters, int64_t *in) {
    int64_t cols = 0;
    for (int64_t i = 0; i < adapters; i++)
        if (g[i]) {
            cols = g[i]->cols > cols ? g[i]->cols : cols;
            *in = g[i]->in;
        }
    return cols;
}

/* One group's updates in a parallel region of its own: x is [x_rows, in] and out [x_rows,
 * out_stride], both bfloat16 when bf16, else float32 (the rest as lora_team's). */
void lora_group(const group_t *const *g, void *out, int64_t out_stride, const void *x, int64_t x_rows, int bf16,
                int64_t adapters, const int64_t *order, const int64_t *starts, int threads) {
    int64_t in = 0, stride = widest(g, adapters, &in), rows = starts[adapters];
    float *xa = malloc(sizeof(float) * (2 * rows * stride + 1));
    const float **x_of = malloc(sizeof(float *) * (rows + 1));
    float *x32 = NULL;
    const float *xs = x;
    if (bf16) {
        x32 = malloc(sizeof(float) * x_rows * in);
        for (int64_t i = 0; i < x_rows * in; i++) x32[i] = from_bf16(((const uint16_t *)x)[i]);
        xs = x32;
    }
    for (int64_t i = 0; i < rows; i++) x_of[i] = xs + order[i] * in;
#pragma omp parallel num_threads(threads)
    lora_team(g, out, out_stride, x_of, bf16, adapters, order, starts, xa, stride);
    free(xa);
    free(x_of);
    free(x32);
}

/* One adapter's update of a prefill's many rows (one prompt's, tens to hundreds) for one input
 * group: out [rows, out_stride] += (x [rows, in] @ A) @ B, A and B bfloat16 in pairs of rows
 * (group_t's bf16), x and out both float32 or both bfloat16 (bf16); x and x @ A are rounded to
 * bfloat16 as each product takes them, the sums float32. PyTorch's products of these thin matrices
 * (16-48 columns of A, a rank of 16) ran at 150 GFLOP/s in float32 and no faster in bfloat16
 * (BENCHMARKS.md has the figures). By AMX tiles where the CPU has them and the rows are float32
 * (`rows_by_amx`), else by AVX-512 BF16 dot products (`rows_by_dpbf16`). Returns 0, and adds
 * nothing, where neither applies: float32 matrices, or a CPU or build without either. */
#ifdef __AVX512BF16__
#define DR 8 /* rows of a dot-product tile */

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

/* acc[r][v] += sum over pairs p < pairs of rows r's pair of values p (x[r][p], two bfloat16 in 32
 * bits) times m's pair of rows p (m[p * stride + 16 v + lane], `pairs`' layout), for DR rows and nv
 * <= 3 vectors of 16 columns, the last `last`'s lanes: one broadcast per row and pair, one load of m
 * per vector and pair, for all DR rows. nv a constant where inlined, so that the sums stay in
 * registers (summed in acc itself, they were stored to memory at every step: 2x slower). */
static inline __attribute__((always_inline)) void dot_pairs(__m512 acc[DR][3], const uint32_t *const *x,
                                                             const uint32_t *m, int64_t stride, int64_t pairs,
                                                             const int nv, __mmask16 last) {
    __m512 sum[DR][3]; /* in registers, stored once */
    for (int r = 0; r < DR; r++)
        for (int v = 0; v < nv; v++) sum[r][v] = acc[r][v];
    for (int64_t p = 0; p < pairs; p++) {
        __m512i w[3];
        for (int v = 0; v < nv; v++) w[v] = _mm512_maskz_loadu_epi32(v == nv - 1 ? last : 0xffff, m + p * stride + 16 * v);
        for (int r = 0; r < DR; r++) {
            __m512bh xr = (__m512bh)_mm512_set1_epi32((int)x[r][p]);
            for (int v = 0; v < nv; v++) sum[r][v] = _mm512_dpbf16_ps(sum[r][v], xr, (__m512bh)w[v]);
        }
    }
    for (int r = 0; r < DR; r++)
        for (int v = 0; v < nv; v++) acc[r][v] = sum[r][v];
}

/* 16 floats from o (float32, or bfloat16 when bf16), the lanes of `mask` (the rest 0), and back */
static inline __m512 load16(const void *o, int bf16, __mmask16 mask) {
    if (!bf16) return _mm512_maskz_loadu_ps(mask, o);
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, o));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline void store16(void *o, __m512 v, int bf16, __mmask16 mask) {
    if (bf16)
        _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_mask_storeu_ps(o, mask, v);
}

/* dot_pairs for the columns [j, j + 48) of m's n (up to 3 vectors, the last one's lanes masked);
 * returns the vectors taken. */
static inline int64_t dot_tile(__m512 acc[DR][3], const uint32_t *const *x, const uint32_t *m, int64_t stride,
                               int64_t pairs, int64_t j, int64_t n) {
    int64_t nv = (n - j + 15) / 16 < 3 ? (n - j + 15) / 16 : 3;
    __mmask16 last = lanes(n - j - 16 * (nv - 1));
    switch (nv) { /* constant vector counts, for the registers */
    case 1: dot_pairs(acc, x, m + j, stride, pairs, 1, last); break;
    case 2: dot_pairs(acc, x, m + j, stride, pairs, 2, last); break;
    default: dot_pairs(acc, x, m + j, stride, pairs, 3, last);
    }
    return nv;
}

static int rows_by_dpbf16(const group_t *g, void *out, int64_t out_stride, const void *x, int64_t rows, int bf16,
                          int threads) {
    const int64_t in = g->in, cols = g->cols;
#pragma omp parallel num_threads(threads)
    {
        /* the tile's rows of x and of x @ A as bfloat16, and a row of zeros for rows past the end */
        uint16_t *xb = malloc(sizeof(uint16_t) * (DR * in + DR * cols + in + cols + 32));
        uint16_t *xab = xb + DR * in, *zeros = xab + DR * cols;
        memset(zeros, 0, sizeof(uint16_t) * (in + cols + 32));
#pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < rows; r0 += DR) {
            int64_t n = rows - r0 < DR ? rows - r0 : DR;
            const uint32_t *xr[DR], *xar[DR];
            for (int64_t r = 0; r < DR; r++) {
                const uint16_t *row = bf16 && r < n ? (const uint16_t *)x + (r0 + r) * in : xb + r * in;
                if (!bf16 && r < n)
                    for (int64_t k = 0; k < in; k += 16) {
                        __m512 v = _mm512_maskz_loadu_ps(lanes(in - k), (const float *)x + (r0 + r) * in + k);
                        _mm256_mask_storeu_epi16(xb + r * in + k, lanes(in - k), (__m256i)_mm512_cvtneps_pbh(v));
                    }
                xr[r] = (const uint32_t *)(r < n ? row : zeros);
                xar[r] = (const uint32_t *)(r < n ? xab + r * cols : zeros);
            }
            for (int64_t c = 0; c < cols; c += 48) { /* x @ A, rounded to bfloat16 */
                __m512 acc[DR][3];
                for (int r = 0; r < DR; r++)
                    for (int v = 0; v < 3; v++) acc[r][v] = _mm512_setzero_ps();
                int64_t nv = dot_tile(acc, xr, g->a, cols, in / 2, c, cols);
                for (int64_t r = 0; r < n; r++)
                    for (int64_t v = 0; v < nv; v++) store16(xab + r * cols + c + 16 * v, acc[r][v], 1, lanes(cols - c - 16 * v));
            }
            for (int64_t p = 0; p < g->projections; p++) { /* out += xa's columns of p @ B */
                const projection_t *pr = &g->projection[p];
                const uint32_t *xp[DR];
                for (int r = 0; r < DR; r++) xp[r] = xar[r] + pr->col / 2;
                for (int64_t j = 0; j < pr->size; j += 48) {
                    __m512 acc[DR][3];
                    const int64_t at = r0 * out_stride + pr->offset + j, bytes = bf16 ? 2 : 4;
                    for (int64_t r = 0; r < DR; r++)
                        for (int64_t v = 0; v < 3; v++)
                            acc[r][v] = r < n && j + 16 * v < pr->size
                                            ? load16((char *)out + (at + r * out_stride + 16 * v) * bytes, bf16,
                                                     lanes(pr->size - j - 16 * v))
                                            : _mm512_setzero_ps();
                    int64_t nv = dot_tile(acc, xp, pr->b, pr->size, pr->width / 2, j, pr->size);
                    for (int64_t r = 0; r < n; r++)
                        for (int64_t v = 0; v < nv; v++)
                            store16((char *)out + (at + r * out_stride + 16 * v) * bytes, acc[r][v], bf16,
                                    lanes(pr->size - j - 16 * v));
                }
            }
        }
        free(xb);
    }
    return 1;
}
#endif

/* The rows by AMX tiles: x and out float32. Blocks of 16 rows, one task each; for each, x @ A one
 * 16-column tile at a time over 32 inputs a step, then each projection's 16 output columns at a
 * time over the rank 16 at a time, accumulated onto out's own values. Returns 0 where it cannot: a
 * CPU without AMX, or shapes not in whole tiles (in a multiple of 32; cols, every rank and size
 * of 16). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

static int amx_permitted(void) { /* Linux lends a process AMX's state on request (ARCH_REQ_XCOMP_PERM) */
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return permitted;
}

/* x's 16 rows from row r0 (fewer at the end: zeros) as bfloat16 [16, n] */
static void rows_to_bf16(const float *x, int64_t rows, int64_t r0, int64_t n, uint16_t *to) {
    for (int64_t r = 0; r < 16; r++)
        for (int64_t k = 0; k < n; k += 16) {
            __m512 v = r0 + r < rows ? _mm512_loadu_ps(x + (r0 + r) * n + k) : _mm512_setzero_ps();
            _mm256_storeu_si256((__m256i *)(to + r * n + k), (__m256i)_mm512_cvtneps_pbh(v));
        }
}

static int rows_by_amx(const group_t *g, float *out, int64_t out_stride, const float *x, int64_t rows, int threads) {
    int64_t in = g->in, cols = g->cols;
    if (in % 32 || cols % 16 || !amx_permitted()) return 0;
    for (int64_t p = 0; p < g->projections; p++)
        if (g->projection[p].width % 16 || g->projection[p].size % 16) return 0;
    tile_config_t config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
    config.colsb[6] = 32;                /* xa's 16 columns of one projection's rank, bfloat16 */
    config.rows[7] = config.rows[2] = 8; /* B's 16 rows of it, in pairs */
    const uint32_t *a = g->a;
#pragma omp parallel num_threads(threads)
    {
        _tile_loadconfig(&config);
        uint16_t *xb = aligned_alloc(64, sizeof(uint16_t) * 16 * (in + cols));
        uint16_t *xab = xb + 16 * in;
        float *xa = aligned_alloc(64, sizeof(float) * 16 * cols), edge[16 * 16];
#pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < rows; r0 += 16) {
            rows_to_bf16(x, rows, r0, in, xb);
            for (int64_t c = 0; c < cols; c += 16) { /* xa = x @ A, a tile of 16 columns */
                _tile_zero(0);
                for (int64_t k = 0; k < in; k += 32) {
                    _tile_loadd(4, xb + k, in * 2);
                    _tile_loadd(5, a + k / 2 * cols + c, cols * 4);
                    _tile_dpbf16ps(0, 4, 5);
                }
                _tile_stored(0, xa + c, cols * 4);
            }
            rows_to_bf16(xa, 16, 0, cols, xab);
            int64_t n = rows - r0 < 16 ? rows - r0 : 16;
            for (int64_t p = 0; p < g->projections; p++) { /* out += xa's columns of p @ B */
                const projection_t *pr = &g->projection[p];
                const uint32_t *b = pr->b;
                for (int64_t j = 0; j < pr->size;) {
                    float *o = out + r0 * out_stride + pr->offset + j;
                    if (n == 16 && j + 32 <= pr->size) { /* two tiles of columns, their products side by side */
                        _tile_loadd(0, o, out_stride * 4);
                        _tile_loadd(1, o + 16, out_stride * 4);
                        for (int64_t k = 0; k < pr->width; k += 16) {
                            _tile_loadd(6, xab + pr->col + k, cols * 2);
                            _tile_loadd(7, b + k / 2 * pr->size + j, pr->size * 4);
                            _tile_loadd(2, b + k / 2 * pr->size + j + 16, pr->size * 4);
                            _tile_dpbf16ps(0, 6, 7);
                            _tile_dpbf16ps(1, 6, 2);
                        }
                        _tile_stored(0, o, out_stride * 4);
                        _tile_stored(1, o + 16, out_stride * 4);
                        j += 32;
                        continue;
                    }
                    float *c = n == 16 ? o : edge; /* the last rows through a whole tile */
                    int64_t stride = n == 16 ? out_stride : 16;
                    if (n < 16) {
                        memset(edge, 0, sizeof(edge));
                        for (int64_t r = 0; r < n; r++) memcpy(edge + r * 16, o + r * out_stride, sizeof(float) * 16);
                    }
                    _tile_loadd(0, c, stride * 4);
                    for (int64_t k = 0; k < pr->width; k += 16) {
                        _tile_loadd(6, xab + pr->col + k, cols * 2);
                        _tile_loadd(7, b + k / 2 * pr->size + j, pr->size * 4);
                        _tile_dpbf16ps(0, 6, 7);
                    }
                    _tile_stored(0, c, stride * 4);
                    for (int64_t r = 0; n < 16 && r < n; r++) memcpy(o + r * out_stride, edge + r * 16, sizeof(float) * 16);
                    j += 16;
                }
            }
        }
        free(xb);
        free(xa);
        _tile_release();
    }
    return 1;
}
#endif

int lora_rows(const group_t *g, void *out, int64_t out_stride, const void *x, int64_t rows, int bf16, int threads) {
    if (!g->bf16) return 0;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (!bf16 && rows_by_amx(g, out, out_stride, x, rows, threads)) return 1;
#endif
#ifdef __AVX512BF16__
    return rows_by_dpbf16(g, out, out_stride, x, rows, bf16, threads);
#else
    return 0;
#endif
}
