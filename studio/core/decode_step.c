/* One decode step of a Llama-family model's blocks in one call (native_step.py drives it);
 * Qwen3's per-head q/k norms, Phi-3's fused layers and partial rotation, Gemma's GELU and
 * (1 + w) norms, Gemma 2/3's norms around attention and the MLP, soft-capped attention
 * logits, per-layer sliding windows and (Gemma 3) per-layer rotary bases too.
 *
 * Per token, eager torch runs ~50 small ops per block (norms, rotary embedding, attention,
 * splits, residual adds), each with microseconds of dispatch: on a 135M model that is more
 * time than the int4 matmuls themselves. Here a block is: RMSNorm, the fused q/k/v product,
 * the rotary embedding (HF's rotate-half convention over the first `rot_dim` dimensions of a
 * head, with the cos/sin torch's rotary module made for this position, so every RoPE scaling
 * variant is already in them), the new key and value written into the decoder's own cache,
 * attention of the one query over the cache (grouped KV heads as HF's repeat_kv: query head h
 * reads KV head h / (heads / kv_heads)), the output product, RMSNorm, the fused gate/up
 * product, SiLU(gate) * up, the down product; each product on the int4 kernel, everything in
 * float32 as the torch path computes it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "q4_native.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* q/k/v and gate/up are each one fused layer (parts = 1) or their layers one after another
 * (parts = 3 or 2: layers of different widths or groups, from a mixed-precision plan); either
 * way their outputs land side by side, q then k then v, gate then up. */
typedef struct {
    q4_layer qkv[3], o, gate_up[2], down;
    int qkv_parts, gate_up_parts;
    const float *norm1, *norm2;   /* RMSNorm weights [hidden] (Gemma's 1 + w, made once) */
    float *keys, *values;         /* this block's cache [kv_heads, max_len, head_dim] */
    const float *q_norm, *k_norm; /* Qwen3's per-head RMSNorm weights [head_dim], or NULL */
    /* Gemma 2/3: RMSNorms of the attention's and the MLP's outputs before each residual add
     * (norm2 is then the pre-MLP norm, their pre_feedforward_layernorm), or NULL */
    const float *attn_out_norm, *mlp_out_norm;
    int window;      /* a query sees its last `window` keys (Mistral, Gemma 2/3's sliding
                      * layers); 0: all */
    float scaling;   /* q . k scale: head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5 */
    float softcap;   /* Gemma 2: scores become softcap * tanh(score / softcap); 0: none */
    int rotation;    /* the row of the step's cos/sin this block rotates by (Gemma 3: local
                      * and global layers have their own bases); 0 for one rotation */
} q4_block;

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter, max_len;
    int rot_dim;  /* rotated dimensions of a head (< head_dim: a partial rotary factor) */
    float eps;
    int act;      /* the MLP's activation: 0 SiLU (Llama), 1 GELU, tanh approximation (Gemma) */
} q4_shape;

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* x [head_dim] rotated in place: its first rot_dim values by x * cos + rotate_half(x) * sin,
 * the rest as they are (Phi-3's partial rotation: HF's q_rot / q_pass). */
static void rotate(float *x, const float *cos, const float *sin, int rot_dim) {
    int half = rot_dim / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* out [head_dim] = softmax(cap(q . keys[0..length) * scaling)) . values, cap(s) = softcap *
 * tanh(s / softcap) when softcap > 0 (Gemma 2, before the softmax as HF's eager attention) */
static void attend(const float *q, const float *keys, const float *values, int length,
                   int head_dim, float scaling, float softcap, float *scores, float *out) {
    float top = -INFINITY;
    for (int t = 0; t < length; t++) {
        scores[t] = dot(q, keys + (size_t)t * head_dim, head_dim) * scaling;
        if (softcap > 0.0f) scores[t] = softcap * tanhf(scores[t] / softcap);
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.0f;
    for (int t = 0; t < length; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    memset(out, 0, sizeof(float) * (size_t)head_dim);
    for (int t = 0; t < length; t++) {
        float p = scores[t] / total;
        const float *v = values + (size_t)t * head_dim;
        for (int i = 0; i < head_dim; i++) out[i] += p * v[i];
    }
}

/* Everything below runs on every thread of one OpenMP team per token (q4_decode_blocks):
 * products and attention share their rows / heads out (`omp for`), the small serial steps
 * run on one thread (`omp single`), each ending at the team's barrier. One team per token
 * instead of one per product: ~200 fewer thread wake-ups per token. */

static void products(const q4_layer *layers, int parts, const float *x, float *y,
                     const q4_scratch *scratch, float *factors) {
    for (int i = 0; i < parts; i++) {
        q4_gemv_team(&layers[i], x, y, scratch, factors);
        y += layers[i].n;
    }
}

static int thread_number(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static void block_step(const q4_block *b, const q4_shape *s, float *x, const float *cos,
                       const float *sin, int position, float *work, float *scores,
                       const q4_scratch *scratch, float *factors) {
    int hd = s->head_dim, q_size = s->heads * hd, kv_size = s->kv_heads * hd;
    float *h = work, *qkv = h + s->hidden, *attn = qkv + q_size + 2 * kv_size;
    float *gate_up = attn + q_size, *act = gate_up + 2 * s->inter, *delta = act + s->inter;
    float *q = qkv, *k = qkv + q_size, *v = k + kv_size;
    cos += (size_t)b->rotation * s->rot_dim;
    sin += (size_t)b->rotation * s->rot_dim;

    #pragma omp single
    rms_norm(x, b->norm1, s->hidden, s->eps, h);
    products(b->qkv, b->qkv_parts, h, qkv, scratch, factors);
    #pragma omp single
    {
        for (int head = 0; head < s->heads; head++) {
            if (b->q_norm) rms_norm(q + head * hd, b->q_norm, hd, s->eps, q + head * hd);
            rotate(q + head * hd, cos, sin, s->rot_dim);
        }
        for (int head = 0; head < s->kv_heads; head++) {
            if (b->k_norm) rms_norm(k + head * hd, b->k_norm, hd, s->eps, k + head * hd);
            rotate(k + head * hd, cos, sin, s->rot_dim);
            size_t at = ((size_t)head * s->max_len + position) * hd;
            memcpy(b->keys + at, k + head * hd, sizeof(float) * (size_t)hd);
            memcpy(b->values + at, v + head * hd, sizeof(float) * (size_t)hd);
        }
    }
    int group = s->heads / s->kv_heads;
    int first = b->window > 0 && position + 1 > b->window ? position + 1 - b->window : 0;
    float *own_scores = scores + (size_t)thread_number() * s->max_len;
    #pragma omp for schedule(static)
    for (int head = 0; head < s->heads; head++) {
        size_t cache = ((size_t)(head / group) * s->max_len + first) * hd;
        attend(q + head * hd, b->keys + cache, b->values + cache, position + 1 - first, hd,
               b->scaling, b->softcap, own_scores, attn + head * hd);
    }
    q4_gemv_team(&b->o, attn, delta, scratch, factors);
    #pragma omp single
    {
        if (b->attn_out_norm) rms_norm(delta, b->attn_out_norm, s->hidden, s->eps, delta);
        for (int i = 0; i < s->hidden; i++) x[i] += delta[i];
        rms_norm(x, b->norm2, s->hidden, s->eps, h);
    }
    products(b->gate_up, b->gate_up_parts, h, gate_up, scratch, factors);
    #pragma omp for schedule(static)
    for (int i = 0; i < s->inter; i++) {
        float g = gate_up[i];
        float a = s->act == 1
            ? 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
            : g / (1.0f + expf(-g));
        act[i] = a * gate_up[s->inter + i];
    }
    q4_gemv_team(&b->down, act, delta, scratch, factors);
    #pragma omp single
    {
        if (b->mlp_out_norm) rms_norm(delta, b->mlp_out_norm, s->hidden, s->eps, delta);
        for (int i = 0; i < s->hidden; i++) x[i] += delta[i];
    }
}

/* x [hidden] (the token's embedding, replaced by the last block's output) through `count`
 * blocks at `position`, on `threads` threads; cos / sin [rotations, rot_dim], a block reading
 * its `rotation`'s row. Returns 0, or -1 when out of memory. */
int q4_decode_blocks(const q4_block *blocks, int count, const q4_shape *s, float *x,
                     const float *cos, const float *sin, int position, int threads) {
    int q_size = s->heads * s->head_dim, kv_size = s->kv_heads * s->head_dim;
    size_t floats = (size_t)s->hidden * 2 + q_size * 2 + 2 * kv_size + 3 * (size_t)s->inter;
    float *work = malloc(sizeof(float) * floats);
    float *scores = malloc(sizeof(float) * (size_t)s->max_len * (threads > 0 ? threads : 1));
    int widest = s->inter > s->hidden ? s->inter : s->hidden;
    if (q_size > widest) widest = q_size;
    q4_scratch scratch;
    if (!work || !scores || q4_scratch_alloc(&scratch, widest, 1)) {
        free(work);
        free(scores);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        float factors[widest / 32];
        for (int i = 0; i < count; i++)
            block_step(&blocks[i], s, x, cos, sin, position, work, scores, &scratch, factors);
    }
    q4_scratch_free(&scratch);
    free(work);
    free(scores);
    return 0;
}
