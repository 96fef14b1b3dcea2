/* The int4 kernel's calls that decode_step.c shares (q4_native.c defines them). */
#ifndef Q4_NATIVE_H
#define Q4_NATIVE_H
#include <stdint.h>

/* One 4- or 8-bit layer in the kernel's layout (see q4_native.c), or (for the decode step
 * only) a float layer whose codes are its weights [n, k]: bits 32 float32, bits 16 bfloat16. */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales, *mins;
    const float *bias;   /* NULL when the layer has none */
    int bits, n, k, group;
} q4_layer;

/* What one input row becomes: int8 codes, block scales, their sums per block and group. */
typedef struct {
    int8_t *xq;
    float *d, *ds, *dsg;
} q4_scratch;

int q4_scratch_alloc(q4_scratch *s, int k, int m);   /* m input rows */
void q4_scratch_free(q4_scratch *s);
void q4_gemm(const q4_layer *w, const float *x, int m, float *y, const q4_scratch *s,
             int threads);
/* y = W x, called by every thread of an OpenMP team (or by one thread outside any): x is
 * quantized into s once (not for a float32 layer), W's rows are shared out; `factors`: the thread's own room for
 * k / 32 floats. Ends with the team's barrier. */
void q4_gemv_team(const q4_layer *w, const float *x, float *y, const q4_scratch *s,
                  float *factors);

#endif
