/* Low-bit matrix products on Intel AMX: y (M, N) = x (M, K) @ W.T for W in int4 or int8, M up to ~64.
 *
 * Why: torch's CPU kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) run on AVX-512 FMAs and
 * dequantize once per input row, so 8 rows cost 4-5x one row and a batched decode step barely pays. Here
 * each block of 32 k x 16 n weights is expanded once to bf16 in L1 and multiplied with up to 16 input rows
 * by one AMX instruction (tdpbf16ps: a 16x32 by 32x16 product, fp32 accumulation), so 8 rows cost little
 * more than one; the expansion is a few byte operations per 64 weights.
 *
 * int4 trick: a 4-bit code q becomes the bf16 value 128 + q by OR-ing its bits into 0x4300 (exact), so a
 * block's product is C = sum_k (128 + q) x; with w = q * scale + min and xs = sum_k x over the group,
 *     sum_k w x = scale * C + xs * (min - 128 * scale) = scale * C + xs * z,
 * with z computed per block in fp32. All in fp32 after the bf16 x.
 * int8: codes are exact in bf16 (|q| <= 127); the per-row scale is applied to the fp32 sum.
 *
 * Needs AMX-BF16 (Intel Sapphire Rapids and later) and Linux's permission for tile data; built with
 * -march=native by node/lowbit/native.py. es_supported() says whether this CPU and kernel can run it; if not,
 * the layers keep torch's kernels.
 *
 * Layouts, made by node/lowbit/native.py (pack_int4 / pack_int8); N is padded to a multiple of 16:
 *   int4 codes uint8 (N/16, K/32, 256): the 512 codes of a (16 n x 32 k) block in AMX's B-tile order
 *        (row i = k pair 2i, 2i+1; 16 n per row, 2 k per n), packed so that 64 loaded bytes give four B
 *        rows: byte r < 32 of load j holds row 4j's code r (low nibble) and row 4j+2's (high); byte 32+r,
 *        rows 4j+1 and 4j+3. params float16 (N/16, K/32, 2, 16): scale and min for the block's 16 n
 *        (fp16: GGUF's own field type, and weight bytes are what a decode step waits for).
 *   int8 codes int8 (N/16, K/32, 512) in B-tile order; scales bf16 (N,).
 *   x bf16 (M, K), K % 32 == 0; y bf16 (M, N) rounded to nearest even.
 * Each output element is computed by the same operations whatever M is: a sequence gets bit-identical
 * results alone or batched with others.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512BF16__) && defined(__linux__)
#define ES_AMX 1
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define ES_AMX 0
#endif

#if ES_AMX
#define TILE_ROWS 16 /* input rows per tile product */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Tiles: 0 = x (rows x 32 bf16); 1, 3 = weights (16 k pairs x 16 n x 2 bf16); 2, 4 = fp32 (rows x 16 n). */
static void configure(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    cfg.rows[0] = (uint8_t)rows, cfg.colsb[0] = 64;
    cfg.rows[1] = 16, cfg.colsb[1] = 64;
    cfg.rows[2] = (uint8_t)rows, cfg.colsb[2] = 64;
    cfg.rows[3] = 16, cfg.colsb[3] = 64;
    cfg.rows[4] = (uint8_t)rows, cfg.colsb[4] = 64;
    _tile_loadconfig(&cfg);
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN (as torch) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __m512 bf16_to_ps(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* 16 floats -> bf16 (round to nearest even, as torch; the instruction flushes denormals), lanes in `keep` */
static inline void store_bf16(uint16_t *dst, __m512 v, __mmask16 keep) {
    _mm256_mask_storeu_epi16(dst, keep, (__m256i)_mm512_cvtneps_pbh(v));
}

/* xs[m * groups + g] = sum of x[m, 32g .. 32g+31] in fp32 (fixed order). */
static void group_sums(const uint16_t *x, int64_t M, int64_t K, float *xs) {
    const int64_t groups = K / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *p = x + m * K + g * 32;
            const __m512 a = bf16_to_ps(_mm256_loadu_si256((const __m256i *)p));
            const __m512 b = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));
            xs[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
}

/* 256 packed bytes -> the 16 x 64-byte B tile of bf16 (128 + q) values: a code byte q interleaved with
 * the byte 0x43 is the bf16 word 0x4300 | q. unpacklo/hi interleave within 128-bit lanes; pack_int4 lays
 * the codes out in that order. */
static inline void expand_int4(const uint8_t *codes, uint16_t *tile) {
    const __m512i low4 = _mm512_set1_epi8(15), magic = _mm512_set1_epi8(0x43);
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_loadu_si512((const void *)(codes + 64 * j));
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        uint16_t *t = tile + 4 * j * 32;
        _mm512_store_si512(t, _mm512_unpacklo_epi8(lo, magic));
        _mm512_store_si512(t + 32, _mm512_unpackhi_epi8(lo, magic));
        _mm512_store_si512(t + 64, _mm512_unpacklo_epi8(hi, magic));
        _mm512_store_si512(t + 96, _mm512_unpackhi_epi8(hi, magic));
    }
}

/* 512 int8 codes -> the B tile of their bf16 values (exact). */
static inline void expand_int8(const int8_t *codes, uint16_t *tile) {
    for (int i = 0; i < 16; i++) {
        const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * i))));
        const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * i + 16))));
        _mm512_store_si512(tile + 32 * i, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}

/* `nblk` (1 or 2, a constant after inlining) blocks of 16 output columns for `rows` input rows starting at
 * x; out[b]: (rows, 16) fp32. Two blocks share each x tile load and give the tile unit two independent
 * chains to overlap. */
static inline __attribute__((always_inline)) void int4_blocks(
    int nblk, const uint16_t *x, int rows, int64_t K, const uint8_t *codes, const uint16_t *params, const float *xs,
    float out[2][TILE_ROWS][16]) {
    const int64_t groups = K / 32;
    uint16_t tile[2][512] __attribute__((aligned(64)));
    float c[2][TILE_ROWS * 16] __attribute__((aligned(64)));
    __m512 acc[2][TILE_ROWS];
    for (int b = 0; b < nblk; b++)
        for (int m = 0; m < rows; m++) acc[b][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        /* weights stream from L3/DRAM once per token: ask for the next groups' lines early */
        _mm_prefetch((const char *)(codes + (g + 4) * 256), _MM_HINT_T0);
        _mm_prefetch((const char *)(codes + (g + 4) * 256 + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(params + (g + 4) * 32), _MM_HINT_T0);
        if (nblk == 2) {
            _mm_prefetch((const char *)(codes + (groups + g + 4) * 256), _MM_HINT_T0);
            _mm_prefetch((const char *)(codes + (groups + g + 4) * 256 + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(params + (groups + g + 4) * 32), _MM_HINT_T0);
        }
        expand_int4(codes + g * 256, tile[0]);
        if (nblk == 2) expand_int4(codes + (groups + g) * 256, tile[1]);
        _tile_loadd(0, x + g * 32, K * 2);
        _tile_zero(2);
        _tile_loadd(1, tile[0], 64);
        _tile_dpbf16ps(2, 0, 1);
        if (nblk == 2) {
            _tile_zero(4);
            _tile_loadd(3, tile[1], 64);
            _tile_dpbf16ps(4, 0, 3);
        }
        _tile_stored(2, c[0], 64);
        if (nblk == 2) _tile_stored(4, c[1], 64);
        for (int b = 0; b < nblk; b++) {
            const uint16_t *p = params + (b * groups + g) * 32;
            const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
            const __m512 z = _mm512_fmadd_ps(scale, _mm512_set1_ps(-128.0f),
                                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16))));
            for (int m = 0; m < rows; m++) {
                acc[b][m] = _mm512_fmadd_ps(scale, _mm512_load_ps(c[b] + 16 * m), acc[b][m]);
                acc[b][m] = _mm512_fmadd_ps(_mm512_set1_ps(xs[m * groups + g]), z, acc[b][m]);
            }
        }
    }
    for (int b = 0; b < nblk; b++)
        for (int m = 0; m < rows; m++) _mm512_storeu_ps(out[b][m], acc[b][m]);
}

/* `nblk` (1 or 2) blocks of 16 output columns, int8 weights: the tile accumulates over all of K (the row
 * scale is applied afterwards), two blocks interleaved as in int4_blocks. */
static inline __attribute__((always_inline)) void int8_blocks(int nblk, const uint16_t *x, int64_t K,
                                                              const int8_t *codes, float out[2][TILE_ROWS][16]) {
    const int64_t groups = K / 32;
    uint16_t tile[2][512] __attribute__((aligned(64)));
    _tile_zero(2);
    if (nblk == 2) _tile_zero(4);
    for (int64_t g = 0; g < groups; g++) {
        for (int b = 0; b < nblk; b++)
            for (int line = 0; line < 512; line += 64)
                _mm_prefetch((const char *)(codes + (b * groups + g + 4) * 512 + line), _MM_HINT_T0);
        expand_int8(codes + g * 512, tile[0]);
        if (nblk == 2) expand_int8(codes + (groups + g) * 512, tile[1]);
        _tile_loadd(0, x + g * 32, K * 2);
        _tile_loadd(1, tile[0], 64);
        _tile_dpbf16ps(2, 0, 1);
        if (nblk == 2) {
            _tile_loadd(3, tile[1], 64);
            _tile_dpbf16ps(4, 0, 3);
        }
    }
    _tile_stored(2, out[0], 64);
    if (nblk == 2) _tile_stored(4, out[1], 64);
}

static void run_blocks(int int8, const uint16_t *x, int64_t M, int64_t K, const void *codes, const uint16_t *params,
                       const uint16_t *scales, const float *xs, int64_t N, uint16_t *y, int64_t b0, int64_t b1) {
    const int64_t groups = K / 32;
    int configured = -1;
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const int rows = (int)(M - m0 < TILE_ROWS ? M - m0 : TILE_ROWS);
        if (rows != configured) configure(rows), configured = rows;
        for (int64_t nb = b0; nb < b1;) {
            float out[2][TILE_ROWS][16] __attribute__((aligned(64)));
            int nblk = 1;
            if (int8) {
                const int8_t *c = (const int8_t *)codes + nb * groups * 512;
                nblk = nb + 1 < b1 ? 2 : 1;
                if (nblk == 2)
                    int8_blocks(2, x + m0 * K, K, c, out);
                else
                    int8_blocks(1, x + m0 * K, K, c, out);
            } else {
                const uint8_t *c = (const uint8_t *)codes + nb * groups * 256;
                const uint16_t *p = params + nb * groups * 32;
                nblk = nb + 1 < b1 ? 2 : 1;
                if (nblk == 2)
                    int4_blocks(2, x + m0 * K, rows, K, c, p, xs + m0 * groups, out);
                else
                    int4_blocks(1, x + m0 * K, rows, K, c, p, xs + m0 * groups, out);
            }
            for (int b = 0; b < nblk; b++, nb++) {
                const int64_t n_end = (nb + 1) * 16 <= N ? 16 : N - nb * 16;
                const __mmask16 keep = (__mmask16)((1u << n_end) - 1);
                const __m512 scale = int8 ? bf16_to_ps(_mm256_maskz_loadu_epi16(keep, scales + nb * 16))
                                          : _mm512_set1_ps(1.0f);
                for (int m = 0; m < rows; m++)
                    store_bf16(y + (m0 + m) * N + nb * 16, _mm512_mul_ps(_mm512_load_ps(out[b][m]), scale), keep);
            }
        }
    }
    _tile_release();
}

static void run(int int8, const uint16_t *x, int64_t M, int64_t K, const void *codes, const uint16_t *params,
                const uint16_t *scales, float *xs, int64_t N, uint16_t *y, int threads) {
    const int64_t blocks = (N + 15) / 16;
    if (!int8) group_sums(x, M, K, xs);
    if (threads <= 1 || blocks * K * M < (1 << 21)) {
        run_blocks(int8, x, M, K, codes, params, scales, xs, N, y, 0, blocks);
        return;
    }
#pragma omp parallel num_threads(threads)
    { /* a contiguous slice of n-blocks per thread; the arithmetic per element is the serial path's */
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        run_blocks(int8, x, M, K, codes, params, scales, xs, N, y, blocks * t / nt, blocks * (t + 1) / nt);
    }
}

/* ---- Decode attention: one new query row per sequence, several sequences per call ----------------------
 *
 * For each sequence s and kv head: scores = q K^T * scale over its cached keys (AMX: 16 keys x 32 dims
 * per tile product, the query heads of the group as the other operand), a float32 softmax, and
 * out = P V with AVX-512 FMAs (node/lowbit/csrc/decode.c writes the new token's k and v into the cache first).
 */

/* exp(x) as 2^n * p(f), |rel err| < 2e-7; x < -87 gives exp(-87), large x overflows to inf */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n); /* in [-0.5, 0.5]; 2^f = e^(f ln2) */
    const __m512 r = _mm512_mul_ps(f, _mm512_set1_ps(0.693147180559945f));
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#define ATT_MAX_GROUP 16 /* query heads per kv head */
#define ATT_MAX_HD 256

/* Tiles for attend_group: 0 = 16 keys x 32 dims; 1 = q^T, 16 dim pairs x heads; 3 = scores, 16 keys x heads */
static void configure_attention(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    cfg.rows[0] = 16, cfg.colsb[0] = 64;
    cfg.rows[1] = 16, cfg.colsb[1] = (uint16_t)(ATT_MAX_GROUP * 4);
    cfg.rows[3] = 16, cfg.colsb[3] = (uint16_t)(ATT_MAX_GROUP * 4);
    _tile_loadconfig(&cfg);
}

#define ATT_AHEAD 64 /* keys prefetched ahead of the q.K tile products */

/* Prefetch the key and value rows [from, to) of one kv head, (len, hd) bf16 each. */
static inline void prefetch_rows(const uint16_t *k, const uint16_t *v, int64_t from, int64_t to, int64_t hd) {
    const char *kb = (const char *)(k + from * hd), *vb = (const char *)(v + from * hd);
    for (int64_t off = 0; off < (to - from) * hd * 2; off += 64) {
        _mm_prefetch(kb + off, _MM_HINT_T0);
        _mm_prefetch(vb + off, _MM_HINT_T0);
    }
}

/* Attend the `group` query heads q (group, hd) bf16 to keys/values (len, hd) bf16 of one kv head;
 * out (group, hd) bf16. scores: float scratch of group * len. */
static void attend_group(const uint16_t *q, int group, int64_t hd, const uint16_t *k, const uint16_t *v,
                         int64_t len, float scale, float *scores, uint16_t *out) {
    const int chunks = (int)(hd / 32);
    /* q^T in the B-tile layout per 32-dim chunk: row i = dims (2i, 2i+1) of every head */
    uint32_t qt[ATT_MAX_HD / 32][16][ATT_MAX_GROUP] __attribute__((aligned(64)));
    const uint32_t *q32 = (const uint32_t *)q;
    for (int c = 0; c < chunks; c++)
        for (int i = 0; i < 16; i++)
            for (int h = 0; h < group; h++) qt[c][i][h] = q32[h * (hd / 2) + c * 16 + i];
    float blk[16][ATT_MAX_GROUP] __attribute__((aligned(64)));
    uint16_t last[16 * ATT_MAX_HD] __attribute__((aligned(64))); /* the last < 16 keys, zero-padded */
    /* The cache comes from DRAM (a step streams all the stage's weights between two visits of a layer),
     * and tile loads touch 16 strided lines at once: ask for the keys and values ATT_AHEAD keys early. */
    prefetch_rows(k, v, 0, ATT_AHEAD < len ? ATT_AHEAD : len, hd);
    for (int64_t j0 = 0; j0 < len; j0 += 16) { /* C (16 keys x group) = K rows . q^T */
        if (j0 + ATT_AHEAD < len)
            prefetch_rows(k, v, j0 + ATT_AHEAD, j0 + ATT_AHEAD + 16 < len ? j0 + ATT_AHEAD + 16 : len, hd);
        const int64_t keys = len - j0 < 16 ? len - j0 : 16;
        const uint16_t *kb = k + j0 * hd;
        if (keys < 16) { /* the same tile products as a full block: a key's score never depends on len */
            memcpy(last, kb, keys * hd * 2);
            memset(last + keys * hd, 0, (16 - keys) * hd * 2);
            kb = last;
        }
        _tile_zero(3);
        for (int c = 0; c < chunks; c++) {
            _tile_loadd(0, kb + c * 32, hd * 2);
            _tile_loadd(1, qt[c], ATT_MAX_GROUP * 4);
            _tile_dpbf16ps(3, 0, 1);
        }
        _tile_stored(3, blk, ATT_MAX_GROUP * 4);
        for (int j = 0; j < keys; j++)
            for (int h = 0; h < group; h++) scores[h * len + j0 + j] = blk[j][h] * scale;
    }
    for (int h = 0; h < group; h++) { /* softmax in place */
        float *sc = scores + h * len;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sc + j));
        float mx = _mm512_reduce_max_ps(vmax);
        for (; j < len; j++) mx = sc[j] > mx ? sc[j] : mx;
        const __m512 vm = _mm512_set1_ps(mx);
        __m512 vsum = _mm512_setzero_ps();
        for (j = 0; j + 16 <= len; j += 16) {
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sc + j), vm));
            _mm512_storeu_ps(sc + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (j < len) {
            const __mmask16 tail = (__mmask16)((1u << (len - j)) - 1);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + j), vm));
            _mm512_mask_storeu_ps(sc + j, tail, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(tail, e));
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
        for (j = 0; j < len; j++) sc[j] *= inv;
    }
    __m512 acc[ATT_MAX_GROUP][ATT_MAX_HD / 16]; /* out = P V, fp32 */
    const int vecs = (int)(hd / 16);
    for (int h = 0; h < group; h++)
        for (int c = 0; c < vecs; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        for (int c = 0; c < vecs; c++) {
            const __m512 vv = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(v + j * hd + 16 * c)));
            for (int h = 0; h < group; h++)
                acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * len + j]), vv, acc[h][c]);
        }
    }
    for (int h = 0; h < group; h++)
        for (int c = 0; c < vecs; c++) store_bf16(out + h * hd + 16 * c, acc[h][c], 0xffff);
}
#endif /* ES_AMX */

/* 1 when this build and this CPU/kernel can run the kernels (asks Linux for AMX tile data once). */
int es_supported(void) {
#if ES_AMX
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
#else
    return 0;
#endif
}

/* Returns 0, or -1 when its scratch (the input rows' group sums) cannot be allocated. */
int es_int4_mm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *params, int64_t N,
               uint16_t *y, int threads) {
#if ES_AMX
    float *xs = malloc((size_t)(M * (K / 32)) * sizeof(float));
    if (!xs) return -1;
    run(0, x, M, K, codes, params, 0, xs, N, y, threads);
    free(xs);
#endif
    return 0;
}

void es_int8_mm(const uint16_t *x, int64_t M, int64_t K, const int8_t *codes, const uint16_t *scales,
                int64_t N, uint16_t *y, int threads) {
#if ES_AMX
    run(1, x, M, K, codes, 0, scales, 0, N, y, threads);
#endif
}
