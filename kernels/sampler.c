/*
 * sampler.c - token sampling over float32 logits, bit-identical to the numpy reference.
 *
 * Arithmetic (docs/SAMPLING.md is the normative description; sampling.py the reference):
 *   t_i = (x_i - max) * c,  c = (float)(log2(e) / temperature)      float32
 *   q_i = rint(exp2(t_i) * 2^30) with a fixed degree-5 exp2          uint32, 0 if t_i < -31
 *   all sums of q are exact uint64, so any summation order gives the same result.
 *   top-k ranks (x desc, id asc); top-p and min-p rank (q desc, id asc); the draw walks the
 *   kept tokens in id order and picks the first whose running sum exceeds
 *   r = mulhi64(rng_next(), sum of kept q).
 * Per-call work is O(vocab) streaming passes (SIMD where available) plus selection over
 * small candidate sets; nothing is allocated after esl_sampler_init.
 * Without top-k, a bound pass usually replaces the exact softmax over the whole vocabulary:
 * tokens with t >= -12 get exact masses, the rest only integer bounds on their sum, and the
 * exact path runs only when those bounds cannot decide the token (docs/SAMPLING.md).
 */
#include "edgeslm_kernel.h"
#include "esl_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ESL_Q_ONE (UINT32_C(1) << 30)
#define ESL_MAX_VOCAB (1 << 22)
#define ESL_T_CLAMP (-32.0f)
#define ESL_ROUND_MAGIC_F 12582912.0f        /* 1.5 * 2^23 */
#define ESL_ROUND_MAGIC_D 6755399441055744.0 /* 1.5 * 2^52 */
#define ESL_LOG2E 0x1.71547652b82fep+0

/* Bound pass (no top-k). ts = (x - max) * (c * 2^23) = t * 2^23 exactly. Candidates: t >= -12.
 * Every other token has q <= ESL_BULK_QMAX and, with r = esl__bulk_r(ts),
 * floor(r * ESL_BULK_LO_NUM / 2^16) - 1 <= q <= r + (r >> 12) + 1; tests/test_sampler.py
 * checks both for every float32 t in [-32, -12) (t below -32 is clamped to -32). */
#define ESL_BULK_TS_THETA (-100663296.0f) /* -12 * 2^23 */
#define ESL_BULK_TS_MIN (-268435456.0f)   /* -32 * 2^23 */
#define ESL_BULK_BIAS (157 << 23)         /* float exponent bias 127, plus 30 */
#define ESL_BULK_QMAX (UINT32_C(1) << 18)
#define ESL_BULK_LO_NUM 61600u            /* just below 2^16 / 1.06149 */
#define ESL_BULK_BLOCK 256                /* tokens per block of bulk sums */

/* exp2(f) on [-0.5, 0.5], c0 = 1; keep equal to _EXP2_POLY in edgeslm/sampling.py. */
#define ESL_P1 0x1.62e426p-1f
#define ESL_P2 0x1.ebf9b6p-3f
#define ESL_P3 0x1.c6baaap-5f
#define ESL_P4 0x1.3cec16p-7f
#define ESL_P5 0x1.5a8502p-10f

struct esl_sampler {
    int32_t vocab;
    int32_t n_words;  /* mask words: ceil(vocab / 32) */
    uint32_t *q;      /* [vocab] fixed-point masses of the current call */
    int32_t *list;    /* [vocab] candidate ids */
    int32_t *kept;    /* [vocab] kept ids, then radix-sort scratch */
    int32_t *tmp;     /* [vocab] radix-sort scratch */
    uint64_t *keys;   /* [vocab] selection keys */
    uint32_t *counts; /* [vocab] penalty counts; all zero between calls */
    float *bmax;      /* [vocab / 8 + 1] block maxima for the top-k prefilter */
    int32_t cap;      /* most candidates the bound pass takes: vocab / 16 + 64 */
    float *xc;        /* [cap] candidate logits, compacted */
    uint32_t *qc;     /* [cap] their masses */
    uint64_t *bsum;   /* [vocab / ESL_BULK_BLOCK + 1] per-block sums of the bulk bound r */
};

/* ------------------------------------------------------------------------------------ */
/* Scalar building blocks (the definition every SIMD path must reproduce bit for bit).   */

/* Returns the fixed-point mass of scaled logit t (t <= 0 or -inf; never NaN). Any t below
 * -31 gives 0, so the clamp at -32 doubles as the cut-off. */
static uint32_t esl__q_of_t(float t)
{
    float kf, f, p, v;
    int32_t k, bits;
    double r;
    uint32_t q;
    t = t < ESL_T_CLAMP ? ESL_T_CLAMP : t; /* -inf too; q(-32) = rint(2^-2 * p) = 0 */
    kf = (t + ESL_ROUND_MAGIC_F) - ESL_ROUND_MAGIC_F;
    f = t - kf;
    p = ESL_P5;
    p = p * f + ESL_P4;
    p = p * f + ESL_P3;
    p = p * f + ESL_P2;
    p = p * f + ESL_P1;
    p = p * f + 1.0f;
    k = (int32_t)kf;
    memcpy(&bits, &p, sizeof bits);
    bits += (k + 30) * (1 << 23);
    memcpy(&v, &bits, sizeof v);
    r = ((double)v + ESL_ROUND_MAGIC_D) - ESL_ROUND_MAGIC_D;
    q = (uint32_t)r;
    return q > ESL_Q_ONE ? ESL_Q_ONE : q;
}

/* Returns an unsigned key that orders floats like <, with -0 == +0 (x not NaN). */
static uint32_t esl__float_key(float x)
{
    uint32_t b;
    x = x + 0.0f; /* -0 -> +0 */
    memcpy(&b, &x, sizeof b);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Max of x[0..n) per block of `block` (last block may be short) into bmax[]; returns the
 * global max and sets *bad when a NaN is seen. n >= 1. */
static float esl__scan_max_c(const float *x, int32_t n, int32_t block, float *bmax, int *bad)
{
    float gmax = -INFINITY;
    int32_t b0, i, nb = 0;
    int nan = 0;
    for (b0 = 0; b0 < n; b0 += block) {
        int32_t e = b0 + block < n ? b0 + block : n;
        float m = -INFINITY;
        for (i = b0; i < e; i++) {
            float v = x[i];
            nan |= v != v;
            m = v > m ? v : m;
        }
        if (bmax)
            bmax[nb++] = m;
        gmax = m > gmax ? m : gmax;
    }
    *bad = nan;
    return gmax;
}

/* Returns the first index i in [0, n) with x[i] == m (m present). */
static int32_t esl__first_eq_c(const float *x, int32_t n, float m)
{
    int32_t i;
    for (i = 0; i < n; i++)
        if (x[i] == m)
            return i;
    return n - 1;
}

/* Writes q[i] for all i and returns the exact sum. */
static uint64_t esl__q_pass_c(const float *x, int32_t n, float m, float c, uint32_t *q)
{
    uint64_t z = 0;
    int32_t i;
    for (i = 0; i < n; i++) {
        float t = (x[i] - m) * c;
        q[i] = esl__q_of_t(t);
        z += q[i];
    }
    return z;
}

/* Appends every i with x[i] >= tau (ascending) to out; returns the count. */
static int32_t esl__collect_ge_c(const float *x, int32_t n, float tau, int32_t *out)
{
    int32_t i, k = 0;
    for (i = 0; i < n; i++)
        if (x[i] >= tau)
            out[k++] = i;
    return k;
}

/* Appends every i with lo <= q[i] < hi (ascending) to out; returns the count. */
static int32_t esl__collect_band_c(const uint32_t *q, int32_t n, uint32_t lo, uint32_t hi,
                                   int32_t *out)
{
    int32_t i, k = 0;
    for (i = 0; i < n; i++)
        if (q[i] >= lo && q[i] < hi)
            out[k++] = i;
    return k;
}

/* Returns the sum of q[0..n). */
static uint64_t esl__sum_q_c(const uint32_t *q, int32_t n)
{
    uint64_t z = 0;
    int32_t i;
    for (i = 0; i < n; i++)
        z += q[i];
    return z;
}

/* Returns the bulk bound r of a token with ts < ESL_BULK_TS_THETA (ts = t * 2^23, t < -12):
 * r = rint(S), S = 2^(floor(t) + 30) * (1 + t - floor(t)), the chord of 2^(t + 30) between
 * consecutive integers (so 2^(t + 30) <= S <= 1.06149 * 2^(t + 30)). Here ts is an integer
 * (ulp(t) >= 2^-20), so the conversion is exact; S is built from its bits. */
static uint32_t esl__bulk_r(float ts)
{
    int32_t bits;
    float v;
    ts = ts < ESL_BULK_TS_MIN ? ESL_BULK_TS_MIN : ts; /* -inf too; S(-32) = 0.25, r = 0 */
    bits = (int32_t)ts + ESL_BULK_BIAS;
    memcpy(&v, &bits, sizeof v);
    return (uint32_t)(((double)v + ESL_ROUND_MAGIC_D) - ESL_ROUND_MAGIC_D);
}

/* One token of the bound pass: appends i to cand if ts >= ESL_BULK_TS_THETA, else adds its
 * bulk bound to *z. Returns 0, or -1 when cand already holds cap ids. */
static int esl__bulk_one(float ts, int32_t i, int32_t *cand, int32_t *k, int32_t cap,
                         uint64_t *z)
{
    if (ts < ESL_BULK_TS_THETA) {
        *z += esl__bulk_r(ts);
        return 0;
    }
    if (*k == cap)
        return -1;
    cand[(*k)++] = i;
    return 0;
}

/* Bound pass over x[0..n) with c2 = c * 2^23: appends (ascending) every i with
 * (x[i] - m) * c2 >= ESL_BULK_TS_THETA, i.e. t >= -12, to cand, and stores for each block of
 * ESL_BULK_BLOCK tokens the sum of esl__bulk_r over its other tokens in bsum[]. Returns the
 * candidate count, or -1 as soon as there are more than cap candidates. */
static int32_t esl__bulk_pass_c(const float *x, int32_t n, float m, float c2, int32_t *cand,
                                int32_t cap, uint64_t *bsum)
{
    int32_t b0, i, k = 0, nb = 0;
    for (b0 = 0; b0 < n; b0 += ESL_BULK_BLOCK) {
        int32_t e = b0 + ESL_BULK_BLOCK < n ? b0 + ESL_BULK_BLOCK : n;
        uint64_t z = 0;
        for (i = b0; i < e; i++)
            if (esl__bulk_one((x[i] - m) * c2, i, cand, &k, cap, &z))
                return -1;
        bsum[nb++] = z;
    }
    return k;
}

/* ------------------------------------------------------------------------------------ */
/* AVX2 (x86): same operations, eight lanes. No FMA: mul and add stay separate.          */
#if ESL_HAVE_AVX2_CODE

/* Returns the largest of the eight lanes of v (no NaN in v). */
ESL_TARGET_AVX2 static float esl__hmax_avx2(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* AVX2 twin of esl__scan_max_c (same contract and results). */
ESL_TARGET_AVX2 static float esl__scan_max_avx2(const float *x, int32_t n, int32_t block,
                                                float *bmax, int *bad)
{
    __m256 vbad = _mm256_setzero_ps();
    float gmax = -INFINITY;
    int32_t b0, nb = 0;
    int nan_tail = 0;
    for (b0 = 0; b0 < n; b0 += block) {
        int32_t e = b0 + block < n ? b0 + block : n;
        int32_t i = b0;
        __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
        float m;
        for (; i + 16 <= e; i += 16) {
            __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
            m0 = _mm256_max_ps(m0, a);
            m1 = _mm256_max_ps(m1, b);
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
        }
        for (; i + 8 <= e; i += 8) {
            __m256 a = _mm256_loadu_ps(x + i);
            m0 = _mm256_max_ps(m0, a);
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        }
        m = esl__hmax_avx2(_mm256_max_ps(m0, m1));
        for (; i < e; i++) {
            float v = x[i];
            nan_tail |= v != v;
            m = v > m ? v : m;
        }
        if (bmax)
            bmax[nb++] = m;
        gmax = m > gmax ? m : gmax;
    }
    *bad = nan_tail || _mm256_movemask_ps(vbad) != 0;
    return gmax;
}

/* AVX2 twin of esl__first_eq_c. */
ESL_TARGET_AVX2 static int32_t esl__first_eq_avx2(const float *x, int32_t n, float m)
{
    __m256 vm = _mm256_set1_ps(m);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vm, _CMP_EQ_OQ));
        if (bits)
            return i + __builtin_ctz((unsigned)bits);
    }
    return i + esl__first_eq_c(x + i, n - i, m);
}

/* Returns the sum of the eight uint32 lanes of v as uint64. */
ESL_TARGET_AVX2 static uint64_t esl__sum_lanes_avx2(__m256i v)
{
    uint32_t lanes[8];
    uint64_t z = 0;
    int j;
    _mm256_storeu_si256((__m256i *)lanes, v);
    for (j = 0; j < 8; j++)
        z += lanes[j];
    return z;
}

/* esl__q_of_t of the lanes of t0 and t1 into *q0 and *q1. The two vectors are interleaved
 * step by step: one exp2 chain is about 50 cycles of latency, and with two independent
 * chains in program order the out-of-order core keeps its pipes busy (about 15% faster). */
ESL_TARGET_AVX2 static void esl__q16_avx2(__m256 t0, __m256 t1, __m256i *q0, __m256i *q1)
{
    const __m256 vclamp = _mm256_set1_ps(ESL_T_CLAMP), vone = _mm256_set1_ps(1.0f);
    const __m256 vmagic = _mm256_set1_ps(ESL_ROUND_MAGIC_F);
    const __m256 p1 = _mm256_set1_ps(ESL_P1), p2 = _mm256_set1_ps(ESL_P2);
    const __m256 p3 = _mm256_set1_ps(ESL_P3), p4 = _mm256_set1_ps(ESL_P4);
    const __m256 p5 = _mm256_set1_ps(ESL_P5);
    /* (k + 30) << 23 == (bits(t + magic) << 23) + ((30 - bits(magic)) << 23) mod 2^32 */
    const __m256i vexp = _mm256_set1_epi32((int32_t)((30u - 0x4B400000u) << 23));
    const __m256i vqmax = _mm256_set1_epi32((int)ESL_Q_ONE);
    __m256 m0, m1, f0, f1, h0, h1;
    __m256i b0, b1;
    t0 = _mm256_max_ps(t0, vclamp);
    t1 = _mm256_max_ps(t1, vclamp);
    m0 = _mm256_add_ps(t0, vmagic);
    m1 = _mm256_add_ps(t1, vmagic);
    f0 = _mm256_sub_ps(t0, _mm256_sub_ps(m0, vmagic));
    f1 = _mm256_sub_ps(t1, _mm256_sub_ps(m1, vmagic));
    h0 = _mm256_add_ps(_mm256_mul_ps(p5, f0), p4);
    h1 = _mm256_add_ps(_mm256_mul_ps(p5, f1), p4);
    h0 = _mm256_add_ps(_mm256_mul_ps(h0, f0), p3);
    h1 = _mm256_add_ps(_mm256_mul_ps(h1, f1), p3);
    h0 = _mm256_add_ps(_mm256_mul_ps(h0, f0), p2);
    h1 = _mm256_add_ps(_mm256_mul_ps(h1, f1), p2);
    h0 = _mm256_add_ps(_mm256_mul_ps(h0, f0), p1);
    h1 = _mm256_add_ps(_mm256_mul_ps(h1, f1), p1);
    h0 = _mm256_add_ps(_mm256_mul_ps(h0, f0), vone);
    h1 = _mm256_add_ps(_mm256_mul_ps(h1, f1), vone);
    b0 = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(m0), 23), vexp);
    b1 = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(m1), 23), vexp);
    b0 = _mm256_add_epi32(_mm256_castps_si256(h0), b0);
    b1 = _mm256_add_epi32(_mm256_castps_si256(h1), b1);
    /* MXCSR default rounding: nearest-even; lanes above 2^31 become 2^31, then 2^30 */
    *q0 = _mm256_min_epu32(_mm256_cvtps_epi32(_mm256_castsi256_ps(b0)), vqmax);
    *q1 = _mm256_min_epu32(_mm256_cvtps_epi32(_mm256_castsi256_ps(b1)), vqmax);
}

/* AVX2 twin of esl__q_pass_c: bit-identical q and sum (no FMA, RNE conversion). */
ESL_TARGET_AVX2 static uint64_t esl__q_pass_avx2(const float *x, int32_t n, float m, float c,
                                                 uint32_t *q)
{
    const __m256 vm = _mm256_set1_ps(m), vc = _mm256_set1_ps(c);
    /* Exact sum in 64-bit lanes: lo accumulates each lane pair (2^32 h + l) mod 2^64, hi the
     * h parts, so the total h + l is lo - 2^32 hi + hi mod 2^64 (it is below 2^53). */
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
    uint64_t a[4], b[4], sl, sh;
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 t0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vc);
        __m256 t1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm), vc);
        __m256i q0, q1;
        esl__q16_avx2(t0, t1, &q0, &q1);
        _mm256_storeu_si256((__m256i *)(q + i), q0);
        _mm256_storeu_si256((__m256i *)(q + i + 8), q1);
        lo = _mm256_add_epi64(lo, _mm256_add_epi64(q0, q1));
        hi = _mm256_add_epi64(hi, _mm256_srli_epi64(q0, 32));
        hi = _mm256_add_epi64(hi, _mm256_srli_epi64(q1, 32));
    }
    _mm256_storeu_si256((__m256i *)a, lo);
    _mm256_storeu_si256((__m256i *)b, hi);
    sl = a[0] + a[1] + a[2] + a[3];
    sh = b[0] + b[1] + b[2] + b[3];
    return sl - (sh << 32) + sh + esl__q_pass_c(x + i, n - i, m, c, q + i);
}

/* AVX2 twin of esl__bulk_pass_c (same candidates, block sums and -1). */
ESL_TARGET_AVX2 static int32_t esl__bulk_pass_avx2(const float *x, int32_t n, float m,
                                                   float c2, int32_t *cand, int32_t cap,
                                                   uint64_t *bsum)
{
    const __m256 vm = _mm256_set1_ps(m), vc = _mm256_set1_ps(c2);
    const __m256 vtheta = _mm256_set1_ps(ESL_BULK_TS_THETA);
    const __m256 vmin = _mm256_set1_ps(ESL_BULK_TS_MIN);
    const __m256i vbias = _mm256_set1_epi32(ESL_BULK_BIAS);
    int32_t b0, k = 0, nb = 0;
    for (b0 = 0; b0 < n; b0 += ESL_BULK_BLOCK) {
        int32_t e = b0 + ESL_BULK_BLOCK < n ? b0 + ESL_BULK_BLOCK : n, i = b0;
        __m256i acc = _mm256_setzero_si256(); /* r < 2^19, 32 per lane: no overflow */
        uint64_t z;
        for (; i + 8 <= e; i += 8) {
            __m256 ts = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vc);
            __m256 hit = _mm256_cmp_ps(ts, vtheta, _CMP_GE_OQ);
            __m256i r = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_max_ps(ts, vmin)), vbias);
            unsigned bits = (unsigned)_mm256_movemask_ps(hit);
            r = _mm256_cvtps_epi32(_mm256_castsi256_ps(r)); /* MXCSR default: nearest-even */
            acc = _mm256_add_epi32(acc, _mm256_andnot_si256(_mm256_castps_si256(hit), r));
            while (bits) {
                if (k == cap)
                    return -1;
                cand[k++] = i + __builtin_ctz(bits);
                bits &= bits - 1;
            }
        }
        z = esl__sum_lanes_avx2(acc);
        for (; i < e; i++)
            if (esl__bulk_one((x[i] - m) * c2, i, cand, &k, cap, &z))
                return -1;
        bsum[nb++] = z;
    }
    return k;
}

/* AVX2 twin of esl__collect_ge_c. */
ESL_TARGET_AVX2 static int32_t esl__collect_ge_avx2(const float *x, int32_t n, float tau,
                                                    int32_t *out)
{
    __m256 vt = _mm256_set1_ps(tau);
    int32_t i = 0, k = 0;
    for (; i + 8 <= n; i += 8) {
        unsigned bits = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(x + i), vt, _CMP_GE_OQ));
        while (bits) {
            out[k++] = i + __builtin_ctz(bits);
            bits &= bits - 1;
        }
    }
    for (; i < n; i++)
        if (x[i] >= tau)
            out[k++] = i;
    return k;
}

/* AVX2 twin of esl__collect_band_c. */
ESL_TARGET_AVX2 static int32_t esl__collect_band_avx2(const uint32_t *q, int32_t n,
                                                      uint32_t lo, uint32_t hi, int32_t *out)
{
    /* q <= 2^30 and lo, hi <= 2^30 + 1, so signed 32-bit compares are exact. */
    const __m256i vlo = _mm256_set1_epi32((int32_t)lo - 1), vhi = _mm256_set1_epi32((int32_t)hi);
    int32_t i = 0, k = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + i));
        __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(v, vlo), _mm256_cmpgt_epi32(vhi, v));
        unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(in));
        while (bits) {
            out[k++] = i + __builtin_ctz(bits);
            bits &= bits - 1;
        }
    }
    for (; i < n; i++)
        if (q[i] >= lo && q[i] < hi)
            out[k++] = i;
    return k;
}

/* AVX2 twin of esl__sum_q_c. */
ESL_TARGET_AVX2 static uint64_t esl__sum_q_avx2(const uint32_t *q, int32_t n)
{
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    uint64_t lanes[4];
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + i));
        acc0 = _mm256_add_epi64(acc0, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(v)));
        acc1 = _mm256_add_epi64(acc1, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(v, 1)));
    }
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(acc0, acc1));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + esl__sum_q_c(q + i, n - i);
}

#endif /* ESL_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------ */
/* NEON (aarch64 baseline, ARMv8.0: no dot-product or other optional extensions).        */
#if ESL_HAVE_NEON

/* NEON twin of esl__scan_max_c (same contract and results). */
static float esl__scan_max_neon(const float *x, int32_t n, int32_t block, float *bmax,
                                int *bad)
{
    uint32x4_t vbad = vdupq_n_u32(0);
    float gmax = -INFINITY;
    int32_t b0, nb = 0;
    int nan_tail = 0;
    for (b0 = 0; b0 < n; b0 += block) {
        int32_t e = b0 + block < n ? b0 + block : n;
        int32_t i = b0;
        float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0;
        float m;
        for (; i + 8 <= e; i += 8) {
            float32x4_t a = vld1q_f32(x + i), b = vld1q_f32(x + i + 4);
            /* maxNM ignores NaN; the self-compare mask below reports it. */
            m0 = vmaxnmq_f32(m0, a);
            m1 = vmaxnmq_f32(m1, b);
            vbad = vorrq_u32(vbad, vmvnq_u32(vceqq_f32(a, a)));
            vbad = vorrq_u32(vbad, vmvnq_u32(vceqq_f32(b, b)));
        }
        m = vmaxvq_f32(vmaxnmq_f32(m0, m1));
        for (; i < e; i++) {
            float v = x[i];
            nan_tail |= v != v;
            m = v > m ? v : m;
        }
        if (bmax)
            bmax[nb++] = m;
        gmax = m > gmax ? m : gmax;
    }
    *bad = nan_tail || vmaxvq_u32(vbad) != 0;
    return gmax;
}

/* NEON twin of esl__first_eq_c. */
static int32_t esl__first_eq_neon(const float *x, int32_t n, float m)
{
    float32x4_t vm = vdupq_n_f32(m);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        if (vmaxvq_u32(vceqq_f32(vld1q_f32(x + i), vm)) != 0)
            break;
    return i + esl__first_eq_c(x + i, n - i, m);
}

/* esl__q_of_t of the lanes of t0 and t1 into *q0 and *q1, interleaved step by step like
 * esl__q16_avx2 (two independent exp2 chains for the out-of-order core). */
static void esl__q8_neon(float32x4_t t0, float32x4_t t1, uint32x4_t *q0, uint32x4_t *q1)
{
    const float32x4_t vclamp = vdupq_n_f32(ESL_T_CLAMP), vone = vdupq_n_f32(1.0f);
    const float32x4_t vmagic = vdupq_n_f32(ESL_ROUND_MAGIC_F);
    const float32x4_t p1 = vdupq_n_f32(ESL_P1), p2 = vdupq_n_f32(ESL_P2);
    const float32x4_t p3 = vdupq_n_f32(ESL_P3), p4 = vdupq_n_f32(ESL_P4);
    const float32x4_t p5 = vdupq_n_f32(ESL_P5);
    /* (k + 30) << 23 == (bits(t + magic) << 23) + ((30 - bits(magic)) << 23) mod 2^32 */
    const uint32x4_t vexp = vdupq_n_u32((30u - 0x4B400000u) << 23);
    const uint32x4_t vqmax = vdupq_n_u32(ESL_Q_ONE);
    float32x4_t m0, m1, f0, f1, h0, h1;
    uint32x4_t b0, b1;
    t0 = vmaxq_f32(t0, vclamp);
    t1 = vmaxq_f32(t1, vclamp);
    m0 = vaddq_f32(t0, vmagic);
    m1 = vaddq_f32(t1, vmagic);
    f0 = vsubq_f32(t0, vsubq_f32(m0, vmagic));
    f1 = vsubq_f32(t1, vsubq_f32(m1, vmagic));
    h0 = vaddq_f32(vmulq_f32(p5, f0), p4);
    h1 = vaddq_f32(vmulq_f32(p5, f1), p4);
    h0 = vaddq_f32(vmulq_f32(h0, f0), p3);
    h1 = vaddq_f32(vmulq_f32(h1, f1), p3);
    h0 = vaddq_f32(vmulq_f32(h0, f0), p2);
    h1 = vaddq_f32(vmulq_f32(h1, f1), p2);
    h0 = vaddq_f32(vmulq_f32(h0, f0), p1);
    h1 = vaddq_f32(vmulq_f32(h1, f1), p1);
    h0 = vaddq_f32(vmulq_f32(h0, f0), vone);
    h1 = vaddq_f32(vmulq_f32(h1, f1), vone);
    b0 = vaddq_u32(vshlq_n_u32(vreinterpretq_u32_f32(m0), 23), vexp);
    b1 = vaddq_u32(vshlq_n_u32(vreinterpretq_u32_f32(m1), 23), vexp);
    b0 = vaddq_u32(vreinterpretq_u32_f32(h0), b0);
    b1 = vaddq_u32(vreinterpretq_u32_f32(h1), b1);
    /* nearest-even conversion; lanes above 2^31 saturate, then clamp to 2^30 */
    *q0 = vminq_u32(vreinterpretq_u32_s32(vcvtnq_s32_f32(vreinterpretq_f32_u32(b0))), vqmax);
    *q1 = vminq_u32(vreinterpretq_u32_s32(vcvtnq_s32_f32(vreinterpretq_f32_u32(b1))), vqmax);
}

/* NEON twin of esl__q_pass_c: bit-identical q and sum (no FMA, RNE conversion). */
static uint64_t esl__q_pass_neon(const float *x, int32_t n, float m, float c, uint32_t *q)
{
    const float32x4_t vm = vdupq_n_f32(m), vc = vdupq_n_f32(c);
    uint64x2_t acc = vdupq_n_u64(0);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t t0 = vmulq_f32(vsubq_f32(vld1q_f32(x + i), vm), vc);
        float32x4_t t1 = vmulq_f32(vsubq_f32(vld1q_f32(x + i + 4), vm), vc);
        uint32x4_t q0, q1;
        esl__q8_neon(t0, t1, &q0, &q1);
        vst1q_u32(q + i, q0);
        vst1q_u32(q + i + 4, q1);
        acc = vpadalq_u32(acc, q0);
        acc = vpadalq_u32(acc, q1);
    }
    return vgetq_lane_u64(acc, 0) + vgetq_lane_u64(acc, 1) +
           esl__q_pass_c(x + i, n - i, m, c, q + i);
}

/* NEON twin of esl__bulk_pass_c (same candidates, block sums and -1). */
static int32_t esl__bulk_pass_neon(const float *x, int32_t n, float m, float c2, int32_t *cand,
                                   int32_t cap, uint64_t *bsum)
{
    const float32x4_t vm = vdupq_n_f32(m), vc = vdupq_n_f32(c2);
    const float32x4_t vtheta = vdupq_n_f32(ESL_BULK_TS_THETA);
    const float32x4_t vmin = vdupq_n_f32(ESL_BULK_TS_MIN);
    const int32x4_t vbias = vdupq_n_s32(ESL_BULK_BIAS);
    int32_t b0, k = 0, nb = 0, j;
    for (b0 = 0; b0 < n; b0 += ESL_BULK_BLOCK) {
        int32_t e = b0 + ESL_BULK_BLOCK < n ? b0 + ESL_BULK_BLOCK : n, i = b0;
        uint32x4_t acc = vdupq_n_u32(0); /* r < 2^19, 64 per lane: no overflow */
        uint64_t z;
        for (; i + 4 <= e; i += 4) {
            float32x4_t ts = vmulq_f32(vsubq_f32(vld1q_f32(x + i), vm), vc);
            uint32x4_t hit = vcgeq_f32(ts, vtheta);
            int32x4_t r = vaddq_s32(vcvtnq_s32_f32(vmaxq_f32(ts, vmin)), vbias);
            r = vcvtnq_s32_f32(vreinterpretq_f32_s32(r));
            acc = vaddq_u32(acc, vbicq_u32(vreinterpretq_u32_s32(r), hit));
            if (vmaxvq_u32(hit) == 0)
                continue;
            for (j = i; j < i + 4; j++) /* same arithmetic as the lanes, so the same test */
                if ((x[j] - m) * c2 >= ESL_BULK_TS_THETA) {
                    if (k == cap)
                        return -1;
                    cand[k++] = j;
                }
        }
        z = vaddvq_u32(acc);
        for (; i < e; i++)
            if (esl__bulk_one((x[i] - m) * c2, i, cand, &k, cap, &z))
                return -1;
        bsum[nb++] = z;
    }
    return k;
}

/* NEON twin of esl__collect_ge_c. */
static int32_t esl__collect_ge_neon(const float *x, int32_t n, float tau, int32_t *out)
{
    float32x4_t vt = vdupq_n_f32(tau);
    int32_t i = 0, k = 0, j;
    for (; i + 4 <= n; i += 4) {
        if (vmaxvq_u32(vcgeq_f32(vld1q_f32(x + i), vt)) == 0)
            continue;
        for (j = i; j < i + 4; j++)
            if (x[j] >= tau)
                out[k++] = j;
    }
    for (; i < n; i++)
        if (x[i] >= tau)
            out[k++] = i;
    return k;
}

/* NEON twin of esl__collect_band_c. */
static int32_t esl__collect_band_neon(const uint32_t *q, int32_t n, uint32_t lo, uint32_t hi,
                                      int32_t *out)
{
    uint32x4_t vlo = vdupq_n_u32(lo), vhi = vdupq_n_u32(hi);
    int32_t i = 0, k = 0, j;
    for (; i + 4 <= n; i += 4) {
        uint32x4_t v = vld1q_u32(q + i);
        if (vmaxvq_u32(vandq_u32(vcgeq_u32(v, vlo), vcltq_u32(v, vhi))) == 0)
            continue;
        for (j = i; j < i + 4; j++)
            if (q[j] >= lo && q[j] < hi)
                out[k++] = j;
    }
    for (; i < n; i++)
        if (q[i] >= lo && q[i] < hi)
            out[k++] = i;
    return k;
}

/* NEON twin of esl__sum_q_c. */
static uint64_t esl__sum_q_neon(const uint32_t *q, int32_t n)
{
    uint64x2_t acc = vdupq_n_u64(0);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        acc = vpadalq_u32(acc, vld1q_u32(q + i));
    return vgetq_lane_u64(acc, 0) + vgetq_lane_u64(acc, 1) + esl__sum_q_c(q + i, n - i);
}

#endif /* ESL_HAVE_NEON */

/* ------------------------------------------------------------------------------------ */
/* Dispatch: pick the implementation for the SIMD level in use at call time.            */

/* The dispatchers below call the AVX2/NEON twin when esl__simd() says so. */
static float esl__scan_max(const float *x, int32_t n, int32_t block, float *bmax, int *bad)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__scan_max_avx2(x, n, block, bmax, bad);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__scan_max_neon(x, n, block, bmax, bad);
#endif
    return esl__scan_max_c(x, n, block, bmax, bad);
}

static int32_t esl__first_eq(const float *x, int32_t n, float m)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__first_eq_avx2(x, n, m);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__first_eq_neon(x, n, m);
#endif
    return esl__first_eq_c(x, n, m);
}

static uint64_t esl__q_pass(const float *x, int32_t n, float m, float c, uint32_t *q)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__q_pass_avx2(x, n, m, c, q);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__q_pass_neon(x, n, m, c, q);
#endif
    return esl__q_pass_c(x, n, m, c, q);
}

static int32_t esl__bulk_pass(const float *x, int32_t n, float m, float c2, int32_t *cand,
                              int32_t cap, uint64_t *bsum)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__bulk_pass_avx2(x, n, m, c2, cand, cap, bsum);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__bulk_pass_neon(x, n, m, c2, cand, cap, bsum);
#endif
    return esl__bulk_pass_c(x, n, m, c2, cand, cap, bsum);
}

static int32_t esl__collect_ge(const float *x, int32_t n, float tau, int32_t *out)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__collect_ge_avx2(x, n, tau, out);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__collect_ge_neon(x, n, tau, out);
#endif
    return esl__collect_ge_c(x, n, tau, out);
}

static int32_t esl__collect_band(const uint32_t *q, int32_t n, uint32_t lo, uint32_t hi,
                                 int32_t *out)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__collect_band_avx2(q, n, lo, hi, out);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__collect_band_neon(q, n, lo, hi, out);
#endif
    return esl__collect_band_c(q, n, lo, hi, out);
}

static uint64_t esl__sum_q(const uint32_t *q, int32_t n)
{
#if ESL_HAVE_AVX2_CODE
    if (esl__simd())
        return esl__sum_q_avx2(q, n);
#elif ESL_HAVE_NEON
    if (esl__simd())
        return esl__sum_q_neon(q, n);
#endif
    return esl__sum_q_c(q, n);
}

/* ------------------------------------------------------------------------------------ */
/* Selection and sorting over small candidate sets (scalar; sizes are usually < 1000).   */

#define ESL_SWAP64(a, b)                                                                   \
    do {                                                                                   \
        uint64_t t_ = (a);                                                                 \
        (a) = (b);                                                                         \
        (b) = t_;                                                                          \
    } while (0)

/* Returns the median of three keys. */
static uint64_t esl__median3(uint64_t a, uint64_t b, uint64_t c)
{
    if (a > b)
        ESL_SWAP64(a, b);
    if (b > c)
        b = c;
    return a > b ? a : b;
}

/* Key of token id for (q desc, id asc) ranking: larger key = ranked earlier. */
static uint64_t esl__q_key(const uint32_t *q, int32_t id)
{
    return ((uint64_t)q[id] << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)id);
}

/* Moves the `want` largest of the unique keys a[0..n) to a[0..want), in any order. */
static void esl__select_top(uint64_t *a, int32_t n, int32_t want)
{
    int32_t lo = 0, hi = n;
    while (lo < want && want < hi) {
        uint64_t pivot = esl__median3(a[lo], a[lo + (hi - lo) / 2], a[hi - 1]);
        int32_t i = lo, j;
        for (j = lo; j < hi; j++)
            if (a[j] > pivot) {
                ESL_SWAP64(a[i], a[j]);
                i++;
            }
        if (i >= want) {
            hi = i;
            continue;
        }
        for (j = i; a[j] != pivot; j++) {
        }
        ESL_SWAP64(a[i], a[j]);
        lo = i + 1;
    }
}

/*
 * Top-p boundary. a[0..n) are unique keys whose mass is key >> 32; `acc` is the mass ranked
 * before all of them. Returns the key of the first element e in descending key order with
 * acc + (mass of keys > e) + mass(e) >= target, i.e. the last token the nucleus keeps
 * (the caller guarantees acc + total >= target). Permutes a.
 */
static uint64_t esl__select_mass(uint64_t *a, int32_t n, uint64_t acc, double target)
{
    int32_t lo = 0, hi = n, i, j;
    while (hi - lo > 24) {
        uint64_t pivot = esl__median3(a[lo], a[lo + (hi - lo) / 2], a[hi - 1]);
        uint64_t ml = 0;
        i = lo;
        for (j = lo; j < hi; j++)
            if (a[j] > pivot) {
                ml += a[j] >> 32;
                ESL_SWAP64(a[i], a[j]);
                i++;
            }
        if ((double)(acc + ml) >= target) {
            hi = i;
            continue;
        }
        if ((double)(acc + ml + (pivot >> 32)) >= target)
            return pivot;
        acc += ml + (pivot >> 32);
        for (j = i; a[j] != pivot; j++) {
        }
        ESL_SWAP64(a[i], a[j]);
        lo = i + 1;
    }
    for (i = lo + 1; i < hi; i++) { /* insertion sort, descending */
        uint64_t v = a[i];
        for (j = i; j > lo && a[j - 1] < v; j--)
            a[j] = a[j - 1];
        a[j] = v;
    }
    for (i = lo; i < hi; i++) {
        acc += a[i] >> 32;
        if ((double)acc >= target)
            return a[i];
    }
    return hi > lo ? a[hi - 1] : (lo > 0 ? a[lo - 1] : 0);
}

/* Sorts token ids a[0..n) ascending (ids < 2^22); tmp has room for n ids. */
static void esl__sort_ids(int32_t *a, int32_t n, int32_t *tmp)
{
    uint32_t cnt[2048];
    int32_t i, j, pass;
    if (n <= 48) {
        for (i = 1; i < n; i++) {
            int32_t v = a[i];
            for (j = i; j > 0 && a[j - 1] > v; j--)
                a[j] = a[j - 1];
            a[j] = v;
        }
        return;
    }
    for (pass = 0; pass < 2; pass++) { /* LSD radix, 11 bits per pass */
        int32_t *src = pass ? tmp : a, *dst = pass ? a : tmp;
        int shift = 11 * pass;
        uint32_t sum = 0;
        memset(cnt, 0, sizeof cnt);
        for (i = 0; i < n; i++)
            cnt[((uint32_t)src[i] >> shift) & 2047u]++;
        for (i = 0; i < 2048; i++) {
            uint32_t c = cnt[i];
            cnt[i] = sum;
            sum += c;
        }
        for (i = 0; i < n; i++)
            dst[cnt[((uint32_t)src[i] >> shift) & 2047u]++] = src[i];
    }
}

/* Returns the first id of ids[0..n) (ascending) whose running sum of q exceeds r. */
static int32_t esl__draw_list(const uint32_t *q, const int32_t *ids, int32_t n, uint64_t r)
{
    uint64_t acc = 0;
    int32_t i;
    for (i = 0; i < n; i++) {
        acc += q[ids[i]];
        if (acc > r)
            return ids[i];
    }
    return ids[n - 1];
}

/* Returns the first id in [0, n) whose running sum of q exceeds r (block sums first). */
static int32_t esl__draw_dense(const uint32_t *q, int32_t n, uint64_t r)
{
    uint64_t acc = 0;
    int32_t i = 0, j;
    for (; i < n; i += 512) {
        int32_t len = n - i < 512 ? n - i : 512;
        uint64_t bs = esl__sum_q(q + i, len);
        if (acc + bs > r) {
            for (j = i; j < i + len; j++) {
                acc += q[j];
                if (acc > r)
                    return j;
            }
        }
        acc += bs;
    }
    return n - 1;
}

/* ------------------------------------------------------------------------------------ */
/* Object lifetime.                                                                       */

/* Contract: see edgeslm_kernel.h. */
int32_t esl_sampler_init(int32_t vocab_size, esl_sampler **out)
{
    esl_sampler *s;
    size_t v = (size_t)vocab_size;
    if (!out)
        return ESL_ERR_ARG;
    *out = NULL;
    if (vocab_size < 1 || vocab_size > ESL_MAX_VOCAB)
        return ESL_ERR_ARG;
    s = (esl_sampler *)calloc(1, sizeof *s);
    if (!s)
        return ESL_ERR_NOMEM;
    s->vocab = vocab_size;
    s->n_words = (vocab_size + 31) / 32;
    s->q = (uint32_t *)calloc(v, sizeof *s->q);
    s->list = (int32_t *)calloc(v, sizeof *s->list);
    s->kept = (int32_t *)calloc(v, sizeof *s->kept);
    s->tmp = (int32_t *)calloc(v, sizeof *s->tmp);
    s->keys = (uint64_t *)calloc(v, sizeof *s->keys);
    s->counts = (uint32_t *)calloc(v, sizeof *s->counts);
    s->bmax = (float *)calloc(v / 8 + 2, sizeof *s->bmax);
    s->cap = vocab_size / 16 + 64;
    s->xc = (float *)calloc((size_t)s->cap, sizeof *s->xc);
    s->qc = (uint32_t *)calloc((size_t)s->cap, sizeof *s->qc);
    s->bsum = (uint64_t *)calloc(v / ESL_BULK_BLOCK + 1, sizeof *s->bsum);
    if (!s->q || !s->list || !s->kept || !s->tmp || !s->keys || !s->counts || !s->bmax ||
        !s->xc || !s->qc || !s->bsum) {
        esl_sampler_free(s);
        return ESL_ERR_NOMEM;
    }
    (void)esl__simd(); /* detect once, outside the per-token path */
    *out = s;
    return ESL_OK;
}

/* Contract: see edgeslm_kernel.h. */
void esl_sampler_free(esl_sampler *s)
{
    if (!s)
        return;
    free(s->q);
    free(s->list);
    free(s->kept);
    free(s->tmp);
    free(s->keys);
    free(s->counts);
    free(s->bmax);
    free(s->xc);
    free(s->qc);
    free(s->bsum);
    free(s);
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_sampler_vocab(const esl_sampler *s) { return s ? s->vocab : 0; }

/* ------------------------------------------------------------------------------------ */
/* The sampling call.                                                                     */

/* Returns ESL_OK when every field of p is in range (see esl_sampler_params). */
static int32_t esl__check_params(const esl_sampler_params *p)
{
    if (!(p->temperature >= 0.0) || !(p->temperature <= DBL_MAX))
        return ESL_ERR_ARG;
    if (p->temperature > 0.0) {
        double c = ESL_LOG2E / p->temperature;
        if (!(c <= FLT_MAX) || (float)c <= 0.0f)
            return ESL_ERR_ARG;
    }
    if (!(p->top_p > 0.0 && p->top_p <= 1.0) || !(p->min_p >= 0.0 && p->min_p <= 1.0))
        return ESL_ERR_ARG;
    if (!(p->repetition_penalty > 0.0 && p->repetition_penalty <= FLT_MAX) ||
        (float)p->repetition_penalty <= 0.0f)
        return ESL_ERR_ARG;
    if (!(fabs(p->frequency_penalty) <= DBL_MAX) || !(fabs(p->presence_penalty) <= DBL_MAX))
        return ESL_ERR_ARG;
    if (p->top_k < 0 || p->penalty_window < 0)
        return ESL_ERR_ARG;
    return ESL_OK;
}

/* Sets disallowed logits to -inf. */
static void esl__apply_mask(float *x, int32_t vocab, const uint32_t *mask, int32_t n_words)
{
    int32_t w, b;
    for (w = 0; w < n_words; w++) {
        uint32_t word = mask[w];
        int32_t base = w * 32, lim = vocab - base < 32 ? vocab - base : 32;
        if (word == 0xFFFFFFFFu)
            continue;
        for (b = 0; b < lim; b++)
            if (!((word >> b) & 1u))
                x[base + b] = -INFINITY;
    }
}

/* Applies repetition, frequency and presence penalties for recent[0..n) (ids checked). */
static void esl__apply_penalties(esl_sampler *s, const esl_sampler_params *p, float *x,
                                 const int32_t *recent, int32_t n)
{
    float rep = (float)p->repetition_penalty;
    int32_t i;
    for (i = 0; i < n; i++)
        s->counts[recent[i]]++;
    for (i = 0; i < n; i++) {
        int32_t id = recent[i];
        uint32_t c = s->counts[id];
        float v;
        if (c == 0)
            continue; /* already applied */
        s->counts[id] = 0;
        v = x[id];
        if (p->repetition_penalty != 1.0)
            v = v > 0.0f ? v / rep : v * rep;
        if (p->frequency_penalty != 0.0 || p->presence_penalty != 0.0)
            v = v - (float)((double)c * p->frequency_penalty + p->presence_penalty);
        x[id] = v;
    }
}

/* Keeps the ids of list[0..n) whose key >= kt, sorts them, and draws one. */
static int32_t esl__finish(esl_sampler *s, int32_t n, uint64_t kt, uint64_t *rng)
{
    const uint32_t *q = s->q;
    uint64_t z = 0;
    int32_t i, nk = 0;
    for (i = 0; i < n; i++) {
        int32_t id = s->list[i];
        if (esl__q_key(q, id) >= kt) {
            s->kept[nk++] = id;
            z += q[id];
        }
    }
    esl__sort_ids(s->kept, nk, s->tmp);
    return esl__draw_list(q, s->kept, nk, esl__mulhi64(esl_rng_next(rng), z));
}

/* Returns ceil(min_p * 2^30): the smallest q that min-p keeps (0 when off). */
static uint32_t esl__q_min(double min_p)
{
    double thr = min_p * 1073741824.0;
    uint32_t qm = (uint32_t)thr;
    return (double)qm < thr ? qm + 1 : qm;
}

/* Top-k path: candidates are the top_k largest (logit, -id); n_bmax block maxima given. */
static int32_t esl__sample_topk(esl_sampler *s, const esl_sampler_params *p, const float *x,
                                float m, float c, int32_t n_blocks, uint64_t *rng)
{
    const int32_t k = p->top_k;
    uint32_t *q = s->q;
    uint64_t z = 0, kt = 0;
    uint32_t qmin = esl__q_min(p->min_p);
    float tau = -FLT_MAX; /* x >= -FLT_MAX <=> finite here */
    int32_t i, n;
    if (n_blocks > k) { /* k-th largest block maximum: >= k tokens reach it */
        for (i = 0; i < n_blocks; i++)
            s->keys[i] = ((uint64_t)esl__float_key(s->bmax[i]) << 32) | (uint64_t)i;
        esl__select_top(s->keys, n_blocks, k);
        for (i = 0; i < k; i++) {
            float b = s->bmax[(uint32_t)s->keys[i]];
            if (i == 0 || b < tau)
                tau = b;
        }
        if (tau < -FLT_MAX)
            tau = -FLT_MAX;
    }
    n = esl__collect_ge(x, s->vocab, tau, s->list);
    if (n > k) {
        for (i = 0; i < n; i++) {
            int32_t id = s->list[i];
            s->keys[i] = ((uint64_t)esl__float_key(x[id]) << 32) |
                         (uint64_t)(0xFFFFFFFFu - (uint32_t)id);
        }
        esl__select_top(s->keys, n, k);
        for (i = 0; i < k; i++)
            s->list[i] = (int32_t)(0xFFFFFFFFu - (uint32_t)s->keys[i]);
        n = k;
    }
    for (i = 0; i < n; i++) {
        int32_t id = s->list[i];
        float t = (x[id] - m) * c;
        q[id] = esl__q_of_t(t);
        z += q[id];
    }
    if (p->top_p < 1.0) {
        for (i = 0; i < n; i++)
            s->keys[i] = esl__q_key(q, s->list[i]);
        kt = esl__select_mass(s->keys, n, 0, p->top_p * (double)z);
    }
    if (kt < ((uint64_t)qmin << 32))
        kt = (uint64_t)qmin << 32;
    return esl__finish(s, n, kt, rng);
}

/* Bounds [*lo, *hi] on the sum of q over the bulk tokens of block b of a vocab-token call,
 * from r = bsum[b], the sum of their esl__bulk_r: the per-token bounds of ESL_BULK_* summed
 * (each token adds at most +-1 and each floor loses at most 1; the block length bounds the
 * number of bulk tokens). */
static void esl__block_bounds(const uint64_t *bsum, int32_t b, int32_t vocab, uint64_t *lo,
                              uint64_t *hi)
{
    uint64_t r = bsum[b], l = (r * ESL_BULK_LO_NUM) >> 16; /* r < 2^27: no overflow */
    uint64_t len = (uint64_t)(vocab - b * ESL_BULK_BLOCK);
    len = len < ESL_BULK_BLOCK ? len : ESL_BULK_BLOCK;
    *lo = l > 2 * len ? l - 2 * len : 0;
    *hi = r + (r >> 12) + len;
}

/*
 * Bound path of the dense case (no top-k). One pass splits the vocabulary: candidates
 * (t >= -12) get exact masses, the others (the bulk, each q <= 2^18) only integer bounds on
 * their sum, so Z is known to lie in [zlo, zhi]. Returns the token when every Z in that range
 * gives the same one, else -1 and the exact path must run. Then *ns is the number of strong
 * candidates (q > 2^18, i.e. every such token) left ascending in s->list[0..*ns) with their
 * masses in s->q and sum *qs, or -1 if the pass gave up (more than s->cap candidates). A
 * temperature-only call draws its PRNG output here: *u holds it and *have_u is 1.
 */
static int32_t esl__sample_bounded(esl_sampler *s, const esl_sampler_params *p, const float *x,
                                   float m, float c, uint64_t *rng, int32_t *ns, uint64_t *qs,
                                   uint64_t *u, int *have_u)
{
    const int32_t vocab = s->vocab, n_blocks = (vocab + ESL_BULK_BLOCK - 1) / ESL_BULK_BLOCK;
    uint32_t *q = s->q;
    uint32_t qmin = esl__q_min(p->min_p);
    uint64_t zlo, zhi, lo, hi, sum = 0, kmin = (uint64_t)qmin << 32, klo = 0, khi = 0;
    int32_t n, i, b, k = 0;
    *ns = -1;
    n = esl__bulk_pass(x, vocab, m, c * 8388608.0f, s->list, s->cap, s->bsum);
    if (n < 0)
        return -1;
    for (i = 0; i < n; i++)
        s->xc[i] = x[s->list[i]];
    zlo = zhi = esl__q_pass(s->xc, n, m, c, s->qc);
    for (i = 0; i < n; i++)
        q[s->list[i]] = s->qc[i];
    for (b = 0; b < n_blocks; b++) {
        esl__block_bounds(s->bsum, b, vocab, &lo, &hi);
        zlo += lo;
        zhi += hi;
    }
    if (p->top_p >= 1.0 && qmin == 0) {
        /* Draw: r = mulhi(u, Z) lies in [rlo, rhi]; the token is decided if that range falls
         * inside one candidate's interval [before, before + q) for every possible `before`
         * (exact candidate masses, bulk bounds of the blocks before, 0..hi of its own). */
        uint64_t rlo, rhi, plo = 0, phi = 0;
        *u = esl_rng_next(rng);
        *have_u = 1;
        rlo = esl__mulhi64(*u, zlo);
        rhi = esl__mulhi64(*u, zhi);
        for (i = 0, b = 0; i < n && plo <= rhi; i++) {
            int32_t id = s->list[i];
            for (; b < id / ESL_BULK_BLOCK; b++) {
                esl__block_bounds(s->bsum, b, vocab, &lo, &hi);
                plo += lo;
                phi += hi;
            }
            esl__block_bounds(s->bsum, b, vocab, &lo, &hi);
            if (phi + hi <= rlo && rhi < plo + q[id])
                return id;
            plo += q[id];
            phi += q[id];
        }
        return -1;
    }
    /* Top-p and min-p: every token ranked before a strong one is strong, so the nucleus is
     * found among them as long as its boundary is; Z only enters through top_p * Z. */
    for (i = 0; i < n; i++) {
        int32_t id = s->list[i];
        if (q[id] > ESL_BULK_QMAX) {
            s->list[k] = id;
            s->keys[k++] = esl__q_key(q, id);
            sum += q[id];
        }
    }
    *ns = k;
    *qs = sum;
    if (p->top_p < 1.0) { /* 0 = the boundary lies below every strong token */
        double tlo = p->top_p * (double)zlo, thi = p->top_p * (double)zhi;
        klo = (double)sum >= tlo ? esl__select_mass(s->keys, k, 0, tlo) : 0;
        khi = (double)sum >= thi ? esl__select_mass(s->keys, k, 0, thi) : 0;
    }
    klo = klo > kmin ? klo : kmin;
    khi = khi > kmin ? khi : kmin;
    if (klo != khi || (klo >> 32) <= ESL_BULK_QMAX)
        return -1; /* depends on where Z lies, or the cut reaches the bulk */
    return esl__finish(s, k, klo, rng);
}

/*
 * Exact dense path: q over the whole vocabulary, top-p via bands of q. ns, qs, u and have_u
 * are what esl__sample_bounded left (ns < 0: nothing to reuse; have_u: the PRNG output of a
 * temperature-only call was already drawn). With ns > 0, s->list[0..ns) holds every token
 * with q > 2^18, so the bands start below 2^18.
 */
static int32_t esl__sample_exact(esl_sampler *s, const esl_sampler_params *p, const float *x,
                                 float m, float c, uint64_t *rng, int32_t ns, uint64_t qs,
                                 uint64_t u, int have_u)
{
    static const uint32_t stages[] = {1u << 26, 1u << 22, 1u << 18, 1u << 14,
                                      1u << 10, 1u << 6,  1u};
    const int32_t vocab = s->vocab, n_stages = (int32_t)(sizeof stages / sizeof stages[0]);
    uint32_t *q = s->q;
    uint32_t qmin = esl__q_min(p->min_p), hi = ESL_Q_ONE + 1;
    uint64_t z = esl__q_pass(x, vocab, m, c, q), kt, acc = 0;
    int32_t n = 0, st = 0, i;
    double target;
    if (p->top_p >= 1.0 && qmin == 0)
        return esl__draw_dense(q, vocab, esl__mulhi64(have_u ? u : esl_rng_next(rng), z));
    if (p->top_p >= 1.0)
        return esl__finish(s, esl__collect_band(q, vocab, qmin, hi, s->list),
                           (uint64_t)qmin << 32, rng);
    target = p->top_p * (double)z;
    kt = (uint64_t)1 << 32; /* unreachable fallback: every token with q > 0 */
    if (ns > 0) {
        n = ns;
        if ((double)qs >= target) {
            for (i = 0; i < ns; i++)
                s->keys[i] = esl__q_key(q, s->list[i]);
            kt = esl__select_mass(s->keys, ns, 0, target);
            st = n_stages;
        } else {
            acc = qs;
            hi = ESL_BULK_QMAX + 1;
            st = 3; /* next band: [2^14, 2^18] */
        }
    }
    for (; st < n_stages; st++) {
        uint32_t lo = stages[st] > qmin ? stages[st] : qmin;
        int32_t n0 = n;
        uint64_t band = 0;
        if (lo < hi)
            n += esl__collect_band(q, vocab, lo, hi, s->list + n);
        for (i = n0; i < n; i++)
            band += q[s->list[i]];
        if ((double)(acc + band) >= target) {
            for (i = n0; i < n; i++)
                s->keys[i - n0] = esl__q_key(q, s->list[i]);
            kt = esl__select_mass(s->keys, n - n0, acc, target);
            break;
        }
        acc += band;
        hi = lo;
        if (lo == qmin) { /* min-p cuts above the nucleus boundary */
            kt = (uint64_t)qmin << 32;
            break;
        }
    }
    if (kt < ((uint64_t)qmin << 32))
        kt = (uint64_t)qmin << 32;
    return esl__finish(s, n, kt, rng);
}

/* Dense path (no top-k): the bound path, and the exact path when it cannot decide. */
static int32_t esl__sample_dense(esl_sampler *s, const esl_sampler_params *p, const float *x,
                                 float m, float c, uint64_t *rng)
{
    uint64_t u = 0, qs = 0;
    int32_t ns = -1, tok;
    int have_u = 0;
    if (c <= 1e30f) { /* c * 2^23 is finite */
        tok = esl__sample_bounded(s, p, x, m, c, rng, &ns, &qs, &u, &have_u);
        if (tok >= 0)
            return tok;
    }
    return esl__sample_exact(s, p, x, m, c, rng, ns, qs, u, have_u);
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_sampler_sample(esl_sampler *s, const esl_sampler_params *params, float *logits,
                           const uint32_t *mask, const int32_t *bias_ids,
                           const float *bias_values, int32_t n_bias, const int32_t *recent,
                           int32_t n_recent, uint64_t rng[4], int32_t *out_token)
{
    const esl_sampler_params *p = params;
    int32_t vocab, i, w0, block, n_blocks = 0, st;
    int bad = 0;
    float m;
    if (!out_token)
        return ESL_ERR_ARG;
    *out_token = -1;
    if (!s || !p || !logits || !rng || n_bias < 0 || n_recent < 0 ||
        (n_bias > 0 && (!bias_ids || !bias_values)) || (n_recent > 0 && !recent))
        return ESL_ERR_ARG;
    st = esl__check_params(p);
    if (st != ESL_OK)
        return st;
    vocab = s->vocab;
    w0 = (p->penalty_window > 0 && p->penalty_window < n_recent) ? n_recent - p->penalty_window
                                                                   : 0;
    for (i = 0; i < n_bias; i++)
        if (bias_ids[i] < 0 || bias_ids[i] >= vocab)
            return ESL_ERR_TOKEN_RANGE;
    for (i = w0; i < n_recent; i++)
        if (recent[i] < 0 || recent[i] >= vocab)
            return ESL_ERR_TOKEN_RANGE;

    if (mask)
        esl__apply_mask(logits, vocab, mask, s->n_words);
    for (i = 0; i < n_bias; i++)
        logits[bias_ids[i]] += bias_values[i];
    if (p->repetition_penalty != 1.0 || p->frequency_penalty != 0.0 ||
        p->presence_penalty != 0.0)
        esl__apply_penalties(s, p, logits, recent + w0, n_recent - w0);

    block = vocab;
    if (p->temperature > 0.0 && p->top_k > 0 && p->top_k < vocab) {
        /* about 4 * top_k blocks, each a multiple of 8 floats */
        int64_t want = (int64_t)p->top_k * 4;
        block = (int32_t)(((int64_t)vocab + want - 1) / want);
        block = (block + 7) & ~7;
        n_blocks = (vocab + block - 1) / block;
    }
    m = esl__scan_max(logits, vocab, block, n_blocks ? s->bmax : NULL, &bad);
    if (bad || m == INFINITY)
        return ESL_ERR_NONFINITE;
    if (m == -INFINITY)
        return ESL_ERR_ALL_MASKED;
    if (p->temperature == 0.0) {
        *out_token = esl__first_eq(logits, vocab, m);
        return ESL_OK;
    }
    {
        float c = (float)(ESL_LOG2E / p->temperature);
        if (n_blocks)
            *out_token = esl__sample_topk(s, p, logits, m, c, n_blocks, rng);
        else
            *out_token = esl__sample_dense(s, p, logits, m, c, rng);
    }
    return ESL_OK;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_fixed_softmax(const float *logits, int32_t n, double temperature, uint32_t *q,
                          uint64_t *z)
{
    double c;
    float m;
    int bad = 0;
    if (!logits || !q || !z || n < 1 || n > ESL_MAX_VOCAB || !(temperature > 0.0))
        return ESL_ERR_ARG;
    c = ESL_LOG2E / temperature;
    if (!(c <= FLT_MAX) || (float)c <= 0.0f)
        return ESL_ERR_ARG;
    m = esl__scan_max(logits, n, n, NULL, &bad);
    if (bad || m == INFINITY)
        return ESL_ERR_NONFINITE;
    if (m == -INFINITY)
        return ESL_ERR_ALL_MASKED;
    *z = esl__q_pass(logits, n, m, (float)c, q);
    return ESL_OK;
}
