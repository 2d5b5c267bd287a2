"""Decode attention in the native whole-stage kernels (node/lowbit/csrc/dot.c attend_group, used by
es_decode_stage): against a float64 reference, on every kernel set this machine runs (avx2, generic, ...) and,
under qemu-user, on aarch64 NEON (plain and with sdot). AVX-512 builds are compiled (they share the AVX2
attention code) but run only where the CPU has AVX-512.

The harness below includes dot.c (its static functions are in reach), like tests/dot_harness.c, and checks:
  - outputs of `group` query heads against softmax(q K^T / sqrt(hd)) V in float64 from the same bf16 inputs,
    at lengths 1, 15, 16, 17, 250, 1000 (ragged against every vector and block size), for several head sizes
    and group sizes (every specialised path and the general one);
  - a tolerance that a wrong kernel fails: the same check against a reference with one key left out must fail;
  - nothing past `len` is read: K/V rows after the sequence filled with NaN give the same bits as zeros;
  - a result does not depend on where the rows sit in memory (the same sequence at another address and
    cache capacity: the same bits), which is what makes a row alone = the row in any batch;
  - the vector exp (att_exp) gives exp_approx's bits lane for lane, including ragged ends, and stays within
    3e-7 relative of exp in float64; its total is the sum of those values.
Numbers only: the speed is measured by benchmarks/kernels.py --stage (docs/kernels.md).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cross import aarch64_tools

from edgeshard.node.lowbit import native

DOT_C = Path(native.DOT_SOURCE).resolve()
SETS = [v for v in native.VARIANTS if v != "amx" and not native.runnable(v)]
COMPILE_ONLY = [v for v in ("avx512", "avx512-vnni") if native._is_x86() and native.runnable(v)]
COMMON = ["-O2", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

HARNESS = r"""
#include DOT_C
#include <stdio.h>

static uint32_t rng = 7;
static uint32_t rnd(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static float frand(void) { return ((float)(rnd() % 20001) - 10000.0f) / 10000.0f; }

/* float64 softmax(q k^T * scale) v over keys [0, len) except `skip` (-1: none) */
static void reference(const uint16_t *q, int64_t group, int64_t hd, const uint16_t *k, const uint16_t *v,
                      int64_t len, int64_t skip, double *out) {
    static double s[4096];
    for (int64_t h = 0; h < group; h++) {
        double mx = -1e300, tot = 0.0;
        for (int64_t j = 0; j < len; j++) {
            double acc = 0.0;
            for (int64_t d = 0; d < hd; d++) acc += (double)bf16_f(q[h * hd + d]) * (double)bf16_f(k[j * hd + d]);
            s[j] = acc / sqrt((double)hd);
            if (j != skip && s[j] > mx) mx = s[j];
        }
        for (int64_t j = 0; j < len; j++) tot += j == skip ? 0.0 : (s[j] = exp(s[j] - mx));
        for (int64_t d = 0; d < hd; d++) {
            double acc = 0.0;
            for (int64_t j = 0; j < len; j++)
                if (j != skip) acc += s[j] / tot * (double)bf16_f(v[j * hd + d]);
            out[h * hd + d] = acc;
        }
    }
}

/* the largest error of out against ref, in units of the tolerance (<= 1 passes): one bf16 ulp of the output
 * (up to 2^-7 relative; rounding alone takes half) plus float32 accumulation against the head's largest output */
static double worst(const uint16_t *out, const double *ref, int64_t group, int64_t hd) {
    double w = 0.0;
    for (int64_t h = 0; h < group; h++) {
        double big = 0.0;
        for (int64_t d = 0; d < hd; d++) big = fabs(ref[h * hd + d]) > big ? fabs(ref[h * hd + d]) : big;
        for (int64_t d = 0; d < hd; d++) {
            const double r = ref[h * hd + d], e = fabs((double)bf16_f(out[h * hd + d]) - r);
            const double tol = fabs(r) * (1.0 / 128) + big * 2e-4 + 1e-30;
            w = e / tol > w ? e / tol : w;
        }
    }
    return w;
}

int main(void) {
    enum { MAXL = 1000, CAPX = 1040, MAXHD = 128, MAXG = 5 };
    static uint16_t q[MAXG * MAXHD], k[CAPX * MAXHD], v[CAPX * MAXHD], k2[(CAPX + 3) * MAXHD],
        v2[(CAPX + 3) * MAXHD], out[MAXG * MAXHD], out2[MAXG * MAXHD], outz[MAXG * MAXHD];
    static float scores[MAXG * CAPX];
    static double ref[MAXG * MAXHD];
    const int64_t lens[] = {1, 15, 16, 17, 250, 1000}, shapes[][2] = {{3, 64}, {1, 64}, {2, 128}, {4, 32}, {5, 96}};
    int fails = 0;
    double seen = 0.0;
    for (int si = 0; si < 5; si++) {
        const int64_t group = shapes[si][0], hd = shapes[si][1];
        for (int li = 0; li < 6; li++) {
            const int64_t len = lens[li];
            for (int64_t i = 0; i < group * hd; i++) q[i] = f_bf16(frand() * 2.0f);
            for (int64_t i = 0; i < CAPX * hd; i++) k[i] = f_bf16(frand() * 2.0f), v[i] = f_bf16(frand());
            if (len > 16) k[5 * hd + 1] = f_bf16(40.0f), q[1] = f_bf16(3.0f); /* one peaked key */
            for (int64_t i = len * hd; i < CAPX * hd; i++) k[i] = v[i] = 0;
            const float scale = 1.0f / sqrtf((float)hd);
            attend_group(q, group, hd, k, v, len, scale, scores, outz);
            for (int64_t i = len * hd; i < CAPX * hd; i++) k[i] = v[i] = 0x7fc0; /* NaN past len: never read */
            attend_group(q, group, hd, k, v, len, scale, scores, out);
            if (memcmp(out, outz, (size_t)(group * hd * 2)))
                fails++, printf("group %d hd %d len %d: rows past len changed the result\n", (int)group, (int)hd, (int)len);
            /* the same rows at another address (an odd offset of 3 rows): the same bits */
            memcpy(k2 + 3 * hd, k, (size_t)(len * hd * 2)), memcpy(v2 + 3 * hd, v, (size_t)(len * hd * 2));
            attend_group(q, group, hd, k2 + 3 * hd, v2 + 3 * hd, len, scale, scores, out2);
            if (memcmp(out, out2, (size_t)(group * hd * 2)))
                fails++, printf("group %d hd %d len %d: depends on where the rows are\n", (int)group, (int)hd, (int)len);
            reference(q, group, hd, k, v, len, -1, ref);
            const double w = worst(out, ref, group, hd);
            seen = w > seen ? w : seen;
            if (!(w <= 1.0)) fails++, printf("group %d hd %d len %d: error %.3g x the tolerance\n", (int)group, (int)hd, (int)len, w);
            if (len >= 15) { /* the tolerance catches a kernel that drops one key (the peaked one where present) */
                reference(q, group, hd, k, v, len, len > 16 ? 5 : len / 2, ref);
                if (worst(out, ref, group, hd) <= 1.0)
                    fails++, printf("group %d hd %d len %d: a reference without one key also passes\n", (int)group, (int)hd, (int)len);
            }
        }
    }
    /* att_exp: exp_approx's bits lane for lane, ragged ends, total; accuracy against exp in float64 within
     * 3e-7 plus exp_approx's float argument reduction (~|t| * 2^-24 relative), above its -87 clamp */
    static float e[97], x[97];
    double worst_exp = 0.0, worst_expf = 0.0;
    for (int n = 1; n <= 97; n += (n < 20 ? 1 : 11)) {
        for (int i = 0; i < n; i++) x[i] = e[i] = -100.0f * (float)(rnd() % 100001) / 100000.0f + (i == 0 ? 0.5f : 0.0f);
        const float mx = 0.5f, tot = att_exp(e, n, mx);
        double sum = 0.0;
        for (int i = 0; i < n; i++) {
            const float want = exp_approx(x[i] - mx);
            if (memcmp(&want, &e[i], 4)) fails++, printf("att_exp n %d lane %d: %a, exp_approx %a\n", n, i, e[i], want);
            const double t = (double)(x[i] - mx), rel = fabs((double)e[i] - exp(t)) / exp(t);
            sum += (double)e[i];
            if (t <= -87.0) continue;
            const double bound = 3e-7 + fabs(t) * 8e-8, relf = fabs((double)expf((float)t) - exp(t)) / exp(t);
            worst_exp = rel / bound > worst_exp ? rel / bound : worst_exp;
            worst_expf = relf / bound > worst_expf ? relf / bound : worst_expf;
            if (!(rel < bound)) fails++, printf("att_exp(%g) relative error %.3g\n", t, rel);
        }
        if (!(fabs((double)tot - sum) <= 1e-6 * sum)) fails++, printf("att_exp n %d: total %g, want %g\n", n, tot, sum);
    }
    printf("%s: %s (worst attention error %.3f of the tolerance; exp error %.3f of its bound, expf's %.3f)\n", ES_ISA,
           fails ? "FAIL" : "ok", seen, worst_exp, worst_expf);
    return fails != 0;
}
"""


def _build(tmp_path: Path, cc: list[str], flags: list[str], compile_only: bool = False) -> Path:
    src = tmp_path / "attention_harness.c"
    src.write_text(HARNESS.replace("#include DOT_C", f'#include "{DOT_C}"'))
    exe = tmp_path / "attention_harness"
    args = [*cc, *COMMON, *flags, *(["-c"] if compile_only else []), "-o", str(exe), str(src)]
    done = subprocess.run([*args, *([] if compile_only else ["-lm"])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return exe


def _run(runner: list[str], exe: Path) -> str:
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.skipif(not native._compiler(), reason="no C compiler")
@pytest.mark.parametrize("name", SETS)
def test_attention_matches_float64_on_this_cpu(name: str, tmp_path: Path) -> None:
    exe = _build(tmp_path, [native._compiler()], native.VARIANTS[name][0])
    assert _run([], exe).startswith(f"{name}: ok")


@pytest.mark.skipif(not native._compiler(), reason="no C compiler")
@pytest.mark.parametrize(
    "name", COMPILE_ONLY or [pytest.param("none", marks=pytest.mark.skip("runs here, or not x86"))]
)
def test_attention_compiles_for_avx512(name: str, tmp_path: Path) -> None:
    """AVX-512 builds use the AVX2 attention code; this CPU cannot run them, so they are compiled only."""
    _build(tmp_path, [native._compiler()], native.VARIANTS[name][0], compile_only=True)


@pytest.mark.parametrize("name,flags", [("neon-dot", "-march=armv8.2-a+dotprod"), ("neon", "-march=armv8-a")])
def test_attention_matches_float64_on_aarch64(name: str, flags: str, tmp_path: Path) -> None:
    """The NEON attention, natively on aarch64 or built for it and run under qemu-user."""
    cc, runner = aarch64_tools(name)
    assert _run(runner, _build(tmp_path, cc, [flags])).startswith(f"{name}: ok")
