/* Decode rows through a whole stage in one call: every layer of a Llama-family stage for S sequences that
 * each bring one new token (node/model/decoder.py's Stage.forward hands its decode rows here when the stage's
 * linear layers run on the AMX kernels).
 *
 * Why: a decoder layer is ~60 torch ops at a few microseconds of dispatch each; for SmolLM2 that is more
 * than its four matmuls take at batch 1. Here a layer is the matmuls (lowbit.c) plus a few vector loops.
 *
 * Numerics follow node/model/decoder.py: float32 residual stream; RMSNorm in float32, its output rounded to bf16;
 * bf16 activations into the matmuls, bf16 outputs; rotary and attention in float32 from bf16 inputs,
 * rounded to bf16 where the module path rounds (q/k after rotary, attention output, silu(g) * u). The
 * rounding sequence differs in places from torch's, so decode rows always take this path (also inside a
 * batch with prefill chunks): a sequence's results never depend on what it is batched with.
 */
#include "lowbit.c"

#if ES_AMX
typedef struct {
    int64_t kind;            /* 4: int4 (codes, fp16 params), 8: int8 (codes, bf16 row scales) */
    const void *codes;       /* packed by node/lowbit/native.py */
    const uint16_t *params;  /* int4 params or int8 scales */
    const uint16_t *bias;    /* bf16 (N,) or NULL */
    int64_t n, k;            /* out, in features */
} es_linear;

typedef struct {
    es_linear qkv, o, gate_up, down;
    const float *norm1, *norm2; /* float32 (D,) RMSNorm weights */
} es_layer;

static void linear(const es_linear *l, const uint16_t *x, int64_t M, float *xs, uint16_t *y, int threads) {
    run(l->kind == 8, x, M, l->k, l->codes, l->kind == 8 ? 0 : l->params, l->kind == 8 ? l->params : 0, xs,
        l->n, y, threads);
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < l->n; j++)
                y[m * l->n + j] = f32_to_bf16(bf16_to_f32(y[m * l->n + j]) + bf16_to_f32(l->bias[j]));
}

/* out (bf16, D) = x / sqrt(mean(x^2) + eps) * w, in float32 (D % 16 == 0) */
static void rms_norm(const float *x, const float *w, int64_t D, float eps, uint16_t *out) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = _mm512_loadu_ps(x + d);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
    for (int64_t d = 0; d < D; d += 16)
        store_bf16(out + d, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + d), r), _mm512_loadu_ps(w + d)), 0xffff);
}

/* q and k heads of one row, in place: v * cos + roll(v, hd/2) * signed_sin (model.apply_rotary). */
static void rotary(uint16_t *heads, int64_t count, int64_t hd, const uint16_t *cos, const uint16_t *ssin) {
    const int vecs = (int)(hd / 16);
    __m512 c[ATT_MAX_HD / 16], sn[ATT_MAX_HD / 16], v[ATT_MAX_HD / 16];
    for (int i = 0; i < vecs; i++) {
        c[i] = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(cos + 16 * i)));
        sn[i] = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(ssin + 16 * i)));
    }
    for (int64_t h = 0; h < count; h++) {
        uint16_t *p = heads + h * hd;
        for (int i = 0; i < vecs; i++) v[i] = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(p + 16 * i)));
        for (int i = 0; i < vecs; i++) /* roll by hd/2 = vecs/2 whole vectors */
            store_bf16(p + 16 * i, _mm512_fmadd_ps(v[(i + vecs / 2) % vecs], sn[i], _mm512_mul_ps(v[i], c[i])), 0xffff);
    }
}

/* act (bf16, F) = silu(g) * u for gu = [g | u] (bf16, 2F), F % 16 == 0 */
static void silu_mul(const uint16_t *gu, int64_t F, uint16_t *act) {
    for (int64_t j = 0; j < F; j += 16) { /* exp_ps is exact to ~2e-7: far below the bf16 rounding that follows */
        const __m512 g = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(gu + j)));
        const __m512 u = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(gu + F + j)));
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
        store_bf16(act + j, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u), 0xffff);
    }
}

/* x (float32, n) += y (bf16, n), n % 16 == 0 */
static void add_bf16(float *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), bf16_to_ps(_mm256_loadu_si256((const __m256i *)(y + i)))));
}
#endif

/* Run `layers` decoder layers for S decode rows. x: float32 (S, D) residual stream, updated in place.
 * cos, ssin: bf16 (S, hd) rotary tables of each row's position. kv[s]: base of sequence s's cache buffer,
 * float/bf16 (layers, 2, Hkv, cap[s], hd) (node/model/kv_cache.py); pos[s]: the row's position. Returns 0, or -1
 * (out of memory, or shapes outside the kernels' range: the caller runs the module path instead). */
int es_decode_stage(const es_layer *layer_weights, int64_t layers, int64_t S, int64_t D, int64_t H,
                    int64_t Hkv, int64_t hd, int64_t F, float eps, float *x, const uint16_t *cos,
                    const uint16_t *ssin, const int64_t *kv, const int64_t *cap, const int64_t *pos, int threads) {
#if ES_AMX
    const int64_t group = H / Hkv, qkv_n = (H + 2 * Hkv) * hd;
    if (H % Hkv || group > ATT_MAX_GROUP || hd % 32 || hd > ATT_MAX_HD || D % 32 || F % 32) return -1;
    int64_t longest = 0;
    for (int64_t s = 0; s < S; s++) longest = pos[s] + 1 > longest ? pos[s] + 1 : longest;
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
    const int64_t narrow = MAX2(MAX2(D, F), H * hd);      /* norm outputs, silu(g) * u, o_proj output */
    const int64_t widest = MAX2(MAX2(qkv_n, 2 * F), D);   /* qkv, gate_up and down outputs */
    uint16_t *h = malloc(S * narrow * 2), *wide = malloc(S * widest * 2), *att = malloc(S * H * hd * 2);
    float *xs = malloc(S * (narrow / 32) * sizeof(float)); /* group sums of a matmul's input rows */
    float *scores = malloc(group * longest * sizeof(float));
    int rc = (h && wide && att && xs && scores) ? 0 : -1;
    for (int64_t l = 0; rc == 0 && l < layers; l++) {
        const es_layer *w = layer_weights + l;
        for (int64_t s = 0; s < S; s++) rms_norm(x + s * D, w->norm1, D, eps, h + s * D);
        linear(&w->qkv, h, S, xs, wide, threads); /* (S, (H + 2Hkv) * hd) */
        configure_attention();
        for (int64_t s = 0; s < S; s++) {
            uint16_t *row = wide + s * qkv_n;
            rotary(row, H + Hkv, hd, cos + s * hd, ssin + s * hd);
            uint16_t *kc = (uint16_t *)kv[s] + l * 2 * Hkv * cap[s] * hd, *vc = kc + Hkv * cap[s] * hd;
            for (int64_t g = 0; g < Hkv; g++) {
                memcpy(kc + (g * cap[s] + pos[s]) * hd, row + (H + g) * hd, hd * 2);
                memcpy(vc + (g * cap[s] + pos[s]) * hd, row + (H + Hkv + g) * hd, hd * 2);
            }
            for (int64_t g = 0; g < Hkv; g++)
                attend_group(row + g * group * hd, (int)group, hd, kc + g * cap[s] * hd, vc + g * cap[s] * hd,
                             pos[s] + 1, 1.0f / sqrtf((float)hd), scores, att + (s * H + g * group) * hd);
        }
        _tile_release();
        linear(&w->o, att, S, xs, h, threads); /* (S, D) */
        add_bf16(x, h, S * D);
        for (int64_t s = 0; s < S; s++) rms_norm(x + s * D, w->norm2, D, eps, h + s * D);
        linear(&w->gate_up, h, S, xs, wide, threads); /* (S, 2F) */
        for (int64_t s = 0; s < S; s++) silu_mul(wide + s * 2 * F, F, h + s * F);
        linear(&w->down, h, S, xs, wide, threads); /* (S, D) */
        add_bf16(x, wide, S * D);
    }
    free(h), free(wide), free(att), free(xs), free(scores);
    return rc;
#else
    return -1;
#endif
}
