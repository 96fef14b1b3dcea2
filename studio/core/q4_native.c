/* Low-bit weight x 8-bit activation matrix-vector products for decode, the way llama.cpp's
 * Q4_1 / Q8_0 x Q8 kernels do it, over the studio's own layout (see q4_native.py):
 *
 *   4-bit codes [N, K/2] bytes: each row is K/32 blocks of 16 bytes; byte j of a block holds
 *          element j in its low nibble and element j + 16 in its high one (codes 0..15).
 *   8-bit codes [N, K] signed bytes (code - 128, so |code| <= 128 fits maddubs' pairs).
 *   scales [N, K/group] fp16, mins [N, K/group] fp16: w = code * scale + min.
 *
 * An input row x is quantized once per call to int8 in blocks of 32 (one float scale d per
 * block, and d * sum(codes) for the min term), so a block's dot product is integer
 * multiply-adds (maddubs: unsigned codes x signed activations; 8-bit codes go in as |code|
 * with the sign moved onto x) and one float multiply-add by scale * d. Built with -mavx2
 * -mfma -mf16c where the CPU has them; the scalar path computes the same integer sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include "q4_native.h"
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define Q4_AVX2 1
#else
#define Q4_AVX2 0
#endif

static float half_to_float(uint16_t h) {
#if Q4_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float value;
    if (exp == 0) value = ldexpf((float)man, -24);
    else if (exp == 31) value = man ? NAN : INFINITY;
    else value = ldexpf((float)(man | 0x400), (int)exp - 25);
    union { float f; uint32_t u; } out = { value };
    out.u |= sign;
    return out.f;
#endif
}

int q4_has_avx2(void) { return Q4_AVX2; }

/* x [K] -> xq [K] int8, d [K/32] block scales, ds [K/32] = d * sum of the block's codes. */
static void quantize_row(const float *x, int k, int8_t *xq, float *d, float *ds) {
    for (int b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            int q = (int)lrintf(xb[i] * inverse);
            xq[32 * b + i] = (int8_t)q;
            sum += q;
        }
        d[b] = scale;
        ds[b] = scale * (float)sum;
    }
}

/* Block b's weight for one row and one input: the row's scale for b's group times the input's
 * block scale d[b], for every block of the row (f[blocks]). */
static void row_factors(const uint16_t *scales, int groups, int per_group, const float *d,
                        float *f) {
    int blocks = groups * per_group, b = 0;
#if Q4_AVX2
    if (per_group == 1) {
        for (; b + 8 <= blocks; b += 8)
            _mm256_storeu_ps(f + b, _mm256_mul_ps(
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + b))),
                _mm256_loadu_ps(d + b)));
    } else if (per_group == 2 || per_group == 4) {
        /* 8 blocks span 4 or 2 groups: their scales spread over the 8 lanes. */
        const __m256i spread = per_group == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                              : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (; b + 8 <= blocks && b / per_group + 4 <= groups; b += 8) {
            __m256 s = _mm256_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scales
                                                                         + b / per_group)));
            _mm256_storeu_ps(f + b, _mm256_mul_ps(_mm256_permutevar8x32_ps(s, spread),
                                                  _mm256_loadu_ps(d + b)));
        }
    } else {
        for (int g = 0; g < groups; g++) {
            float scale = half_to_float(scales[g]);
            __m256 s = _mm256_set1_ps(scale);
            int end = b + per_group;
            for (; b + 8 <= end; b += 8)
                _mm256_storeu_ps(f + b, _mm256_mul_ps(s, _mm256_loadu_ps(d + b)));
            for (; b < end; b++) f[b] = scale * d[b];
        }
    }
#endif
    for (; b < blocks; b++) f[b] = half_to_float(scales[b / per_group]) * d[b];
}

/* The min term of one row: sum over groups of min * (sum of x in the group), dsg per group. */
static float row_mins(const uint16_t *mins, int groups, const float *dsg) {
    int g = 0;
    float total = 0.0f;
#if Q4_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + g))),
                              _mm256_loadu_ps(dsg + g), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++) total += lanes[i];
#endif
    for (; g < groups; g++) total += half_to_float(mins[g]) * dsg[g];
    return total;
}

#if Q4_AVX2
static inline float hsum(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}

/* 8 bfloat16 values as float32: each the upper half of its float. */
static inline __m256 bf16_widen(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Block b of a row as 32 unsigned bytes for maddubs: 4-bit codes unpacked, 8-bit codes as
 * |code| (their sign goes onto x, `signed_x`). */
static inline __m256i block_codes(const uint8_t *row, int bits, int b) {
    if (bits == 4) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(row + 16 * b));
        return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                _mm256_set1_epi8(0x0f));
    }
    return _mm256_loadu_si256((const __m256i *)(row + 32 * b));
}

/* The block's 8 partial integer sums (as floats) of codes q times activations x. */
static inline __m256 block_sums(__m256i q, int bits, __m256i x) {
    __m256i products = bits == 4
        ? _mm256_maddubs_epi16(q, x)
        : _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(products, _mm256_set1_epi16(1)));
}
#else
static int block_sum(const uint8_t *row, int bits, int b, const int8_t *x) {
    int dot = 0;
    if (bits == 4) {
        const uint8_t *c = row + 16 * b;
        for (int i = 0; i < 16; i++) dot += (c[i] & 15) * x[i] + (c[i] >> 4) * x[i + 16];
    } else {
        const int8_t *c = (const int8_t *)(row + 32 * b);
        for (int i = 0; i < 32; i++) dot += c[i] * x[i];
    }
    return dot;
}
#endif

/* One output: a row's codes against one quantized input, block b weighted by f[b]; two
 * independent sums, so consecutive blocks' latencies overlap. */
static float row_dot(const uint8_t *row, int bits, int blocks, const int8_t *xq, const float *f) {
#if Q4_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b + 32));
        acc0 = _mm256_fmadd_ps(block_sums(block_codes(row, bits, b), bits, x0),
                               _mm256_broadcast_ss(f + b), acc0);
        acc1 = _mm256_fmadd_ps(block_sums(block_codes(row, bits, b + 1), bits, x1),
                               _mm256_broadcast_ss(f + b + 1), acc1);
    }
    if (b < blocks)
        acc0 = _mm256_fmadd_ps(block_sums(block_codes(row, bits, b), bits,
                                          _mm256_loadu_si256((const __m256i *)(xq + 32 * b))),
                               _mm256_broadcast_ss(f + b), acc0);
    return hsum(_mm256_add_ps(acc0, acc1));
#else
    float total = 0.0f;
    for (int b = 0; b < blocks; b++) total += (float)block_sum(row, bits, b, xq + 32 * b) * f[b];
    return total;
#endif
}

/* A tile of outputs: NR weight rows from r against MB quantized input rows from j, written to
 * y [rows, ldy]. Each block's codes are unpacked once for all MB inputs and each input block
 * loaded once for all NR rows, and the NR x MB sums are independent chains, so the CPU
 * overlaps their latencies. A block's weight is its row's group scale times x's block scale. */
static inline __attribute__((always_inline)) void tile(
        const q4_layer *w, const q4_scratch *s, int r, int j, int NR, int MB, int BITS,
        float *y, int ldy, float *factors) {
    int k = w->k, blocks = k / 32, groups = k / w->group, per_group = w->group / 32;
    size_t row_bytes = (size_t)k / 8 * BITS;
    const uint8_t *rows[2];
    const float *f[2][4];
    for (int i = 0; i < NR; i++) {
        rows[i] = w->codes + (size_t)(r + i) * row_bytes;
        for (int m = 0; m < MB; m++) {
            float *out = factors + (size_t)(i * MB + m) * blocks;
            row_factors(w->scales + (size_t)(r + i) * groups, groups, per_group,
                        s->d + (size_t)(j + m) * blocks, out);
            f[i][m] = out;
        }
    }
#if Q4_AVX2
    __m256 acc[2][4];
    #pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
        #pragma GCC unroll 4
        for (int m = 0; m < MB; m++) acc[i][m] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m256i q[2];
        #pragma GCC unroll 4
        for (int i = 0; i < NR; i++) q[i] = block_codes(rows[i], BITS, b);
        #pragma GCC unroll 4
        for (int m = 0; m < MB; m++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(s->xq + (size_t)(j + m) * k
                                                             + 32 * b));
            #pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                acc[i][m] = _mm256_fmadd_ps(block_sums(q[i], BITS, x),
                                            _mm256_broadcast_ss(f[i][m] + b), acc[i][m]);
        }
    }
#else
    float acc[2][4] = {{0}};
    for (int b = 0; b < blocks; b++)
        for (int m = 0; m < MB; m++)
            for (int i = 0; i < NR; i++)
                acc[i][m] += (float)block_sum(rows[i], BITS, b,
                                              s->xq + (size_t)(j + m) * k + 32 * b)
                             * f[i][m][b];
#endif
    #pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
        #pragma GCC unroll 4
        for (int m = 0; m < MB; m++) {
#if Q4_AVX2
            float dot = hsum(acc[i][m]);
#else
            float dot = acc[i][m];
#endif
            y[(size_t)(j + m) * ldy + r + i] =
                dot + row_mins(w->mins + (size_t)(r + i) * groups, groups,
                               s->dsg + (size_t)(j + m) * groups)
                + (w->bias ? w->bias[r + i] : 0.0f);
        }
}

/* Tile shapes the compiler specializes (NR, MB and BITS constant, every loop over them
 * unrolled): two rows for up to four inputs, one row for what is left over. */
#define TILE(NR, MB) (w->bits == 4 ? tile(w, s, r, j, NR, MB, 4, y, w->n, factors) \
                                   : tile(w, s, r, j, NR, MB, 8, y, w->n, factors))
static void tile_any(const q4_layer *w, const q4_scratch *s, int r, int nr, int j, int mb,
                     float *y, float *factors) {
    switch (nr * 8 + mb) {
    case 2 * 8 + 1: TILE(2, 1); break;
    case 2 * 8 + 2: TILE(2, 2); break;
    case 2 * 8 + 3: TILE(2, 3); break;
    case 2 * 8 + 4: TILE(2, 4); break;
    case 1 * 8 + 1: TILE(1, 1); break;
    case 1 * 8 + 2: TILE(1, 2); break;
    case 1 * 8 + 3: TILE(1, 3); break;
    default: TILE(1, 4); break;
    }
}

#if Q4_AVX2
/* Eight vectors' sums as one vector: lane i holds the sum of acc[i]'s eight lanes. */
static inline __m256 hsum8(const __m256 acc[8]) {
    __m256 a = _mm256_hadd_ps(acc[0], acc[1]), b = _mm256_hadd_ps(acc[2], acc[3]);
    __m256 c = _mm256_hadd_ps(acc[4], acc[5]), d = _mm256_hadd_ps(acc[6], acc[7]);
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);   /* each 128-bit half's */
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                         _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* Eight fp16 values `stride` apart (eight rows' scales or mins of one group) as float32. */
static inline __m256 halves8(const uint16_t *p, size_t stride) {
    uint16_t v[8];
    for (int i = 0; i < 8; i++) v[i] = p[i * stride];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v));
}

/* y[r..r+8) of y = W x for one quantized input. A short row (a few blocks: a 262k-token
 * lm_head is 128 wide) spends more on its per-row costs (the final sum of its vector, its
 * scalar scales and mins, one output store) than on its blocks, so eight rows pay them
 * together: each row sums its blocks in its own vector, the eight vectors reduce into one
 * (lane i = row i), and scales, mins, bias and outputs move eight rows at a time. The rows
 * PREFETCH_AHEAD bytes on are asked for first: without it the loads wait on memory (a 128-wide
 * int8 head read at 0.55x the time with it; float32 rows, read one by one, gain nothing). */
#define PREFETCH_AHEAD 4096
static inline __attribute__((always_inline)) void rows8(const q4_layer *w, const q4_scratch *s,
                                                         int r, int BITS, float *y) {
    int k = w->k, groups = k / w->group, per_group = w->group / 32;
    size_t row_bytes = (size_t)k / 8 * BITS;
    const uint8_t *codes = w->codes + (size_t)r * row_bytes;
    const uint16_t *scales = w->scales + (size_t)r * groups, *mins = w->mins + (size_t)r * groups;
    for (size_t line = 0; line < 8 * row_bytes; line += 64)   /* a hint: never faults */
        _mm_prefetch((const char *)codes + PREFETCH_AHEAD + line, _MM_HINT_T0);
    __m256 acc[8], sums, min_sum;
    #pragma GCC unroll 8
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    if (groups == 1) {   /* per channel: x's block scales weigh every row alike */
        for (int b = 0; b < k / 32; b++) {
            __m256 d = _mm256_set1_ps(s->d[b]);
            __m256i x = _mm256_loadu_si256((const __m256i *)(s->xq + 32 * b));
            #pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_fmadd_ps(block_sums(block_codes(codes + i * row_bytes, BITS, b),
                                                    BITS, x), d, acc[i]);
        }
        sums = _mm256_mul_ps(hsum8(acc), halves8(scales, 1));
        min_sum = _mm256_mul_ps(halves8(mins, 1), _mm256_set1_ps(s->dsg[0]));
    } else {
        min_sum = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            __m256 scale = halves8(scales + g, groups);
            min_sum = _mm256_fmadd_ps(halves8(mins + g, groups), _mm256_set1_ps(s->dsg[g]),
                                      min_sum);
            for (int b = g * per_group; b < (g + 1) * per_group; b++) {
                float f[8];   /* block b's weight in each row: its scale times x's block scale */
                _mm256_storeu_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(s->d[b])));
                __m256i x = _mm256_loadu_si256((const __m256i *)(s->xq + 32 * b));
                #pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    acc[i] = _mm256_fmadd_ps(
                        block_sums(block_codes(codes + i * row_bytes, BITS, b), BITS, x),
                        _mm256_broadcast_ss(f + i), acc[i]);
            }
        }
        sums = hsum8(acc);
    }
    __m256 out = _mm256_add_ps(sums, min_sum);
    if (w->bias) out = _mm256_add_ps(out, _mm256_loadu_ps(w->bias + r));
    _mm256_storeu_ps(y + r, out);
}
#endif

/* Quantizes m input rows into s (int8 per block of 32, the block sums per group). */
static void quantize_rows(const q4_layer *w, const float *x, int m, const q4_scratch *s) {
    int k = w->k, blocks = k / 32, groups = k / w->group, per_group = w->group / 32;
    for (int j = 0; j < m; j++) {
        float *ds = s->ds + (size_t)j * blocks, *dsg = s->dsg + (size_t)j * groups;
        quantize_row(x + (size_t)j * k, k, s->xq + (size_t)j * k, s->d + (size_t)j * blocks, ds);
        for (int g = 0; g < groups; g++) {
            dsg[g] = 0.0f;
            for (int i = 0; i < per_group; i++) dsg[g] += ds[g * per_group + i];
        }
    }
}

/* One output row r of y = W x (+ bias) for the one input row already quantized into s.
 * `factors`: room for the row's block weights. */
static void gemv_row(const q4_layer *w, const q4_scratch *s, int r, float *y, float *factors) {
    int k = w->k, blocks = k / 32, groups = k / w->group, per_group = w->group / 32;
    const uint8_t *row = w->codes + (size_t)r * ((size_t)k / 8 * w->bits);
    float dot;
    if (groups == 1) {   /* per channel: x's block scales are the weights */
        dot = row_dot(row, w->bits, blocks, s->xq, s->d) * half_to_float(w->scales[r]);
    } else {
        row_factors(w->scales + (size_t)r * groups, groups, per_group, s->d, factors);
        dot = row_dot(row, w->bits, blocks, s->xq, factors);
    }
    y[r] = dot + row_mins(w->mins + (size_t)r * groups, groups, s->dsg)
           + (w->bias ? w->bias[r] : 0.0f);
}

/* Rows of at most this many code bytes (two cache lines) run eight at a time (rows8); longer
 * ones one by one, where the per-row costs are already small against the row's blocks (on
 * 256-byte int8 rows rows8 measured 0.9-1.1x the time of one by one: no gain). */
#define SHORT_ROW_BYTES 128

/* y [N] = W x (+ bias) for the one input row already quantized into s: the rows of W shared
 * among the calling team's threads (an orphaned `omp for`: one thread outside a team runs them
 * all). `factors`: this thread's room for one row's block weights. */
static void gemv_rows(const q4_layer *w, const q4_scratch *s, float *y, float *factors) {
    int n = w->n, eights = 0;
#if Q4_AVX2
    if ((size_t)w->k / 8 * w->bits <= SHORT_ROW_BYTES) {
        eights = n / 8;
        #pragma omp for schedule(static) nowait
        for (int e = 0; e < eights; e++) {
            if (w->bits == 4) rows8(w, s, 8 * e, 4, y);
            else rows8(w, s, 8 * e, 8, y);
        }
    }
#endif
    #pragma omp for schedule(static)
    for (int r = 8 * eights; r < n; r++) gemv_row(w, s, r, y, factors);
}

/* y [M, N] = x [M, K] @ W.T (+ bias), M at most the scratch's rows, rows of W split over
 * `threads` OpenMP threads (in torch's process this is torch's own runtime: the same
 * libgomp). One input (decode) runs row by row; several run in tiles of two weight rows by
 * up to four inputs, so each thread reads its weight rows from memory once for all M. */
void q4_gemm(const q4_layer *w, const float *x, int m, float *y, const q4_scratch *s,
             int threads) {
    int n = w->n, k = w->k;
    quantize_rows(w, x, m, s);
    /* Small products are not worth waking a thread for (a futex wake-up costs more). */
    if ((long)n * k * m < (1L << 18)) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
        float factors[8 * (k / 32)];   /* one per block, weight row and input of a tile */
        if (m == 1) {
            gemv_rows(w, s, y, factors);
        } else {
            #pragma omp for schedule(static)
            for (int t = 0; t < (n + 1) / 2; t++)
                for (int j = 0; j < m; j += 4)
                    tile_any(w, s, 2 * t, n - 2 * t < 2 ? 1 : 2, j, m - j < 4 ? m - j : 4, y,
                             factors);
        }
    }
}

/* A float32 row against x: four sums, so consecutive loads' latencies overlap. */
static float float_dot(const float *row, const float *x, int k) {
    int i = 0;
    float total = 0.0f;
#if Q4_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (; i + 32 <= k; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    total = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#endif
    for (; i < k; i++) total += row[i] * x[i];
    return total;
}

/* A bfloat16 row against float32 x: a bfloat16 is a float32's upper half, so widening is a
 * shift; the sums are float32, as in float_dot. (Masking the odd halves and shifting the even
 * ones of 16 loaded values, against x split into even and odd elements, measured no faster.) */
static float bf16_dot(const uint16_t *row, const float *x, int k) {
    int i = 0;
    float total = 0.0f;
#if Q4_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (; i + 32 <= k; i += 32) {
        acc0 = _mm256_fmadd_ps(bf16_widen(row + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16_widen(row + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(bf16_widen(row + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(bf16_widen(row + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    total = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#endif
    for (; i < k; i++) {
        uint32_t bits = (uint32_t)row[i] << 16;
        float weight;
        memcpy(&weight, &bits, sizeof weight);
        total += weight * x[i];
    }
    return total;
}

void q4_gemv_team(const q4_layer *w, const float *x, float *y, const q4_scratch *s,
                  float *factors) {
    if (w->bits == 32 || w->bits == 16) {   /* a float layer: codes are its weights [n, k] */
        #pragma omp for schedule(static)
        for (int r = 0; r < w->n; r++) {
            size_t at = (size_t)r * w->k;
            float dot = w->bits == 32 ? float_dot((const float *)w->codes + at, x, w->k)
                                      : bf16_dot((const uint16_t *)w->codes + at, x, w->k);
            y[r] = dot + (w->bias ? w->bias[r] : 0.0f);
        }
        return;
    }
    #pragma omp single
    quantize_rows(w, x, 1, s);
    gemv_rows(w, s, y, factors);
}

/* y [N] = W x for a float layer (bits 32 or 16) on `threads` threads: the decode step's
 * output head, the largest single product (torch's bfloat16 one reads it at ~2/3 the speed). */
void q4_float_gemv(const q4_layer *w, const float *x, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    q4_gemv_team(w, x, y, NULL, NULL);
}

int q4_scratch_alloc(q4_scratch *s, int k, int m) {
    size_t blocks = (size_t)m * (k / 32) + 1;
    s->xq = malloc((size_t)m * k);
    s->d = malloc(sizeof(float) * blocks);
    s->ds = malloc(sizeof(float) * blocks);
    s->dsg = malloc(sizeof(float) * blocks);
    if (s->xq && s->d && s->ds && s->dsg) return 0;
    q4_scratch_free(s);
    return -1;
}

void q4_scratch_free(q4_scratch *s) {
    free(s->xq); free(s->d); free(s->ds); free(s->dsg);
    s->xq = NULL; s->d = s->ds = s->dsg = NULL;
}

/* y [M, N] = x [M, K] @ W.T (+ bias [N] when not NULL), in chunks of up to 32 input rows.
 * Returns 0, or -1 when out of memory. */
int q4_matmul(const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
              const float *bias, int bits, int n, int k, int group, const float *x, int m,
              float *y, int threads) {
    enum { CHUNK = 32 };
    q4_layer w = { codes, scales, mins, bias, bits, n, k, group };
    q4_scratch s;
    if (q4_scratch_alloc(&s, k, m < CHUNK ? m : CHUNK)) return -1;
    for (int row = 0; row < m; row += CHUNK)
        q4_gemm(&w, x + (size_t)row * k, m - row < CHUNK ? m - row : CHUNK,
                y + (size_t)row * n, &s, threads);
    q4_scratch_free(&s);
    return 0;
}

/* W [N, K] in float32, for prefill's dense GEMM: code * scale + min, element by element. */
void q4_dequantize(const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
                   int bits, int n, int k, int group, float *w) {
    int groups = k / group;
    for (int r = 0; r < n; r++) {
        const uint8_t *row = codes + (size_t)r * (k / 8 * bits);
        float *out = w + (size_t)r * k;
        for (int b = 0; b < k / 32; b++) {
            int g = (32 * b) / group;
            float scale = half_to_float(scales[(size_t)r * groups + g]);
            float min = half_to_float(mins[(size_t)r * groups + g]);
            float *o = out + 32 * b;
            if (bits == 4) {
                const uint8_t *c = row + 16 * b;
                for (int i = 0; i < 16; i++) {
                    o[i] = (float)(c[i] & 15) * scale + min;
                    o[i + 16] = (float)(c[i] >> 4) * scale + min;
                }
            } else {
                const int8_t *c = (const int8_t *)(row + 32 * b);
                for (int i = 0; i < 32; i++) o[i] = (float)c[i] * scale + min;
            }
        }
    }
}
