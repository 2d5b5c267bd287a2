/* Low-bit products and whole-stage decode on CPUs without AMX: x86 AVX2+FMA, AVX-512 (with or without VNNI),
 * ARM NEON (with or without the dot-product instructions), and a plain C fallback. One source, compiled once
 * per instruction set with explicit flags by node/lowbit/native.py (never -march=native: a build cache shared by
 * different CPUs must not hand one of them instructions it lacks); the ISA is chosen at run time.
 *
 * Why: torch's int4/int8 CPU kernels dequantize weights to float for every input row, which makes decode
 * ~0.7x llama.cpp's speed, and their per-row arithmetic depends on how many rows are batched (a greedy
 * answer changed with its batch). Here, as in llama.cpp, each input row is quantized to int8 per block of 32
 * (a float scale dx and, for the int4 min term, the block's code sum), and weight codes are multiplied with
 * those int8 codes by integer dot-product instructions (AVX-512 VNNI vpdpbusd, AVX2/AVX-512BW vpmaddubsw,
 * NEON sdot or smull): within a block the sum is exact integer arithmetic. The per-block float terms are
 * accumulated per output element in a fixed order, so an output depends only on its own row: a row gives
 * bit-identical results alone or in a batch of any size, with any number of threads. Several rows (batched
 * decode, prefill chunks) go through tiles of up to TILE_ROWS rows that load and expand each weight block
 * once for all of them, with each output's operations exactly the one-row kernel's.
 *
 *   int4 (w = q * scale + min per 32):   y[n] = sum_b (scale[n,b] * dx_b) * isum[n,b] + min[n,b] * (dx_b * xsum_b)
 *   int8 (w = q * rowscale[n]):          y[n] = rowscale[n] * sum_b dx_b * isum[n,b]
 * with isum the exact integer dot product of block b's 32 weight codes and the row's 32 int8 codes.
 *
 * Weight layout (node/lowbit/native.py pack_dot_int4 / pack_dot_int8), N padded to a multiple of 16, K % 32 == 0:
 * 16 output rows x 32 inputs per block; inside a block, "k quad" kq = k / 4 (0..7), and the unpacked order is
 * [kq][n 0..15][k % 4] (64 bytes per kq): one 512-bit vector, two 256-bit or four 128-bit vectors hold the
 * 4 consecutive codes of 16 (8, 4) output rows, which is the operand shape of vpdpbusd / sdot with one
 * 4-byte group of the input row broadcast.
 *   int4 codes uint8 (N/16, K/32, 256): byte i of 64-byte chunk j (0..3) holds kq j's code i (low nibble)
 *        and kq j+4's (high nibble); params float16 (N/16, K/32, 2, 16): scale, then min, of the 16 rows.
 *   int8 codes int8 (N/16, K/32, 512) in the unpacked order; row scales bf16 (N,).
 * Activations x bf16 (M, K), outputs y bf16 (M, N), rounded to nearest even.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(ES_FORCE_GENERIC) /* the plain-C reference: aarch64 compilers enable NEON by default */
#define ES_ISA "generic"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ES_ISA "avx512-vnni"
#define ES_X86 512
#define ES_VNNI 1
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define ES_ISA "avx512"
#define ES_X86 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ES_ISA "avx2"
#define ES_X86 256
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define ES_ISA "neon-dot"
#define ES_NEON 1
#define ES_SDOT 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define ES_ISA "neon"
#define ES_NEON 1
#else
#define ES_ISA "generic"
#endif

#if defined(ES_X86)
#include <immintrin.h>
#elif defined(ES_NEON)
#include <arm_neon.h>
#endif

/* ---- scalar helpers (fixed rounding; the build uses -ffp-contract=off so a*b+c is never fused silently) -- */

static inline float bf16_f(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f_bf16(float f) { /* round to nearest even, NaN stays NaN (as torch) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_f(uint16_t h) { /* IEEE half -> float, exact (subnormals, inf, NaN) */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    uint32_t u;
    if (e == 31) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112u) << 23) | (m << 13);
    else { /* zero or subnormal: m * 2^-24 */
        float f = (float)m * 5.9604644775390625e-8f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- input rows -> int8 per block of 32 ------------------------------------------------------------------ */

/* Row x (K bf16) -> q (K int8), d[b] = amax_b / 127, s[b] = d[b] * sum_k q (llama.cpp's Q8_1 fields). */
static void quantize_row(const uint16_t *x, int64_t K, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < K / 32; b++) {
        float v[32], amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            v[i] = bf16_f(x[32 * b + i]);
            const float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        const float dd = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            float r = nearbyintf(v[i] * id);
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            q[32 * b + i] = (int8_t)r;
            sum += (int)r;
        }
        d[b] = dd, s[b] = dd * (float)sum;
    }
}

/* ---- one block of 16 output rows x all K, for one input row: out[16] ------------------------------------- */

static inline int32_t quad(const int8_t *p) { /* 4 input codes as one 32-bit word (broadcast operand) */
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Weights stream from DRAM once per token (a stage's weights do not fit the caches): ask for the lines
 * PREFETCH bytes ahead of the current block, in both streams (codes and parameters). */
#define PREFETCH 1024
#if defined(ES_X86)
#define prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#elif defined(__GNUC__)
#define prefetch(p) __builtin_prefetch((p), 0, 3)
#else
#define prefetch(p) ((void)(p))
#endif

/* An empty asm that "changes" v: the compiler must have v in a register here, so it cannot regroup a tile's
 * integer sums into one tree of all its products (gcc does, then spills them: exact either way, but slow). */
#if defined(__GNUC__) && defined(ES_X86)
#define KEEP(v) __asm__("" : "+x"(v))
#elif defined(__GNUC__) && defined(ES_NEON)
#define KEEP(v) __asm__("" : "+w"(v))
#else
#define KEEP(v) ((void)0)
#endif

#if ES_X86 == 512
static void int4_row(const uint8_t *codes, const uint16_t *params, int64_t groups, const int8_t *xq,
                     const float *xd, const float *xs, float *out) {
    const __m512i low4 = _mm512_set1_epi8(15);
#ifndef ES_VNNI
    const __m512i ones = _mm512_set1_epi16(1);
#endif
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256;
        const int8_t *x = xq + g * 32;
        prefetch(c + PREFETCH), prefetch(c + PREFETCH + 64), prefetch(c + PREFETCH + 128), prefetch(c + PREFETCH + 192);
        prefetch(params + g * 32 + PREFETCH / 4);
#ifdef ES_VNNI
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(c + 64 * j));
            const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            s0 = _mm512_dpbusd_epi32(s0, lo, _mm512_set1_epi32(quad(x + 4 * j)));
            s1 = _mm512_dpbusd_epi32(s1, hi, _mm512_set1_epi32(quad(x + 16 + 4 * j)));
        }
        const __m512i isum = _mm512_add_epi32(s0, s1);
#else /* u8 x s8 pairs into int16: 16 products of <= 15 * 127 per lane stay below 2^15 */
        __m512i s16 = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(c + 64 * j));
            const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            s16 = _mm512_add_epi16(s16, _mm512_maddubs_epi16(lo, _mm512_set1_epi32(quad(x + 4 * j))));
            s16 = _mm512_add_epi16(s16, _mm512_maddubs_epi16(hi, _mm512_set1_epi32(quad(x + 16 + 4 * j))));
        }
        const __m512i isum = _mm512_madd_epi16(s16, ones);
#endif
        const uint16_t *p = params + g * 32;
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 minv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(scale, _mm512_set1_ps(xd[g])), acc);
        acc = _mm512_fmadd_ps(minv, _mm512_set1_ps(xs[g]), acc);
    }
    _mm512_storeu_ps(out, acc);
}

static void int8_row(const int8_t *codes, int64_t groups, const int8_t *xq, const float *xd, float *out) {
    const __m512i zero = _mm512_setzero_si512();
#ifndef ES_VNNI
    const __m512i ones = _mm512_set1_epi16(1);
#endif
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512;
        const int8_t *x = xq + g * 32;
        for (int line = 0; line < 512; line += 64) prefetch(c + 2 * PREFETCH + line);
        __m512i s0 = zero, s1 = zero;
        for (int kq = 0; kq < 8; kq += 2) { /* |w| (u8) times x with w's sign: exact, no saturation */
            const __m512i w0 = _mm512_loadu_si512((const void *)(c + 64 * kq));
            const __m512i w1 = _mm512_loadu_si512((const void *)(c + 64 * kq + 64));
            const __m512i x0 = _mm512_set1_epi32(quad(x + 4 * kq)), x1 = _mm512_set1_epi32(quad(x + 4 * kq + 4));
            const __m512i a0 = _mm512_abs_epi8(w0), a1 = _mm512_abs_epi8(w1);
            const __m512i b0 = _mm512_mask_sub_epi8(x0, _mm512_movepi8_mask(w0), zero, x0);
            const __m512i b1 = _mm512_mask_sub_epi8(x1, _mm512_movepi8_mask(w1), zero, x1);
#ifdef ES_VNNI
            s0 = _mm512_dpbusd_epi32(s0, a0, b0);
            s1 = _mm512_dpbusd_epi32(s1, a1, b1);
#else
            s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(_mm512_maddubs_epi16(a0, b0), ones));
            s1 = _mm512_add_epi32(s1, _mm512_madd_epi16(_mm512_maddubs_epi16(a1, b1), ones));
#endif
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_set1_ps(xd[g]), acc);
    }
    _mm512_storeu_ps(out, acc);
}

/* Tiles of R input rows (R <= TILE_ROWS) x the block's 16 outputs: the weight codes are loaded and
 * expanded once per tile and multiplied with every row of it (see the AVX2 version for why). Per output the
 * operations are exactly int4_row's / int8_row's. Compiled and reviewed, not run: no AVX-512 machine yet. */
#define TILE_ROWS 4
#define TILE_HALVES 1
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *codes, const uint16_t *params,
                                                            int64_t groups, const int8_t *xq, int64_t K,
                                                            const float *xd, const float *xs, int h, int R,
                                                            int pf, float (*out)[16]) {
    (void)h;
    const __m512i low4 = _mm512_set1_epi8(15);
#ifndef ES_VNNI
    const __m512i ones = _mm512_set1_epi16(1);
#endif
    __m512 acc[TILE_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256;
        if (pf) {
            prefetch(c + PREFETCH), prefetch(c + PREFETCH + 64), prefetch(c + PREFETCH + 128);
            prefetch(c + PREFETCH + 192), prefetch(params + g * 32 + PREFETCH / 4);
        }
        __m512i s[TILE_ROWS];
        for (int r = 0; r < R; r++) s[r] = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(c + 64 * j));
            const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            for (int r = 0; r < R; r++) {
                const int8_t *x = xq + r * K + g * 32;
#ifdef ES_VNNI
                s[r] = _mm512_dpbusd_epi32(s[r], lo, _mm512_set1_epi32(quad(x + 4 * j)));
                s[r] = _mm512_dpbusd_epi32(s[r], hi, _mm512_set1_epi32(quad(x + 16 + 4 * j)));
#else
                const __m512i pl = _mm512_maddubs_epi16(lo, _mm512_set1_epi32(quad(x + 4 * j)));
                const __m512i ph = _mm512_maddubs_epi16(hi, _mm512_set1_epi32(quad(x + 16 + 4 * j)));
                s[r] = _mm512_add_epi16(s[r], _mm512_add_epi16(pl, ph));
#endif
            }
        }
        const uint16_t *p = params + g * 32;
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 minv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));
        for (int r = 0; r < R; r++) {
#ifdef ES_VNNI
            const __m512i isum = s[r];
#else
            const __m512i isum = _mm512_madd_epi16(s[r], ones);
#endif
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(scale, _mm512_set1_ps(xd[r * groups + g])), acc[r]);
            acc[r] = _mm512_fmadd_ps(minv, _mm512_set1_ps(xs[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out[r], acc[r]);
}

static inline __attribute__((always_inline)) void int8_tile(const int8_t *codes, int64_t groups, const int8_t *xq,
                                                            int64_t K, const float *xd, int h, int R, int pf,
                                                            float (*out)[16]) {
    (void)h;
    const __m512i zero = _mm512_setzero_si512();
#ifndef ES_VNNI
    const __m512i ones = _mm512_set1_epi16(1);
#endif
    __m512 acc[TILE_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512;
        if (pf)
            for (int line = 0; line < 512; line += 64) prefetch(c + 2 * PREFETCH + line);
        __m512i s[TILE_ROWS];
        for (int r = 0; r < R; r++) s[r] = zero;
        for (int kq = 0; kq < 8; kq++) { /* |w| (u8) times x with w's sign, as int8_row */
            const __m512i w = _mm512_loadu_si512((const void *)(c + 64 * kq)), a = _mm512_abs_epi8(w);
            const __mmask64 neg = _mm512_movepi8_mask(w);
            for (int r = 0; r < R; r++) {
                const __m512i xb = _mm512_set1_epi32(quad(xq + r * K + g * 32 + 4 * kq));
                const __m512i b = _mm512_mask_sub_epi8(xb, neg, zero, xb);
#ifdef ES_VNNI
                s[r] = _mm512_dpbusd_epi32(s[r], a, b);
#else
                s[r] = _mm512_add_epi32(s[r], _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), ones));
#endif
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), _mm512_set1_ps(xd[r * groups + g]), acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out[r], acc[r]);
}

#elif ES_X86 == 256
static void int4_row(const uint8_t *codes, const uint16_t *params, int64_t groups, const int8_t *xq,
                     const float *xd, const float *xs, float *out) {
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256;
        const int8_t *x = xq + g * 32;
        prefetch(c + PREFETCH), prefetch(c + PREFETCH + 64), prefetch(c + PREFETCH + 128), prefetch(c + PREFETCH + 192);
        prefetch(params + g * 32 + PREFETCH / 4);
        /* rows 0-7 and 8-15 of the block: u8 x s8 pairs into int16 (16 products <= 15 * 127 per lane) */
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i xl = _mm256_set1_epi32(quad(x + 4 * j)), xh = _mm256_set1_epi32(quad(x + 16 + 4 * j));
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(c + 64 * j));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(c + 64 * j + 32));
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low4), xl));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low4), xl));
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(h0, xh));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(h1, xh));
        }
        const uint16_t *p = params + g * 32;
        const __m256 dx = _mm256_set1_ps(xd[g]), sx = _mm256_set1_ps(xs[g]);
        const __m256 sc0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 sc1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
        const __m256 mn0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
        const __m256 mn1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 24)));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s0, ones)), _mm256_mul_ps(sc0, dx), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s1, ones)), _mm256_mul_ps(sc1, dx), acc1);
        acc0 = _mm256_fmadd_ps(mn0, sx, acc0);
        acc1 = _mm256_fmadd_ps(mn1, sx, acc1);
    }
    _mm256_storeu_ps(out, acc0);
    _mm256_storeu_ps(out + 8, acc1);
}

static void int8_row(const int8_t *codes, int64_t groups, const int8_t *xq, const float *xd, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512;
        const int8_t *x = xq + g * 32;
        for (int line = 0; line < 512; line += 64) prefetch(c + 2 * PREFETCH + line);
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int kq = 0; kq < 8; kq++) { /* |w| (u8) times x with w's sign: pairs <= 2 * 127^2, no saturation */
            const __m256i xb = _mm256_set1_epi32(quad(x + 4 * kq));
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(c + 64 * kq));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(c + 64 * kq + 32));
            const __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(xb, w0));
            const __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(xb, w1));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, ones));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, ones));
        }
        const __m256 dx = _mm256_set1_ps(xd[g]);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), dx, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), dx, acc1);
    }
    _mm256_storeu_ps(out, acc0);
    _mm256_storeu_ps(out + 8, acc1);
}

/* Tiles of R input rows (R <= TILE_ROWS) x one 8-output half h of a 16-row block: the weight codes are
 * loaded and expanded once per tile and multiplied with every row of it, so R rows cost far less than R
 * single-row passes (batched decode, prefill chunks). Per output the operations are exactly int4_row's /
 * int8_row's (exact int16 / int32 block sums, then the same float steps in the same order): a row's bits do
 * not depend on the tile it lands in. R is a compile-time constant in each instance (TILE_FNS), so the
 * accumulators stay in the 16 ymm registers: 4 rows = 4 int sums + 4 float sums + the expanded weights. */
#define TILE_ROWS 4
#define TILE_HALVES 2 /* a tile covers 8 of the block's 16 outputs */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *codes, const uint16_t *params,
                                                            int64_t groups, const int8_t *xq, int64_t K,
                                                            const float *xd, const float *xs, int h, int R,
                                                            int pf, float (*out)[16]) {
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[TILE_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256 + 32 * h;
        if (pf) { /* the first pass over a block streams it in; the others find it in L1 */
            prefetch(c + PREFETCH), prefetch(c + PREFETCH + 64), prefetch(c + PREFETCH + 128);
            prefetch(c + PREFETCH + 192), prefetch(params + g * 32 + PREFETCH / 4);
        }
        __m256i s[TILE_ROWS];
        for (int r = 0; r < R; r++) s[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 64 * j));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int r = 0; r < R; r++) {
                const int8_t *x = xq + r * K + g * 32;
                const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(x + 4 * j)));
                const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(x + 16 + 4 * j)));
                s[r] = _mm256_add_epi16(s[r], _mm256_add_epi16(pl, ph));
                KEEP(s[r]);
            }
        }
        const uint16_t *p = params + g * 32 + 8 * h;
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
        for (int r = 0; r < R; r++) {
            const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[r], ones));
            acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(sc, _mm256_set1_ps(xd[r * groups + g])), acc[r]);
            acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
}

static inline __attribute__((always_inline)) void int8_tile(const int8_t *codes, int64_t groups, const int8_t *xq,
                                                            int64_t K, const float *xd, int h, int R, int pf,
                                                            float (*out)[16]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[TILE_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512 + 32 * h;
        if (pf)
            for (int line = 0; line < 512; line += 64) prefetch(c + 2 * PREFETCH + line);
        __m256i s[TILE_ROWS];
        for (int r = 0; r < R; r++) s[r] = _mm256_setzero_si256();
        for (int kq = 0; kq < 8; kq++) { /* |w| (u8) times x with w's sign, as int8_row */
            const __m256i w = _mm256_loadu_si256((const __m256i *)(c + 64 * kq)), a = _mm256_abs_epi8(w);
            for (int r = 0; r < R; r++) {
                const __m256i xb = _mm256_set1_epi32(quad(xq + r * K + g * 32 + 4 * kq));
                const __m256i p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(xb, w));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(p, ones));
                KEEP(s[r]);
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_set1_ps(xd[r * groups + g]), acc[r]);
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
}

#elif defined(ES_NEON)
#ifdef ES_SDOT
#define DOT_LANE(acc, w, xv, lane) vdotq_laneq_s32(acc, w, xv, lane)
#else
/* sdot emulated: 4 rows x 4 codes of w times the 4 codes in lane `lane` of xv, added to the 4 int32 of acc.
 * Products fit int16 (<= 127^2) and so do pair sums (<= 2 * 127^2); vpadalq widens to int32. */
static inline int32x4_t dot_lane_emul(int32x4_t acc, int8x16_t w, int8x16_t xq4) {
    const int16x8_t p0 = vmull_s8(vget_low_s8(w), vget_low_s8(xq4)), p1 = vmull_high_s8(w, xq4);
    return vpadalq_s16(acc, vpaddq_s16(p0, p1));
}
#define DOT_LANE(acc, w, xv, lane) \
    dot_lane_emul(acc, w, vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(xv), lane)))
#endif

static inline float32x4_t f16x4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

static void int4_row(const uint8_t *codes, const uint16_t *params, int64_t groups, const int8_t *xq,
                     const float *xd, const float *xs, float *out) {
    const uint8x16_t low4 = vdupq_n_u8(15);
    float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256;
        prefetch(c + PREFETCH), prefetch(c + PREFETCH + 64), prefetch(c + PREFETCH + 128), prefetch(c + PREFETCH + 192);
        prefetch(params + g * 32 + PREFETCH / 4);
        const int8x16_t xa = vld1q_s8(xq + g * 32), xb = vld1q_s8(xq + g * 32 + 16); /* kq 0-3, 4-7 */
        int32x4_t s[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
#define INT4_CHUNK(j)                                                                   \
    for (int i = 0; i < 4; i++) { /* rows 4i..4i+3 */                                    \
        const uint8x16_t v = vld1q_u8(c + 64 * (j) + 16 * i);                           \
        s[i] = DOT_LANE(s[i], vreinterpretq_s8_u8(vandq_u8(v, low4)), xa, j);           \
        s[i] = DOT_LANE(s[i], vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), xb, j);            \
    }
        INT4_CHUNK(0)
        INT4_CHUNK(1)
        INT4_CHUNK(2)
        INT4_CHUNK(3)
#undef INT4_CHUNK
        const uint16_t *p = params + g * 32;
        for (int i = 0; i < 4; i++) {
            acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(s[i]), vmulq_n_f32(f16x4(p + 4 * i), xd[g]));
            acc[i] = vfmaq_f32(acc[i], f16x4(p + 16 + 4 * i), vdupq_n_f32(xs[g]));
        }
    }
    for (int i = 0; i < 4; i++) vst1q_f32(out + 4 * i, acc[i]);
}

static void int8_row(const int8_t *codes, int64_t groups, const int8_t *xq, const float *xd, float *out) {
    float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512;
        for (int line = 0; line < 512; line += 64) prefetch(c + 2 * PREFETCH + line);
        const int8x16_t xa = vld1q_s8(xq + g * 32), xb = vld1q_s8(xq + g * 32 + 16);
        int32x4_t s[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
#define INT8_KQ(kq, xv, lane) \
    for (int i = 0; i < 4; i++) s[i] = DOT_LANE(s[i], vld1q_s8(c + 64 * (kq) + 16 * i), xv, lane);
        INT8_KQ(0, xa, 0)
        INT8_KQ(1, xa, 1)
        INT8_KQ(2, xa, 2)
        INT8_KQ(3, xa, 3)
        INT8_KQ(4, xb, 0)
        INT8_KQ(5, xb, 1)
        INT8_KQ(6, xb, 2)
        INT8_KQ(7, xb, 3)
#undef INT8_KQ
        for (int i = 0; i < 4; i++) acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(s[i]), vdupq_n_f32(xd[g]));
    }
    for (int i = 0; i < 4; i++) vst1q_f32(out + 4 * i, acc[i]);
}

/* Tiles of R input rows (R <= TILE_ROWS) x one 8-output half h of a 16-row block (two 4-lane vectors), as on
 * x86: the weight codes are loaded and split into nibbles once per tile and multiplied with every row of it.
 * Per output the operations are exactly int4_row's / int8_row's. 4 rows: 8 int32 sums + 8 float sums + the
 * rows' 8 code vectors + the weights fit the 32 NEON registers. (Checked under qemu-user, not timed.) */
#define TILE_ROWS 4
#define TILE_HALVES 2
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *codes, const uint16_t *params,
                                                            int64_t groups, const int8_t *xq, int64_t K,
                                                            const float *xd, const float *xs, int h, int R,
                                                            int pf, float (*out)[16]) {
    const uint8x16_t low4 = vdupq_n_u8(15);
    float32x4_t acc[TILE_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256 + 32 * h;
        if (pf) {
            prefetch(c + PREFETCH), prefetch(c + PREFETCH + 64), prefetch(c + PREFETCH + 128);
            prefetch(c + PREFETCH + 192), prefetch(params + g * 32 + PREFETCH / 4);
        }
        int8x16_t xa[TILE_ROWS], xb[TILE_ROWS];
        int32x4_t s[TILE_ROWS][2];
        for (int r = 0; r < R; r++) {
            xa[r] = vld1q_s8(xq + r * K + g * 32), xb[r] = vld1q_s8(xq + r * K + g * 32 + 16);
            s[r][0] = s[r][1] = vdupq_n_s32(0);
        }
#define INT4_TILE_CHUNK(j)                                                                \
    for (int ii = 0; ii < 2; ii++) { /* rows 8h + 4ii .. + 3 */                            \
        const uint8x16_t v = vld1q_u8(c + 64 * (j) + 16 * ii);                           \
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low4));                      \
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));                       \
        for (int r = 0; r < R; r++) {                                                     \
            s[r][ii] = DOT_LANE(s[r][ii], lo, xa[r], j);                                  \
            s[r][ii] = DOT_LANE(s[r][ii], hi, xb[r], j);                                  \
        }                                                                                 \
    }
        INT4_TILE_CHUNK(0)
        INT4_TILE_CHUNK(1)
        INT4_TILE_CHUNK(2)
        INT4_TILE_CHUNK(3)
#undef INT4_TILE_CHUNK
        const uint16_t *p = params + g * 32 + 8 * h;
        for (int ii = 0; ii < 2; ii++) {
            const float32x4_t sc = f16x4(p + 4 * ii), mn = f16x4(p + 16 + 4 * ii);
            for (int r = 0; r < R; r++) {
                acc[r][ii] = vfmaq_f32(acc[r][ii], vcvtq_f32_s32(s[r][ii]), vmulq_n_f32(sc, xd[r * groups + g]));
                acc[r][ii] = vfmaq_f32(acc[r][ii], mn, vdupq_n_f32(xs[r * groups + g]));
            }
        }
    }
    for (int r = 0; r < R; r++) vst1q_f32(out[r] + 8 * h, acc[r][0]), vst1q_f32(out[r] + 8 * h + 4, acc[r][1]);
}

static inline __attribute__((always_inline)) void int8_tile(const int8_t *codes, int64_t groups, const int8_t *xq,
                                                            int64_t K, const float *xd, int h, int R, int pf,
                                                            float (*out)[16]) {
    float32x4_t acc[TILE_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512 + 32 * h;
        if (pf)
            for (int line = 0; line < 512; line += 64) prefetch(c + 2 * PREFETCH + line);
        int8x16_t xa[TILE_ROWS], xb[TILE_ROWS];
        int32x4_t s[TILE_ROWS][2];
        for (int r = 0; r < R; r++) {
            xa[r] = vld1q_s8(xq + r * K + g * 32), xb[r] = vld1q_s8(xq + r * K + g * 32 + 16);
            s[r][0] = s[r][1] = vdupq_n_s32(0);
        }
#define INT8_TILE_KQ(kq, xv, lane)                                                        \
    for (int ii = 0; ii < 2; ii++) {                                                      \
        const int8x16_t w = vld1q_s8(c + 64 * (kq) + 16 * ii);                            \
        for (int r = 0; r < R; r++) s[r][ii] = DOT_LANE(s[r][ii], w, xv[r], lane);         \
    }
        INT8_TILE_KQ(0, xa, 0)
        INT8_TILE_KQ(1, xa, 1)
        INT8_TILE_KQ(2, xa, 2)
        INT8_TILE_KQ(3, xa, 3)
        INT8_TILE_KQ(4, xb, 0)
        INT8_TILE_KQ(5, xb, 1)
        INT8_TILE_KQ(6, xb, 2)
        INT8_TILE_KQ(7, xb, 3)
#undef INT8_TILE_KQ
        for (int r = 0; r < R; r++)
            for (int ii = 0; ii < 2; ii++)
                acc[r][ii] = vfmaq_f32(acc[r][ii], vcvtq_f32_s32(s[r][ii]), vdupq_n_f32(xd[r * groups + g]));
    }
    for (int r = 0; r < R; r++) vst1q_f32(out[r] + 8 * h, acc[r][0]), vst1q_f32(out[r] + 8 * h + 4, acc[r][1]);
}

#else /* plain C: the same arithmetic, one output row at a time (a reference, and for other CPUs) */
static void int4_row(const uint8_t *codes, const uint16_t *params, int64_t groups, const int8_t *xq,
                     const float *xd, const float *xs, float *out) {
    for (int n = 0; n < 16; n++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *c = codes + g * 256;
            const int8_t *x = xq + g * 32;
            int32_t isum = 0;
            for (int j = 0; j < 4; j++)
                for (int e = 0; e < 4; e++) {
                    const uint8_t byte = c[64 * j + 4 * n + e];
                    isum += (byte & 15) * x[4 * j + e] + (byte >> 4) * x[16 + 4 * j + e];
                }
            const uint16_t *p = params + g * 32;
            acc = fmaf((float)isum, f16_f(p[n]) * xd[g], acc);
            acc = fmaf(f16_f(p[16 + n]), xs[g], acc);
        }
        out[n] = acc;
    }
}

static void int8_row(const int8_t *codes, int64_t groups, const int8_t *xq, const float *xd, float *out) {
    for (int n = 0; n < 16; n++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            int32_t isum = 0;
            for (int kq = 0; kq < 8; kq++)
                for (int e = 0; e < 4; e++) isum += codes[g * 512 + 64 * kq + 4 * n + e] * xq[g * 32 + 4 * kq + e];
            acc = fmaf((float)isum, xd[g], acc);
        }
        out[n] = acc;
    }
}

/* Tiles of R input rows x the block's 16 outputs: each group's nibbles are unpacked once per tile into
 * bytes and multiplied with every row of it; per output the same float steps as int4_row / int8_row. */
#define TILE_ROWS 4
#define TILE_HALVES 1
static inline void int4_tile(const uint8_t *codes, const uint16_t *params, int64_t groups, const int8_t *xq,
                             int64_t K, const float *xd, const float *xs, int h, int R, int pf, float (*out)[16]) {
    (void)h, (void)pf;
    float acc[TILE_ROWS][16] = {{0}};
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * 256;
        const uint16_t *p = params + g * 32;
        int8_t w[16][32]; /* w[n][k] */
        for (int j = 0; j < 4; j++)
            for (int n = 0; n < 16; n++)
                for (int e = 0; e < 4; e++) {
                    const uint8_t byte = c[64 * j + 4 * n + e];
                    w[n][4 * j + e] = (int8_t)(byte & 15), w[n][16 + 4 * j + e] = (int8_t)(byte >> 4);
                }
        for (int r = 0; r < R; r++) {
            const int8_t *x = xq + r * K + g * 32;
            for (int n = 0; n < 16; n++) {
                int32_t isum = 0;
                for (int k = 0; k < 32; k++) isum += w[n][k] * x[k];
                acc[r][n] = fmaf((float)isum, f16_f(p[n]) * xd[r * groups + g], acc[r][n]);
                acc[r][n] = fmaf(f16_f(p[16 + n]), xs[r * groups + g], acc[r][n]);
            }
        }
    }
    for (int r = 0; r < R; r++) memcpy(out[r], acc[r], sizeof acc[r]);
}

static inline void int8_tile(const int8_t *codes, int64_t groups, const int8_t *xq, int64_t K, const float *xd,
                             int h, int R, int pf, float (*out)[16]) {
    (void)h, (void)pf;
    float acc[TILE_ROWS][16] = {{0}};
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *c = codes + g * 512;
        int8_t w[16][32];
        for (int kq = 0; kq < 8; kq++)
            for (int n = 0; n < 16; n++)
                for (int e = 0; e < 4; e++) w[n][4 * kq + e] = c[64 * kq + 4 * n + e];
        for (int r = 0; r < R; r++) {
            const int8_t *x = xq + r * K + g * 32;
            for (int n = 0; n < 16; n++) {
                int32_t isum = 0;
                for (int k = 0; k < 32; k++) isum += w[n][k] * x[k];
                acc[r][n] = fmaf((float)isum, xd[r * groups + g], acc[r][n]);
            }
        }
    }
    for (int r = 0; r < R; r++) memcpy(out[r], acc[r], sizeof acc[r]);
}
#endif

/* ---- y = x @ W.T over a range of 16-row blocks ------------------------------------------------------------ */

typedef struct {
    int8_t *q;     /* (M, K) int8 codes of the input rows */
    float *d, *s;  /* (M, K/32): block scale, and scale * code sum */
} qrows;

/* One output row's 16 values of block nb -> bf16 y (int8: times the row scales; bias as the layers add it:
 * bf16 output + bf16 bias, rounded again). */
static inline void store_row(const float *out, int64_t valid, const uint16_t *scales, const uint16_t *bias, int64_t n0,
                             uint16_t *dst) {
    for (int64_t i = 0; i < valid; i++) {
        const float v = scales ? out[i] * bf16_f(scales[n0 + i]) : out[i];
        dst[i] = bias ? f_bf16(bf16_f(f_bf16(v)) + bf16_f(bias[n0 + i])) : f_bf16(v);
    }
}

#ifdef TILE_ROWS
/* One instance of the tiles per height R, a compile-time constant there, so their accumulators are
 * registers; a tile covers the block's outputs in TILE_HALVES passes (prefetching in the first). */
#define TILE_FNS(R)                                                                                              \
    static void int4_tile_##R(const uint8_t *c, const uint16_t *p, int64_t groups, const int8_t *xq, int64_t K,  \
                              const float *xd, const float *xs, int pf, float (*out)[16]) {                      \
        for (int h = 0; h < TILE_HALVES; h++) int4_tile(c, p, groups, xq, K, xd, xs, h, R, pf && !h, out);      \
    }                                                                                                            \
    static void int8_tile_##R(const int8_t *c, int64_t groups, const int8_t *xq, int64_t K, const float *xd,    \
                              int pf, float (*out)[16]) {                                                        \
        for (int h = 0; h < TILE_HALVES; h++) int8_tile(c, groups, xq, K, xd, h, R, pf && !h, out);             \
    }
TILE_FNS(1)
TILE_FNS(2)
TILE_FNS(3)
TILE_FNS(4)
#undef TILE_FNS
typedef void (*int4_tile_fn)(const uint8_t *, const uint16_t *, int64_t, const int8_t *, int64_t, const float *,
                             const float *, int, float (*)[16]);
typedef void (*int8_tile_fn)(const int8_t *, int64_t, const int8_t *, int64_t, const float *, int, float (*)[16]);
static const int4_tile_fn int4_tiles[TILE_ROWS + 1] = {0, int4_tile_1, int4_tile_2, int4_tile_3, int4_tile_4};
static const int8_tile_fn int8_tiles[TILE_ROWS + 1] = {0, int8_tile_1, int8_tile_2, int8_tile_3, int8_tile_4};
#endif

/* Output blocks [b0, b1) for M quantized rows; int8 weights when `scales` is set. */
static void mm_blocks(const qrows *xr, int64_t M, int64_t K, const void *codes, const uint16_t *params,
                      const uint16_t *scales, const uint16_t *bias, int64_t N, uint16_t *y, int64_t b0, int64_t b1) {
    const int64_t groups = K / 32;
    for (int64_t nb = b0; nb < b1; nb++) {
        const int64_t n0 = nb * 16, valid = N - n0 < 16 ? N - n0 : 16;
        int64_t m = 0;
#ifdef TILE_ROWS
        for (; M > 1 && m < M; m += TILE_ROWS) { /* tiles: each block's weights expanded once per R rows */
            const int R = M - m < TILE_ROWS ? (int)(M - m) : TILE_ROWS;
            float out[TILE_ROWS][16];
            if (scales)
                int8_tiles[R]((const int8_t *)codes + nb * groups * 512, groups, xr->q + m * K, K, xr->d + m * groups,
                              m == 0, out);
            else
                int4_tiles[R]((const uint8_t *)codes + nb * groups * 256, params + nb * groups * 32, groups,
                              xr->q + m * K, K, xr->d + m * groups, xr->s + m * groups, m == 0, out);
            for (int r = 0; r < R; r++) store_row(out[r], valid, scales, bias, n0, y + (m + r) * N + n0);
        }
#endif
        for (; m < M; m++) { /* the block's weights stay in L1 across the rows */
            float out[16];
            if (scales)
                int8_row((const int8_t *)codes + nb * groups * 512, groups, xr->q + m * K, xr->d + m * groups, out);
            else
                int4_row((const uint8_t *)codes + nb * groups * 256, params + nb * groups * 32, groups,
                         xr->q + m * K, xr->d + m * groups, xr->s + m * groups, out);
            store_row(out, valid, scales, bias, n0, y + m * N + n0);
        }
    }
}

static int qrows_alloc(qrows *r, int64_t M, int64_t K) {
    r->q = malloc((size_t)(M * K));
    r->d = malloc((size_t)(M * (K / 32)) * sizeof(float));
    r->s = malloc((size_t)(M * (K / 32)) * sizeof(float));
    return r->q && r->d && r->s ? 0 : -1;
}

static void qrows_free(qrows *r) { free(r->q), free(r->d), free(r->s); }

/* Threads worth using for a product of M rows by N x K weights: an OpenMP fork/join costs a few us. */
static int useful_threads(int threads, int64_t M, int64_t N, int64_t K) {
    return threads > 1 && M * N * K >= (1 << 17) ? threads : 1;
}

static int mm(const uint16_t *x, int64_t M, int64_t K, const void *codes, const uint16_t *params,
              const uint16_t *scales, int64_t N, uint16_t *y, int threads) {
    qrows xr;
    if (qrows_alloc(&xr, M, K)) {
        qrows_free(&xr);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xr.q + m * K, xr.d + m * (K / 32), xr.s + m * (K / 32));
    const int64_t blocks = (N + 15) / 16;
    const int nt = useful_threads(threads, M, N, K);
#pragma omp parallel num_threads(nt) if (nt > 1)
    { /* a contiguous slice of blocks per thread; each element's arithmetic is the serial path's */
#ifdef _OPENMP
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
        const int t = 0, n = 1;
        (void)nt;
#endif
        mm_blocks(&xr, M, K, codes, params, scales, 0, N, y, blocks * t / n, blocks * (t + 1) / n);
    }
    qrows_free(&xr);
    return 0;
}

/* The instruction set this library was built for ("avx512-vnni", "avx512", "avx2", "neon-dot", "neon",
 * "generic"): node/lowbit/native.py checks it against the variant it asked for. */
const char *es_dot_isa(void) { return ES_ISA; }

/* y (M, N) bf16 = x (M, K) bf16 @ W.T, W int4 packed by pack_dot_int4. Returns 0, or -1 (no memory). */
int es_dot_int4_mm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *params,
                   int64_t N, uint16_t *y, int threads) {
    return mm(x, M, K, codes, params, 0, N, y, threads);
}

/* y (M, N) bf16 = x (M, K) bf16 @ W.T, W int8 packed by pack_dot_int8 with bf16 row scales. 0 or -1. */
int es_dot_int8_mm(const uint16_t *x, int64_t M, int64_t K, const int8_t *codes, const uint16_t *scales,
                   int64_t N, uint16_t *y, int threads) {
    return mm(x, M, K, codes, 0, scales, N, y, threads);
}

/* ---- whole-stage decode (node/model/fused.py), the same call and numerics as decode.c's AMX version ------------ *
 * Vector loops below are plain C over 16 independent lanes, which the compiler turns into the ISA's vectors
 * without reassociating anything: each result is the same whatever the batch and thread count. Attention
 * (attend_group) has its own vector code per ISA with the same property (docs/kernels.md). */

typedef struct {
    int64_t kind;            /* 4: int4 (codes, fp16 params), 8: int8 (codes, bf16 row scales) */
    const void *codes;
    const uint16_t *params;  /* int4 params or int8 scales */
    const uint16_t *bias;    /* bf16 (N,) or NULL */
    int64_t n, k;
} es_linear;

typedef struct {
    es_linear qkv, o, gate_up, down;
    const float *norm1, *norm2;
} es_layer;

static inline float sum16(const float *p) { /* fixed pairwise order */
    float a[8];
    for (int i = 0; i < 8; i++) a[i] = p[i] + p[i + 8];
    for (int i = 0; i < 4; i++) a[i] = a[i] + a[i + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

/* exp(x) as 2^n * p(f), |rel err| < 2e-7 (decode.c's exp_ps); x < -87 gives exp(-87). Branch-free and
 * without library calls, so loops over it vectorize: n = round-to-nearest-even(t) by adding and removing
 * 1.5 * 2^23 (exact for |t| < 2^22; the build never reassociates), and 2^n from n's integer bits. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f, z = t + 12582912.0f, n = z - 12582912.0f;
    const float r = (t - n) * 0.693147180559945f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t zi;
    memcpy(&zi, &z, sizeof zi); /* z's mantissa holds n + 2^22 */
    const int32_t bits = (zi - 0x4B400000 + 127) * (1 << 23);
    float two;
    memcpy(&two, &bits, sizeof two);
    return p * two;
}

/* out (bf16, D) = x / sqrt(mean(x^2) + eps) * w, in float32 (D % 16 == 0) */
static void rms_norm(const float *x, const float *w, int64_t D, float eps, uint16_t *out) {
    float acc[16] = {0};
    for (int64_t d = 0; d < D; d += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[d + l] * x[d + l];
    const float r = 1.0f / sqrtf(sum16(acc) / (float)D + eps);
    for (int64_t d = 0; d < D; d++) out[d] = f_bf16(x[d] * r * w[d]);
}

/* q and k heads of one row, in place: v * cos + roll(v, hd/2) * signed_sin (model.apply_rotary). */
static void rotary(uint16_t *heads, int64_t count, int64_t hd, const uint16_t *cos, const uint16_t *ssin) {
    float c[256], s[256], v[256];
    for (int64_t i = 0; i < hd; i++) c[i] = bf16_f(cos[i]), s[i] = bf16_f(ssin[i]);
    for (int64_t h = 0; h < count; h++) {
        uint16_t *p = heads + h * hd;
        for (int64_t i = 0; i < hd; i++) v[i] = bf16_f(p[i]);
        for (int64_t i = 0; i < hd; i++) p[i] = f_bf16(v[i] * c[i] + v[(i + hd / 2) % hd] * s[i]);
    }
}

#define ATT_MAX_GROUP 16 /* query heads per kv head */
#define ATT_BLOCK 64      /* keys per P.V block: their V rows (8 KB at hd 64) stay in L1 for all passes */

/* ---- decode attention: softmax(q K^T * scale) V for the `group` query heads of one kv head ------------------- *
 * Each key's score is the same sequence of operations wherever the key sits in the cache and whatever `len` is
 * (per-key lane partials summed by one fixed tree; keys past `len` in the last block are zero rows whose
 * results are dropped), each exp is exp_approx's operations lane for lane (the same bits), the softmax total
 * sums key j into lane j % lanes in order, and each output element is one FMA chain over the keys in order.
 * So a (sequence, kv head) result depends only on its own q, K and V: never on the batch, the thread count or
 * how its length falls on a vector. Each K and V row is loaded and converted once for all the group's heads. */

#if defined(ES_X86) /* AVX2 + FMA, also in the AVX-512 builds (256-bit vectors; hd 64 = 8 of them) */
#define ATT_KEYS 8 /* keys per score block (one vector of scores) */

/* 16 bf16 -> their even and odd elements as floats: the odd ones are already the high halves of 32-bit words
 * (an AND), the even ones a shift away. Two cheap operations per 16 values (pmovzx + shift would be four,
 * on the pipes the FMAs need); queries, keys, values and the P.V sums all use this even/odd order inside
 * each 16 dims, and att_store puts the outputs back in order. */
static inline void bf16x16(const uint16_t *p, __m256 *even, __m256 *odd) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    *odd = _mm256_and_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(_mm256_set1_epi32((int)0xFFFF0000u)));
}

static inline void bf16_row(const uint16_t *src, float *dst, int64_t n) { /* n % 16 == 0, even/odd order */
    for (int64_t i = 0; i < n; i += 16) {
        __m256 e, o;
        bf16x16(src + i, &e, &o);
        _mm256_storeu_ps(dst + i, e), _mm256_storeu_ps(dst + i + 8, o);
    }
}

static inline void att_store(const float *acc, float inv, int64_t hd, uint16_t *out) { /* back to dim order */
    for (int64_t d = 0; d < hd; d += 16)
        for (int i = 0; i < 8; i++) out[d + 2 * i] = f_bf16(acc[d + i] * inv), out[d + 2 * i + 1] = f_bf16(acc[d + 8 + i] * inv);
}

/* exp_approx lane for lane: the same operations in the same order (no FMA), so the same bits */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 z = _mm256_add_ps(t, _mm256_set1_ps(12582912.0f)), n = _mm256_sub_ps(z, _mm256_set1_ps(12582912.0f));
    const __m256 r = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945f));
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 720));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 120));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 24));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 6));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(z), _mm256_set1_epi32(0x4B400000)),
                                       _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

/* 8 keys' lane partials a[i] -> one vector of their sums, key i = ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) */
static inline __m256 sum8x8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* One key row k (bf16, hd % 32 == 0) against the group's queries qf (even/odd order, rows 256 apart):
 * part[h] = s0 + s1, the key's 8-lane partial, s0 summing the even dims and s1 the odd dims of each 16, in
 * dim order. The row is converted 64 dims at a time into registers and used by every head; the 32 dims a
 * block of 64 leaves over (hd 32, 96, ...) take the same steps. */
static inline __attribute__((always_inline)) void att_key(const float *qf, int64_t group, const uint16_t *k,
                                                          int64_t hd, __m256 *s0, __m256 *s1, __m256 *part) {
    for (int64_t h = 0; h < group; h++) s0[h] = s1[h] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= hd; c += 64) {
        __m256 k0, k1, k2, k3, k4, k5, k6, k7;
        bf16x16(k + c, &k0, &k1), bf16x16(k + c + 16, &k2, &k3);
        bf16x16(k + c + 32, &k4, &k5), bf16x16(k + c + 48, &k6, &k7);
        for (int64_t h = 0; h < group; h++) {
            const float *q = qf + h * 256 + c;
            __m256 a0 = s0[h], a1 = s1[h];
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q), k0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8), k1, a1);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 16), k2, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 24), k3, a1);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 32), k4, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 40), k5, a1);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 48), k6, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 56), k7, a1);
            s0[h] = a0, s1[h] = a1;
        }
    }
    if (c < hd) { /* 32 dims left */
        __m256 k0, k1, k2, k3;
        bf16x16(k + c, &k0, &k1), bf16x16(k + c + 16, &k2, &k3);
        for (int64_t h = 0; h < group; h++) {
            const float *q = qf + h * 256 + c;
            s0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 16), k2, _mm256_fmadd_ps(_mm256_loadu_ps(q), k0, s0[h]));
            s1[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 24), k3, _mm256_fmadd_ps(_mm256_loadu_ps(q + 8), k1, s1[h]));
        }
    }
    for (int64_t h = 0; h < group; h++) part[h * ATT_KEYS] = _mm256_add_ps(s0[h], s1[h]);
}

/* scores[h][j0 + i] = (q_h . k_{j0+i}) * scale for the ATT_KEYS keys from j0 (rows past nk are never read:
 * their partials are zero) into sc + h * stride */
static inline __attribute__((always_inline)) void att_scores(const float *qf, int64_t group, const uint16_t *k,
                                                             int64_t hd, int64_t nk, float scale, float *sc,
                                                             int64_t stride) {
    __m256 s0[ATT_MAX_GROUP], s1[ATT_MAX_GROUP], part[ATT_MAX_GROUP * ATT_KEYS];
    for (int64_t i = 0; i < ATT_KEYS; i++)
        if (i < nk) att_key(qf, group, k + i * hd, hd, s0, s1, part + i);
        else
            for (int64_t h = 0; h < group; h++) part[h * ATT_KEYS + i] = _mm256_setzero_ps();
    for (int64_t h = 0; h < group; h++)
        _mm256_storeu_ps(sc + h * stride, _mm256_mul_ps(sum8x8(part + h * ATT_KEYS), _mm256_set1_ps(scale)));
}

/* e[j] = exp_approx(e[j] - mx) in place for j < n; returns sum_j e[j], lane j % 8 in key order, then a tree */
static inline float att_exp(float *e, int64_t n, float mx) {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 tot = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 x = exp8(_mm256_sub_ps(_mm256_loadu_ps(e + j), m));
        _mm256_storeu_ps(e + j, x);
        tot = _mm256_add_ps(tot, x);
    }
    if (j < n) { /* the ragged end: lanes past n add +0.0f, which changes nothing */
        float t[8] = {0};
        memcpy(t, e + j, (size_t)(n - j) * sizeof(float));
        _mm256_storeu_ps(t, exp8(_mm256_sub_ps(_mm256_loadu_ps(t), m)));
        for (int64_t i = n - j; i < 8; i++) t[i] = 0.0f;
        memcpy(e + j, t, (size_t)(n - j) * sizeof(float));
        tot = _mm256_add_ps(tot, _mm256_loadu_ps(t));
    }
    float l[8];
    _mm256_storeu_ps(l, tot);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

static inline float att_max(const float *e, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(e + j));
    float l[8], mx = -INFINITY;
    _mm256_storeu_ps(l, m);
    for (int i = 0; i < 8; i++) mx = l[i] > mx ? l[i] : mx;
    for (; j < n; j++) mx = e[j] > mx ? e[j] : mx;
    return mx;
}

/* acc[h][d0 .. d0+16) (even/odd order) += sum_j p[h][j] * v_j[d0 ..] for keys j0 .. j1, one FMA chain per
 * element in key order, for HB heads (a constant at each call, so the accumulators stay in registers) */
static inline __attribute__((always_inline)) void att_pv(const float *p, int64_t len, const uint16_t *v, int64_t hd,
                                                         int64_t j0, int64_t j1, int64_t d0, float *acc, const int HB) {
    __m256 a[4][2];
    for (int h = 0; h < HB; h++) a[h][0] = _mm256_loadu_ps(acc + h * 256 + d0), a[h][1] = _mm256_loadu_ps(acc + h * 256 + d0 + 8);
    for (int64_t j = j0; j < j1; j++) {
        __m256 ve, vo;
        bf16x16(v + j * hd + d0, &ve, &vo);
        for (int h = 0; h < HB; h++) {
            const __m256 w = _mm256_broadcast_ss(p + h * len + j);
            a[h][0] = _mm256_fmadd_ps(w, ve, a[h][0]);
            a[h][1] = _mm256_fmadd_ps(w, vo, a[h][1]);
        }
    }
    for (int h = 0; h < HB; h++) _mm256_storeu_ps(acc + h * 256 + d0, a[h][0]), _mm256_storeu_ps(acc + h * 256 + d0 + 8, a[h][1]);
}

#elif defined(ES_NEON) /* 128-bit vectors; hd 64 = 16 of them, 32 registers */
#define ATT_KEYS 4

static inline void bf16x8(const uint16_t *p, float32x4_t *lo, float32x4_t *hi) {
    const uint16x8_t x = vld1q_u16(p);
    *lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(x), 16));
    *hi = vreinterpretq_f32_u32(vshll_high_n_u16(x, 16));
}

static inline void bf16_row(const uint16_t *src, float *dst, int64_t n) { /* n % 8 == 0 */
    for (int64_t i = 0; i < n; i += 8) {
        float32x4_t lo, hi;
        bf16x8(src + i, &lo, &hi);
        vst1q_f32(dst + i, lo), vst1q_f32(dst + i + 4, hi);
    }
}

static inline void att_store(const float *acc, float inv, int64_t hd, uint16_t *out) {
    for (int64_t d = 0; d < hd; d++) out[d] = f_bf16(acc[d] * inv);
}

static inline float32x4_t exp4(float32x4_t x) { /* exp_approx lane for lane (no FMA): the same bits */
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    x = vminq_f32(x, vdupq_n_f32(88.0f));
    const float32x4_t t = vmulq_f32(x, vdupq_n_f32(1.44269504088896341f));
    const float32x4_t z = vaddq_f32(t, vdupq_n_f32(12582912.0f)), n = vsubq_f32(z, vdupq_n_f32(12582912.0f));
    const float32x4_t r = vmulq_f32(vsubq_f32(t, n), vdupq_n_f32(0.693147180559945f));
    float32x4_t p = vdupq_n_f32(1.0f / 5040);
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(1.0f / 720));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(1.0f / 120));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(1.0f / 24));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(1.0f / 6));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(0.5f));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(1.0f));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(1.0f));
    const int32x4_t e = vaddq_s32(vsubq_s32(vreinterpretq_s32_f32(z), vdupq_n_s32(0x4B400000)), vdupq_n_s32(127));
    return vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(e, 23)));
}

/* One key row against the group's queries (rows 256 apart): part[h] = s0 + s1, s0 summing dims d..d+4 and s1
 * dims d+4..d+8 for d = 0, 8, 16, ... in order; the row is converted 32 dims at a time into registers and
 * used by every head. */
static inline __attribute__((always_inline)) void att_key(const float *qf, int64_t group, const uint16_t *k,
                                                          int64_t hd, float32x4_t *s0, float32x4_t *s1,
                                                          float32x4_t *part) {
    for (int64_t h = 0; h < group; h++) s0[h] = s1[h] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < hd; c += 32) {
        float32x4_t kr[8];
        for (int i = 0; i < 4; i++) bf16x8(k + c + 8 * i, &kr[2 * i], &kr[2 * i + 1]);
        for (int64_t h = 0; h < group; h++) {
            const float *q = qf + h * 256 + c;
            float32x4_t a0 = s0[h], a1 = s1[h];
            for (int i = 0; i < 8; i += 2) {
                a0 = vfmaq_f32(a0, vld1q_f32(q + 4 * i), kr[i]);
                a1 = vfmaq_f32(a1, vld1q_f32(q + 4 * i + 4), kr[i + 1]);
            }
            s0[h] = a0, s1[h] = a1;
        }
    }
    for (int64_t h = 0; h < group; h++) part[h * ATT_KEYS] = vaddq_f32(s0[h], s1[h]);
}

/* scores of the ATT_KEYS keys from k into sc + h * stride; key i = (l0+l1)+(l2+l3) of its partial */
static inline void att_scores(const float *qf, int64_t group, const uint16_t *k, int64_t hd, int64_t nk,
                              float scale, float *sc, int64_t stride) {
    float32x4_t s0[ATT_MAX_GROUP], s1[ATT_MAX_GROUP], part[ATT_MAX_GROUP * ATT_KEYS];
    for (int64_t i = 0; i < ATT_KEYS; i++)
        if (i < nk) att_key(qf, group, k + i * hd, hd, s0, s1, part + i);
        else
            for (int64_t h = 0; h < group; h++) part[h * ATT_KEYS + i] = vdupq_n_f32(0.0f);
    for (int64_t h = 0; h < group; h++) {
        const float32x4_t *a = part + h * ATT_KEYS;
        const float32x4_t t = vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]));
        vst1q_f32(sc + h * stride, vmulq_f32(t, vdupq_n_f32(scale)));
    }
}

static inline float att_exp(float *e, int64_t n, float mx) { /* lane j % 8 (two vectors), in key order */
    const float32x4_t m = vdupq_n_f32(mx);
    float32x4_t t0 = vdupq_n_f32(0.0f), t1 = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const float32x4_t x0 = exp4(vsubq_f32(vld1q_f32(e + j), m)), x1 = exp4(vsubq_f32(vld1q_f32(e + j + 4), m));
        vst1q_f32(e + j, x0), vst1q_f32(e + j + 4, x1);
        t0 = vaddq_f32(t0, x0), t1 = vaddq_f32(t1, x1);
    }
    if (j < n) { /* lanes past n add +0.0f */
        float t[8] = {0};
        memcpy(t, e + j, (size_t)(n - j) * sizeof(float));
        vst1q_f32(t, exp4(vsubq_f32(vld1q_f32(t), m)));
        vst1q_f32(t + 4, exp4(vsubq_f32(vld1q_f32(t + 4), m)));
        for (int64_t i = n - j; i < 8; i++) t[i] = 0.0f;
        memcpy(e + j, t, (size_t)(n - j) * sizeof(float));
        t0 = vaddq_f32(t0, vld1q_f32(t)), t1 = vaddq_f32(t1, vld1q_f32(t + 4));
    }
    float l[8];
    vst1q_f32(l, t0), vst1q_f32(l + 4, t1);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

static inline float att_max(const float *e, int64_t n) {
    float32x4_t m = vdupq_n_f32(-INFINITY);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) m = vmaxq_f32(m, vld1q_f32(e + j));
    float mx = vmaxvq_f32(m);
    for (; j < n; j++) mx = e[j] > mx ? e[j] : mx;
    return mx;
}

static inline __attribute__((always_inline)) void att_pv(const float *p, int64_t len, const uint16_t *v, int64_t hd,
                                                         int64_t j0, int64_t j1, int64_t d0, float *acc, const int HB) {
    float32x4_t a[4][4];
    for (int h = 0; h < HB; h++)
        for (int c = 0; c < 4; c++) a[h][c] = vld1q_f32(acc + h * 256 + d0 + 4 * c);
    for (int64_t j = j0; j < j1; j++) {
        float32x4_t v0, v1, v2, v3;
        bf16x8(v + j * hd + d0, &v0, &v1);
        bf16x8(v + j * hd + d0 + 8, &v2, &v3);
        for (int h = 0; h < HB; h++) {
            const float w = p[h * len + j];
            a[h][0] = vfmaq_n_f32(a[h][0], v0, w);
            a[h][1] = vfmaq_n_f32(a[h][1], v1, w);
            a[h][2] = vfmaq_n_f32(a[h][2], v2, w);
            a[h][3] = vfmaq_n_f32(a[h][3], v3, w);
        }
    }
    for (int h = 0; h < HB; h++)
        for (int c = 0; c < 4; c++) vst1q_f32(acc + h * 256 + d0 + 4 * c, a[h][c]);
}

#else /* plain C over 16 independent lanes: the compiler vectorizes the lane loops without reassociating */
#define ATT_KEYS 16

static inline void bf16_row(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_f(src[i]);
}

static inline void att_store(const float *acc, float inv, int64_t hd, uint16_t *out) {
    for (int64_t d = 0; d < hd; d++) out[d] = f_bf16(acc[d] * inv);
}

/* scores of the ATT_KEYS keys from k into sc + h * stride: each a 16-lane partial summed by sum16 */
static inline void att_scores(const float *qf, int64_t group, const uint16_t *k, int64_t hd, int64_t nk,
                              float scale, float *sc, int64_t stride) {
    float row[256];
    for (int64_t i = 0; i < ATT_KEYS; i++) {
        if (i >= nk) { /* past len: zero, as the SIMD sets (dropped by the caller) */
            for (int64_t h = 0; h < group; h++) sc[h * stride + i] = 0.0f;
            continue;
        }
        bf16_row(k + i * hd, row, hd);
        for (int64_t h = 0; h < group; h++) {
            const float *q = qf + h * 256;
            float part[16] = {0};
            for (int64_t d = 0; d < hd; d += 16)
                for (int l = 0; l < 16; l++) part[l] += q[d + l] * row[d + l];
            sc[h * stride + i] = sum16(part) * scale;
        }
    }
}

static inline float att_exp(float *e, int64_t n, float mx) { /* lane j % 16 in key order */
    float tot[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) {
            e[j + l] = exp_approx(e[j + l] - mx);
            tot[l] += e[j + l];
        }
    for (int l = 0; j + l < n; l++) {
        e[j + l] = exp_approx(e[j + l] - mx);
        tot[l] += e[j + l];
    }
    return sum16(tot);
}

static inline float att_max(const float *e, int64_t n) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) mx = e[j] > mx ? e[j] : mx;
    return mx;
}

static inline __attribute__((always_inline)) void att_pv(const float *p, int64_t len, const uint16_t *v, int64_t hd,
                                                         int64_t j0, int64_t j1, int64_t d0, float *acc, const int HB) {
    float a[4][16], row[16];
    for (int h = 0; h < HB; h++)
        for (int l = 0; l < 16; l++) a[h][l] = acc[h * 256 + d0 + l];
    for (int64_t j = j0; j < j1; j++) {
        for (int l = 0; l < 16; l++) row[l] = bf16_f(v[j * hd + d0 + l]);
        for (int h = 0; h < HB; h++) {
            const float w = p[h * len + j];
            for (int l = 0; l < 16; l++) a[h][l] += w * row[l];
        }
    }
    for (int h = 0; h < HB; h++)
        for (int l = 0; l < 16; l++) acc[h * 256 + d0 + l] = a[h][l];
}
#endif

/* Attend `group` query heads q (group, hd) bf16 to keys/values (len, hd) bf16; out (group, hd) bf16.
 * scores: float scratch of group * len. Scores block by block of ATT_KEYS keys (each key row converted once
 * for all heads), softmax per head, then out = (sum_j e_j v_j) / sum_j e_j with the V rows of each block of
 * ATT_BLOCK keys converted once per 16 dims for up to 4 heads held in registers. */
static void attend_group(const uint16_t *q, int64_t group, int64_t hd, const uint16_t *k, const uint16_t *v,
                         int64_t len, float scale, float *scores, uint16_t *out) {
    float qf[ATT_MAX_GROUP][256], acc[ATT_MAX_GROUP][256], sc[ATT_MAX_GROUP][ATT_KEYS], inv[ATT_MAX_GROUP];
    for (int64_t h = 0; h < group; h++) bf16_row(q + h * hd, qf[h], hd);
    int64_t j0 = 0;
    for (; j0 + ATT_KEYS <= len; j0 += ATT_KEYS) { /* common group sizes as constants: the same operations */
        const uint16_t *kb = k + j0 * hd;
        switch (group) {
        case 1: att_scores(&qf[0][0], 1, kb, hd, ATT_KEYS, scale, scores + j0, len); break;
        case 2: att_scores(&qf[0][0], 2, kb, hd, ATT_KEYS, scale, scores + j0, len); break;
        case 3: att_scores(&qf[0][0], 3, kb, hd, ATT_KEYS, scale, scores + j0, len); break;
        case 4: att_scores(&qf[0][0], 4, kb, hd, ATT_KEYS, scale, scores + j0, len); break;
        default: att_scores(&qf[0][0], group, kb, hd, ATT_KEYS, scale, scores + j0, len); break;
        }
    }
    if (j0 < len) { /* the last keys: zero partials past len, whose scores are dropped; the same operations */
        att_scores(&qf[0][0], group, k + j0 * hd, hd, len - j0, scale, &sc[0][0], ATT_KEYS);
        for (int64_t h = 0; h < group; h++) memcpy(scores + h * len + j0, sc[h], (size_t)(len - j0) * sizeof(float));
    }
    for (int64_t h = 0; h < group; h++) {
        float *e = scores + h * len;
        inv[h] = 1.0f / att_exp(e, len, att_max(e, len));
        memset(acc[h], 0, sizeof acc[h]);
    }
    for (int64_t j0 = 0; j0 < len; j0 += ATT_BLOCK) {
        const int64_t j1 = len - j0 < ATT_BLOCK ? len : j0 + ATT_BLOCK;
        for (int64_t h = 0; h < group; h += 4)
            for (int64_t d = 0; d < hd; d += 16) {
                const float *p = scores + h * len;
                switch (group - h) {
                case 1: att_pv(p, len, v, hd, j0, j1, d, acc[h], 1); break;
                case 2: att_pv(p, len, v, hd, j0, j1, d, acc[h], 2); break;
                case 3: att_pv(p, len, v, hd, j0, j1, d, acc[h], 3); break;
                default: att_pv(p, len, v, hd, j0, j1, d, acc[h], 4); break;
                }
            }
    }
    for (int64_t h = 0; h < group; h++) att_store(acc[h], inv[h], hd, out + h * hd);
}

/* act (bf16, F) = silu(g) * u for gu = [g | u] (bf16, 2F) */
static void silu_mul(const uint16_t *gu, int64_t F, uint16_t *act) {
    for (int64_t j = 0; j < F; j++) {
        const float g = bf16_f(gu[j]), u = bf16_f(gu[F + j]);
        act[j] = f_bf16(g / (1.0f + exp_approx(-g)) * u);
    }
}

#define MAX2(a, b) ((a) > (b) ? (a) : (b))

/* The per-thread slice of a linear layer on quantized rows xr (every thread calls it, then a barrier). */
static void linear_slice(const es_linear *l, const qrows *xr, int64_t M, uint16_t *y, int t, int nt) {
    const int64_t blocks = (l->n + 15) / 16;
    mm_blocks(xr, M, l->k, l->codes, l->kind == 8 ? 0 : l->params, l->kind == 8 ? l->params : 0, l->bias, l->n, y,
              blocks * t / nt, blocks * (t + 1) / nt);
}

/* Run `layers` decoder layers for S decode rows (see decode.c for the arguments). One OpenMP team for the
 * whole call: matmuls split their output blocks over the threads, rows and attention heads are split for
 * the rest, with a barrier between steps; no thread split changes any element's arithmetic. Returns 0, or -1
 * (no memory, or shapes outside this code's range: the caller runs the module path). */
int es_decode_stage(const es_layer *layer_weights, int64_t layers, int64_t S, int64_t D, int64_t H,
                    int64_t Hkv, int64_t hd, int64_t F, float eps, float *x, const uint16_t *cos,
                    const uint16_t *ssin, const int64_t *kv, const int64_t *cap, const int64_t *pos, int threads) {
    const int64_t group = H / Hkv, qkv_n = (H + 2 * Hkv) * hd;
    if (H % Hkv || group > ATT_MAX_GROUP || hd % 32 || hd > 256 || D % 32 || F % 32) return -1;
    int64_t longest = 0;
    for (int64_t s = 0; s < S; s++) longest = MAX2(longest, pos[s] + 1);
    const int64_t narrow = MAX2(MAX2(D, F), H * hd), widest = MAX2(MAX2(qkv_n, 2 * F), D);
    int nt = threads < 1 ? 1 : threads;
    uint16_t *h = malloc(S * narrow * 2), *wide = malloc(S * widest * 2), *att = malloc(S * H * hd * 2);
    float *scores = malloc(nt * group * longest * sizeof(float));
    qrows xr;
    int rc = qrows_alloc(&xr, S, narrow) || !h || !wide || !att || !scores ? -1 : 0;
    if (rc == 0) {
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
#ifdef _OPENMP
            const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
            const int t = 0, n = 1;
#endif
            const float scale = 1.0f / sqrtf((float)hd);
            for (int64_t l = 0; l < layers; l++) {
                const es_layer *w = layer_weights + l;
                const int64_t DB = D / 32, FB = F / 32, AB = H * hd / 32;
                for (int64_t s = t; s < S; s += n) {
                    rms_norm(x + s * D, w->norm1, D, eps, h + s * D);
                    quantize_row(h + s * D, D, xr.q + s * D, xr.d + s * DB, xr.s + s * DB);
                }
#pragma omp barrier
                linear_slice(&w->qkv, &xr, S, wide, t, n); /* (S, (H + 2Hkv) * hd) */
#pragma omp barrier
                for (int64_t s = t; s < S; s += n) {
                    uint16_t *row = wide + s * qkv_n;
                    rotary(row, H + Hkv, hd, cos + s * hd, ssin + s * hd);
                    uint16_t *kc = (uint16_t *)kv[s] + l * 2 * Hkv * cap[s] * hd, *vc = kc + Hkv * cap[s] * hd;
                    for (int64_t g = 0; g < Hkv; g++) {
                        memcpy(kc + (g * cap[s] + pos[s]) * hd, row + (H + g) * hd, hd * 2);
                        memcpy(vc + (g * cap[s] + pos[s]) * hd, row + (H + Hkv + g) * hd, hd * 2);
                    }
                }
#pragma omp barrier
                for (int64_t item = t; item < S * Hkv; item += n) {
                    const int64_t s = item / Hkv, g = item % Hkv;
                    const uint16_t *kc = (const uint16_t *)kv[s] + l * 2 * Hkv * cap[s] * hd;
                    const uint16_t *vc = kc + Hkv * cap[s] * hd;
                    attend_group(wide + s * qkv_n + g * group * hd, group, hd, kc + g * cap[s] * hd,
                                 vc + g * cap[s] * hd, pos[s] + 1, scale, scores + t * group * longest,
                                 att + (s * H + g * group) * hd);
                }
#pragma omp barrier
                for (int64_t s = t; s < S; s += n)
                    quantize_row(att + s * H * hd, H * hd, xr.q + s * H * hd, xr.d + s * AB, xr.s + s * AB);
#pragma omp barrier
                linear_slice(&w->o, &xr, S, h, t, n); /* (S, D) */
#pragma omp barrier
                for (int64_t s = t; s < S; s += n) {
                    for (int64_t d = 0; d < D; d++) x[s * D + d] += bf16_f(h[s * D + d]);
                    rms_norm(x + s * D, w->norm2, D, eps, h + s * D);
                    quantize_row(h + s * D, D, xr.q + s * D, xr.d + s * DB, xr.s + s * DB);
                }
#pragma omp barrier
                linear_slice(&w->gate_up, &xr, S, wide, t, n); /* (S, 2F) */
#pragma omp barrier
                for (int64_t s = t; s < S; s += n) {
                    silu_mul(wide + s * 2 * F, F, h + s * F);
                    quantize_row(h + s * F, F, xr.q + s * F, xr.d + s * FB, xr.s + s * FB);
                }
#pragma omp barrier
                linear_slice(&w->down, &xr, S, wide, t, n); /* (S, D) */
#pragma omp barrier
                for (int64_t s = t; s < S; s += n)
                    for (int64_t d = 0; d < D; d++) x[s * D + d] += bf16_f(wide[s * D + d]);
                /* the next layer's first step works on the same rows per thread: no barrier needed */
            }
        }
    }
    qrows_free(&xr);
    free(h), free(wide), free(att), free(scores);
    return rc;
}
