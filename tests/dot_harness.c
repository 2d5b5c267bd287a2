/* A standalone check of node/lowbit/csrc/dot.c for one instruction set: the int4 and int8 kernels against a scalar
 * model of the same arithmetic (bit for bit), rows alone vs batched, and es_decode_stage's rows alone vs
 * batched (bit for bit, 1 vs 2 threads). Prints "<isa>: ok" and exits 0, or lists mismatches and exits 1.
 *
 * tests/test_kernels.py builds and runs it for every kernel set this machine runs, and for aarch64 (NEON,
 * NEON + sdot) under qemu-user when `aarch64-linux-gnu-gcc` and `qemu-aarch64` are installed:
 *   aarch64-linux-gnu-gcc -O2 -static -fopenmp -ffp-contract=off -fno-math-errno -fno-trapping-math -march=armv8.2-a+dotprod \
 *       -o h tests/dot_harness.c -lm && qemu-aarch64 ./h */
#include "../node/lowbit/csrc/dot.c"
#include <stdio.h>

static uint32_t rng = 12345;
static uint32_t rnd(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static float frand(void) { return ((float)(rnd() % 20001) - 10000.0f) / 10000.0f; }

#define K 96
#define N 40
#define M 11 /* tiles of 4, 4 and 3 rows */
#define NP 48 /* N padded */

int main(void) {
    static uint8_t q4[NP][K];
    static int8_t q8[NP][K];
    static uint16_t params[NP / 16][K / 32][2][16], sc8[NP];
    static uint8_t codes4[NP / 16][K / 32][256];
    static int8_t codes8[NP / 16][K / 32][512];
    static uint16_t x[M][K], y4[M][N], y8[M][N], y1[N];
    int fails = 0;
    for (int n = 0; n < NP; n++)
        for (int k = 0; k < K; k++) q4[n][k] = rnd() % 16, q8[n][k] = (int8_t)((int)(rnd() % 255) - 127);
    for (int b = 0; b < NP / 16; b++)
        for (int g = 0; g < K / 32; g++)
            for (int n = 0; n < 16; n++) {
                params[b][g][0][n] = (uint16_t)(((10 + rnd() % 4) << 10) | (rnd() % 1024));          /* scale > 0 */
                params[b][g][1][n] = (uint16_t)(0x8000 | ((10 + rnd() % 4) << 10) | (rnd() % 1024)); /* min < 0 */
            }
    for (int n = 0; n < NP; n++) sc8[n] = f_bf16(0.001f * (1 + rnd() % 100));
    for (int b = 0; b < NP / 16; b++)
        for (int g = 0; g < K / 32; g++)
            for (int kq = 0; kq < 8; kq++)
                for (int n = 0; n < 16; n++)
                    for (int e = 0; e < 4; e++) {
                        const int k = g * 32 + 4 * kq + e;
                        codes8[b][g][64 * kq + 4 * n + e] = q8[b * 16 + n][k];
                        if (kq < 4) codes4[b][g][64 * kq + 4 * n + e] = q4[b * 16 + n][k];
                        else codes4[b][g][64 * (kq - 4) + 4 * n + e] |= (uint8_t)(q4[b * 16 + n][k] << 4);
                    }
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) x[m][k] = f_bf16(frand() * (k == 7 ? 30.0f : 1.0f));
    es_dot_int4_mm(&x[0][0], M, K, &codes4[0][0][0], &params[0][0][0][0], N, &y4[0][0], 2);
    es_dot_int8_mm(&x[0][0], M, K, &codes8[0][0][0], sc8, N, &y8[0][0], 2);
    /* every batch of consecutive rows (each row at every place of a tile, every ragged tile height): the
     * same bits as in the full batch */
    for (int m0 = 0; m0 < M; m0++)
        for (int b = 2; m0 + b <= M; b++) {
            static uint16_t yb[M][N];
            es_dot_int4_mm(x[m0], b, K, &codes4[0][0][0], &params[0][0][0][0], N, &yb[0][0], 1);
            if (memcmp(yb, y4[m0], (size_t)b * N * 2)) fails++, printf("int4 rows %d..%d differ in a batch of %d\n", m0, m0 + b - 1, b);
            es_dot_int8_mm(x[m0], b, K, &codes8[0][0][0], sc8, N, &yb[0][0], 1);
            if (memcmp(yb, y8[m0], (size_t)b * N * 2)) fails++, printf("int8 rows %d..%d differ in a batch of %d\n", m0, m0 + b - 1, b);
        }
    for (int m = 0; m < M; m++) {
        int8_t xq[K];
        float xd[K / 32], xs[K / 32];
        quantize_row(x[m], K, xq, xd, xs);
        for (int n = 0; n < N; n++) { /* the scalar model: same float steps, in the same order */
            float a4 = 0.0f, a8 = 0.0f;
            for (int g = 0; g < K / 32; g++) {
                int32_t i4 = 0, i8 = 0;
                for (int i = 0; i < 32; i++) i4 += q4[n][32 * g + i] * xq[32 * g + i], i8 += q8[n][32 * g + i] * xq[32 * g + i];
                a4 = fmaf((float)i4, f16_f(params[n / 16][g][0][n % 16]) * xd[g], a4);
                a4 = fmaf(f16_f(params[n / 16][g][1][n % 16]), xs[g], a4);
                a8 = fmaf((float)i8, xd[g], a8);
            }
            if (f_bf16(a4) != y4[m][n] || f_bf16(a8 * bf16_f(sc8[n])) != y8[m][n]) {
                if (fails++ < 5) printf("mismatch m %d n %d: int4 %g vs %g, int8 %g vs %g\n", m, n, a4, bf16_f(y4[m][n]),
                                        a8 * bf16_f(sc8[n]), bf16_f(y8[m][n]));
            }
        }
        es_dot_int4_mm(x[m], 1, K, &codes4[0][0][0], &params[0][0][0][0], N, y1, 1);
        if (memcmp(y1, y4[m], sizeof y1)) fails++, printf("int4 row %d differs alone\n", m);
        es_dot_int8_mm(x[m], 1, K, &codes8[0][0][0], sc8, N, y1, 1);
        if (memcmp(y1, y8[m], sizeof y1)) fails++, printf("int8 row %d differs alone\n", m);
    }
#ifdef TILE_ROWS
    { /* the tiles' float sums, before any bf16 rounding, against the one-row kernels: bit for bit */
        static int8_t xq[M][K];
        static float xd[M][K / 32], xsum[M][K / 32];
        for (int m = 0; m < M; m++) quantize_row(x[m], K, xq[m], xd[m], xsum[m]);
        for (int R = 1; R <= TILE_ROWS; R++)
            for (int b = 0; b < NP / 16; b++) {
                /* the tiles take rows at a stride of K codes and K/32 scales: a packed copy of rows 1..R */
                static int8_t tq[TILE_ROWS * K];
                static float td[TILE_ROWS * (K / 32)], ts[TILE_ROWS * (K / 32)];
                for (int r = 0; r < R; r++) {
                    memcpy(tq + r * K, xq[1 + r], K);
                    memcpy(td + r * (K / 32), xd[1 + r], sizeof xd[0]), memcpy(ts + r * (K / 32), xsum[1 + r], sizeof xsum[0]);
                }
                float t4[TILE_ROWS][16], t8[TILE_ROWS][16], r4[16], r8[16];
                int4_tiles[R](&codes4[b][0][0], &params[b][0][0][0], K / 32, tq, K, td, ts, 1, t4);
                int8_tiles[R](&codes8[b][0][0], K / 32, tq, K, td, 0, t8);
                for (int r = 0; r < R; r++) {
                    int4_row(&codes4[b][0][0], &params[b][0][0][0], K / 32, xq[1 + r], xd[1 + r], xsum[1 + r], r4);
                    int8_row(&codes8[b][0][0], K / 32, xq[1 + r], xd[1 + r], r8);
                    if (memcmp(t4[r], r4, sizeof r4)) fails++, printf("int4 tile of %d, row %d: float sums differ\n", R, r);
                    if (memcmp(t8[r], r8, sizeof r8)) fails++, printf("int8 tile of %d, row %d: float sums differ\n", R, r);
                }
            }
    }
#endif
    /* whole-stage decode: 2 layers, D 64, H 4, Hkv 2, hd 32, F 96; 6 sequences (tiles of 4 and 2 rows) */
    enum { D = 64, H = 4, HKV = 2, HD = 32, F = 96, L = 2, S = 6, CAP = 16 };
    static uint8_t lc[4][4][(F > D ? 2 * F : D) / 16 * 3 * 256];
    static uint16_t lp[4][4][(2 * F) / 16 * 3 * 32];
    static float norms[2][D];
    for (int i = 0; i < D; i++) norms[0][i] = 1.0f + 0.01f * (float)i, norms[1][i] = 1.0f - 0.005f * (float)i;
    es_layer layers[L];
    const int64_t dims[4][2] = {{(H + 2 * HKV) * HD, D}, {D, H * HD}, {2 * F, D}, {D, F}}; /* n, k */
    for (int l = 0; l < L; l++) {
        es_linear *lin[4] = {&layers[l].qkv, &layers[l].o, &layers[l].gate_up, &layers[l].down};
        for (int t = 0; t < 4; t++) {
            const int64_t n = dims[t][0], k = dims[t][1], blocks = (n + 15) / 16;
            for (int64_t i = 0; i < blocks * (k / 32) * 256; i++) lc[l][t][i] = (uint8_t)rnd();
            for (int64_t i = 0; i < blocks * (k / 32) * 32; i++)
                lp[l][t][i] = (uint16_t)((i % 32 < 16 ? 0 : 0x8000) | ((8 + rnd() % 3) << 10) | (rnd() % 1024));
            *lin[t] = (es_linear){4, lc[l][t], lp[l][t], 0, n, k};
        }
        layers[l].norm1 = norms[0], layers[l].norm2 = norms[1];
    }
    static uint16_t kv[S][L * 2 * HKV * CAP * HD], kv1[L * 2 * HKV * CAP * HD], cs[S][HD], sn[S][HD];
    static float xs[S][D], x1[D];
    for (int s = 0; s < S; s++) {
        for (int i = 0; i < L * 2 * HKV * CAP * HD; i++) kv[s][i] = f_bf16(frand());
        for (int i = 0; i < HD; i++) cs[s][i] = f_bf16(cosf(0.3f * (float)(s + i))), sn[s][i] = f_bf16(sinf(0.3f * (float)(s + i)));
        for (int i = 0; i < D; i++) xs[s][i] = frand();
    }
    int64_t ptrs[S], caps[S] = {CAP, CAP, CAP, CAP, CAP, CAP}, pos[S] = {5, 0, 9, 3, 12, 1};
    static float xin[S][D];
    memcpy(xin, xs, sizeof xs);
    static uint16_t kvin[S][L * 2 * HKV * CAP * HD];
    memcpy(kvin, kv, sizeof kv);
    for (int s = 0; s < S; s++) ptrs[s] = (int64_t)(intptr_t)kv[s];
    if (es_decode_stage(layers, L, S, D, H, HKV, HD, F, 1e-5f, &xs[0][0], &cs[0][0], &sn[0][0], ptrs, caps, pos, 2)) fails++, printf("stage failed\n");
    for (int s = 0; s < S; s++) {
        memcpy(x1, xin[s], sizeof x1);
        memcpy(kv1, kvin[s], sizeof kv1);
        int64_t p1 = (int64_t)(intptr_t)kv1;
        es_decode_stage(layers, L, 1, D, H, HKV, HD, F, 1e-5f, x1, cs[s], sn[s], &p1, &caps[s], &pos[s], 1);
        if (memcmp(x1, xs[s], sizeof x1) || memcmp(kv1, kv[s], sizeof kv1)) fails++, printf("stage row %d differs alone\n", s);
        for (int i = 0; i < D; i++)
            if (!(fabsf(x1[i]) < 1e30f)) { fails++, printf("stage row %d not finite\n", s); break; }
    }
    printf("%s: %s (x[0][0..3] = %g %g %g)\n", ES_ISA, fails ? "FAIL" : "ok", xs[0][0], xs[0][1], xs[0][2]);
    return fails != 0;
}
