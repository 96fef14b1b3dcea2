/* 4-bit weight x 8-bit activation matrix-vector products for decode, the way llama.cpp's
 * Q4_1 x Q8 kernels do it, over the studio's own layout (see q4_native.py):
 *
 *   codes  [N, K/2] bytes: each row is K/32 blocks of 16 bytes; byte j of a block holds
 *          element j in its low nibble and element j + 16 in its high one.
 *   scales [N, K/group] fp16, mins [N, K/group] fp16: w = code * scale + min.
 *
 * An input row x is quantized once per call to int8 in blocks of 32 (one float scale d per
 * block, and d * sum(codes) for the min term), so a block's dot product is integer
 * multiply-adds (maddubs: unsigned 4-bit codes x signed 8-bit activations) and one float
 * multiply-add by scale * d. Built with -mavx2 -mfma -mf16c where the CPU has them; the scalar
 * path computes the same sums in the same order of blocks.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
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

/* Block b's float factor for one row in groups of 32: its scale times x's block scale d[b]. */
static void row_factors(const uint16_t *scales, int blocks, const float *d, float *factor) {
    int b = 0;
#if Q4_AVX2
    for (; b + 8 <= blocks; b += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + b)));
        _mm256_storeu_ps(factor + b, _mm256_mul_ps(s, _mm256_loadu_ps(d + b)));
    }
#endif
    for (; b < blocks; b++) factor[b] = half_to_float(scales[b]) * d[b];
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
static inline __m256 block_dot(const uint8_t *codes, const int8_t *xq) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m128i raw = _mm_loadu_si128((const __m128i *)codes);
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
    __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones));
}
#endif

#if Q4_AVX2
static inline float hsum(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}
#endif

/* One output: a row's codes against the quantized x, each block weighted by factor[b]. */
static float row_dot(const uint8_t *codes, int blocks, const int8_t *xq, const float *factor) {
#if Q4_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        acc0 = _mm256_fmadd_ps(block_dot(codes + 16 * b, xq + 32 * b),
                               _mm256_broadcast_ss(factor + b), acc0);
        acc1 = _mm256_fmadd_ps(block_dot(codes + 16 * b + 16, xq + 32 * b + 32),
                               _mm256_broadcast_ss(factor + b + 1), acc1);
    }
    if (b < blocks)
        acc0 = _mm256_fmadd_ps(block_dot(codes + 16 * b, xq + 32 * b),
                               _mm256_broadcast_ss(factor + b), acc0);
    return hsum(_mm256_add_ps(acc0, acc1));
#else
    float total = 0.0f;
    for (int b = 0; b < blocks; b++) {
        int dot = 0;
        const uint8_t *c = codes + 16 * b;
        const int8_t *x = xq + 32 * b;
        for (int i = 0; i < 16; i++)
            dot += (c[i] & 15) * x[i] + (c[i] >> 4) * x[i + 16];
        total += (float)dot * factor[b];
    }
    return total;
#endif
}

/* One output for groups of several blocks (g64, g128, per-channel): each group's blocks
 * weighted by x's block scales, then the group's sum by its scale, so no per-block factor is
 * made for each row. */
static float row_dot_grouped(const uint8_t *codes, const uint16_t *scales, int groups,
                             int per_group, const int8_t *xq, const float *d) {
#if Q4_AVX2
    __m256 total = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int b = g * per_group, end = b + per_group;
        for (; b + 2 <= end; b += 2) {
            acc0 = _mm256_fmadd_ps(block_dot(codes + 16 * b, xq + 32 * b),
                                   _mm256_broadcast_ss(d + b), acc0);
            acc1 = _mm256_fmadd_ps(block_dot(codes + 16 * b + 16, xq + 32 * b + 32),
                                   _mm256_broadcast_ss(d + b + 1), acc1);
        }
        if (b < end)
            acc0 = _mm256_fmadd_ps(block_dot(codes + 16 * b, xq + 32 * b),
                                   _mm256_broadcast_ss(d + b), acc0);
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1),
                                _mm256_set1_ps(half_to_float(scales[g])), total);
    }
    return hsum(total);
#else
    float total = 0.0f;
    for (int g = 0; g < groups; g++) {
        float group_sum = 0.0f;
        for (int b = g * per_group; b < (g + 1) * per_group; b++) {
            int dot = 0;
            const uint8_t *c = codes + 16 * b;
            const int8_t *x = xq + 32 * b;
            for (int i = 0; i < 16; i++)
                dot += (c[i] & 15) * x[i] + (c[i] >> 4) * x[i + 16];
            group_sum += (float)dot * d[b];
        }
        total += group_sum * half_to_float(scales[g]);
    }
    return total;
#endif
}

/* y [N] = W x (+ bias) for one input row, rows split over `threads` OpenMP threads (in
 * torch's process this is torch's own runtime: the same libgomp). */
void q4_gemv(const q4_layer *w, const float *x, float *y, const q4_scratch *s, int threads) {
    int k = w->k, n = w->n, blocks = k / 32, groups = k / w->group, per_group = w->group / 32;
    quantize_row(x, k, s->xq, s->d, s->ds);
    for (int g = 0; g < groups; g++) {
        s->dsg[g] = 0.0f;
        for (int j = 0; j < per_group; j++) s->dsg[g] += s->ds[g * per_group + j];
    }
    /* Small products are not worth waking a thread for (a futex wake-up costs more). */
    if ((long)n * k < (1L << 18)) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
        float factor[blocks];
        #pragma omp for schedule(static)
        for (int r = 0; r < n; r++) {
            const uint8_t *row_codes = w->codes + (size_t)r * (k / 2);
            const uint16_t *row_scales = w->scales + (size_t)r * groups;
            float dot;
            if (per_group == 1) {
                row_factors(row_scales, blocks, s->d, factor);
                dot = row_dot(row_codes, blocks, s->xq, factor);
            } else {
                dot = row_dot_grouped(row_codes, row_scales, groups, per_group, s->xq, s->d);
            }
            y[r] = dot + row_mins(w->mins + (size_t)r * groups, groups, s->dsg)
                   + (w->bias ? w->bias[r] : 0.0f);
        }
    }
}

int q4_scratch_alloc(q4_scratch *s, int k) {
    int blocks = k / 32 + 1;
    s->xq = malloc((size_t)k);
    s->d = malloc(sizeof(float) * (size_t)blocks);
    s->ds = malloc(sizeof(float) * (size_t)blocks);
    s->dsg = malloc(sizeof(float) * (size_t)blocks);
    if (s->xq && s->d && s->ds && s->dsg) return 0;
    q4_scratch_free(s);
    return -1;
}

void q4_scratch_free(q4_scratch *s) {
    free(s->xq); free(s->d); free(s->ds); free(s->dsg);
    s->xq = NULL; s->d = s->ds = s->dsg = NULL;
}

/* y [M, N] = x [M, K] @ W.T (+ bias [N] when not NULL). Returns 0, or -1 when out of memory. */
int q4_matmul(const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
              const float *bias, int n, int k, int group, const float *x, int m, float *y,
              int threads) {
    q4_layer w = { codes, scales, mins, bias, n, k, group };
    q4_scratch s;
    if (q4_scratch_alloc(&s, k)) return -1;
    for (int row = 0; row < m; row++)
        q4_gemv(&w, x + (size_t)row * k, y + (size_t)row * n, &s, threads);
    q4_scratch_free(&s);
    return 0;
}

/* W [N, K] in float32, for prefill's dense GEMM: code * scale + min, element by element. */
void q4_dequantize(const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
                   int n, int k, int group, float *w) {
    int groups = k / group;
    for (int r = 0; r < n; r++) {
        const uint8_t *c = codes + (size_t)r * (k / 2);
        float *out = w + (size_t)r * k;
        for (int b = 0; b < k / 32; b++) {
            int g = (32 * b) / group;
            float scale = half_to_float(scales[(size_t)r * groups + g]);
            float min = half_to_float(mins[(size_t)r * groups + g]);
            for (int i = 0; i < 16; i++) {
                out[32 * b + i] = (float)(c[16 * b + i] & 15) * scale + min;
                out[32 * b + i + 16] = (float)(c[16 * b + i] >> 4) * scale + min;
            }
        }
    }
}
