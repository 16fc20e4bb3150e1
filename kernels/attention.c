/*
 * attention.c - causal attention over the runtime's KV cache, for the decoder graphs.
 *
 * What onnxruntime's GroupQueryAttention does for edgeslm's graphs (batch 1, past and
 * present the same buffer), without its per-call overhead, which was an eighth of a
 * decode step on SmolLM2:
 *   qkv     [s][(n_heads + 2 * n_kv_heads) * head_dim]   the new tokens' projections
 *   cache   keys and values [n_kv_heads][max_seq][head_dim] each, float32 or IEEE
 *           half (kv_half: half the memory and the bytes a step reads; every product
 *           and sum is still float32, the halves converted exactly as they are read)
 *   out     [s][n_heads * head_dim]
 * The new tokens sit at positions total - s .. total - 1. With RoPE (rotate-half, as
 * Hugging Face's Llama), their queries and keys are rotated by the tables
 * cos/sin [max_seq][head_dim / 2]; the keys are stored rotated. Query i attends to
 * positions 0 .. total - s + i, query head h to kv head h / (n_heads / n_kv_heads),
 * scores scaled by `scale`, softmax in float with the maximum subtracted.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "attention.h"
#include "edgeslm_kernel.h"
#include "qmatmul.h"

#define UNROLL ESL_UNROLL

/* ---- small vector routines, one per ISA (x[n], n a multiple of 4) ----------------- */

/*
 * Each ISA's routines are written once over the cache's element type KT, with LOAD
 * turning KT values into float lanes (exact for halves: F16C, NEON's fcvtl, or
 * esl__half), so a float32 and a float16 cache run the same operations in the same
 * order on the same floats.
 */
static inline float float_of(float x) { return x; }

#if ESL_HAVE_AVX2_CODE
ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE __m256 load8f_avx2(const float *p)
{
    return _mm256_loadu_ps(p);
}

ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE __m256 load8h_avx2(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* x[n] to halves, rounded to nearest even by F16C: the bits of esl__half_from for
 * every float but NaN, whose payload F16C keeps (a group with a NaN is done by
 * esl__half_from, so a NaN becomes its canonical quiet NaN either way). */
ESL_TARGET_QMM_AVX2 static void to_half_avx2(uint16_t *h, const float *x, int64_t n)
{
    int64_t i = 0, j;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
            for (j = i; j < i + 8; j++)
                h[j] = esl__half_from(x[j]);
            continue;
        }
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++)
        h[i] = esl__half_from(x[i]);
}

/*
 * dot(a, b), y += a * x, and weighted_64: o = sum over t of (p[t] * inv) v[t] for
 * head_dim a multiple of 64, the output held in 8 registers per 64 dims instead of
 * memory (the same fused multiply-adds in the same order as axpy key after key, so
 * the same bits).
 */
#define ESL_DEFINE_AVX2_ROUTINES(SUFFIX, KT, LOAD8, SCALAR)                                  \
    ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE float dot_##SUFFIX(const float *a, const KT *b,  \
                                                          int64_t n)                       \
    {                                                                                      \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                     \
        __m128 s;                                                                          \
        float total;                                                                       \
        int64_t i = 0;                                                                     \
        for (; i + 16 <= n; i += 16) {                                                     \
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), LOAD8(b + i), acc0);            \
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), LOAD8(b + i + 8), acc1);    \
        }                                                                                  \
        for (; i + 8 <= n; i += 8)                                                         \
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), LOAD8(b + i), acc0);            \
        acc0 = _mm256_add_ps(acc0, acc1);                                                  \
        s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));      \
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                            \
        s = _mm_add_ss(s, _mm_movehdup_ps(s));                                             \
        total = _mm_cvtss_f32(s);                                                          \
        for (; i < n; i++)                                                                 \
            total += a[i] * SCALAR(b[i]);                                                  \
        return total;                                                                      \
    }                                                                                      \
    ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE void axpy_##SUFFIX(float *y, float a, const KT *x, \
                                                          int64_t n)                       \
    {                                                                                      \
        const __m256 va = _mm256_set1_ps(a);                                               \
        int64_t i = 0;                                                                     \
        for (; i + 8 <= n; i += 8)                                                         \
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, LOAD8(x + i), _mm256_loadu_ps(y + i))); \
        for (; i < n; i++)                                                                 \
            y[i] += a * SCALAR(x[i]);                                                      \
    }                                                                                      \
    ESL_TARGET_QMM_AVX2 static void weighted_64_##SUFFIX(float *o, const float *p, float inv, \
                                                         const KT *v, int64_t n, int64_t dim) \
    {                                                                                      \
        int64_t c, t;                                                                      \
        int j;                                                                             \
        for (c = 0; c < dim; c += 64) {                                                    \
            __m256 acc[8];                                                                 \
            ESL_UNROLL                                                                     \
            for (j = 0; j < 8; j++)                                                        \
                acc[j] = _mm256_setzero_ps();                                              \
            for (t = 0; t < n; t++) {                                                      \
                const __m256 w = _mm256_set1_ps(p[t] * inv);                               \
                const KT *vt = v + t * dim + c;                                            \
                ESL_UNROLL                                                                 \
                for (j = 0; j < 8; j++)                                                    \
                    acc[j] = _mm256_fmadd_ps(w, LOAD8(vt + 8 * j), acc[j]);                \
            }                                                                              \
            ESL_UNROLL                                                                     \
            for (j = 0; j < 8; j++)                                                        \
                _mm256_storeu_ps(o + c + 8 * j, acc[j]);                                   \
        }                                                                                  \
    }

ESL_DEFINE_AVX2_ROUTINES(avx2, float, load8f_avx2, float_of)
ESL_DEFINE_AVX2_ROUTINES(h_avx2, uint16_t, load8h_avx2, esl__half)

/*
 * exp(x) for x <= 0 in 8 lanes: 2^(x log2 e) split into an integer power, set in the
 * exponent bits, and a degree-6 polynomial of the fraction, fitted to 2^f on [0, 1)
 * (relative error about 1e-7 in float; x below -87 is taken as -87, about 1e-38).
 */
ESL_TARGET_QMM_AVX2 static __m256 exp_avx2(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 t, f, p;
    __m256i k;
    x = _mm256_max_ps(lo, x); /* NaN stays NaN (max_ps returns its second operand) */
    t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    f = _mm256_floor_ps(t);
    k = _mm256_cvtps_epi32(f);
    t = _mm256_sub_ps(t, f); /* in [0, 1) */
    p = _mm256_set1_ps(2.154066972e-4f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.248284004e-3f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(9.674549892e-3f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(5.548532072e-2f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.402294005e-1f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(6.931470282e-1f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f));
    k = _mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(k));
}

/* scores[t] = exp(scores[t] - max); returns their sum. */
ESL_TARGET_QMM_AVX2 static float softmax_exp_avx2(float *scores, int64_t n, float max)
{
    const __m256 vmax = _mm256_set1_ps(max);
    __m256 acc = _mm256_setzero_ps();
    float sum;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + i), vmax));
        _mm256_storeu_ps(scores + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    {
        float lanes[8];
        int j;
        _mm256_storeu_ps(lanes, acc);
        sum = 0.0f;
        for (j = 0; j < 8; j++)
            sum += lanes[j];
    }
    for (; i < n; i++) {
        scores[i] = expf(scores[i] - max);
        sum += scores[i];
    }
    return sum;
}
#endif

#if ESL_HAVE_NEON
ESL_ALWAYS_INLINE float32x4_t load4f_neon(const float *p) { return vld1q_f32(p); }

/* 4 halves as floats (exact; ARMv8.0 has the conversion). */
ESL_ALWAYS_INLINE float32x4_t load4h_neon(const uint16_t *p)
{
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

/* x[n] to halves with fcvtn, rounding as FPCR says (nearest even unless a caller
 * changed it): to_half_avx2's twin, NaN groups by esl__half_from likewise. */
static void to_half_neon(uint16_t *h, const float *x, int64_t n)
{
    int64_t i = 0, j;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        if (vminvq_u32(vceqq_f32(v, v)) == 0) {
            for (j = i; j < i + 4; j++)
                h[j] = esl__half_from(x[j]);
            continue;
        }
        vst1_u16(h + i, vreinterpret_u16_f16(vcvt_f16_f32(v)));
    }
    for (; i < n; i++)
        h[i] = esl__half_from(x[i]);
}

/* The AVX2 routines' NEON twins: weighted_64 holds 16 quad registers per 64 dims. */
#define ESL_DEFINE_NEON_ROUTINES(SUFFIX, KT, LOAD4, SCALAR)                                  \
    ESL_ALWAYS_INLINE float dot_##SUFFIX(const float *a, const KT *b, int64_t n)            \
    {                                                                                      \
        float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);                    \
        float total;                                                                       \
        int64_t i = 0;                                                                     \
        for (; i + 8 <= n; i += 8) {                                                       \
            acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), LOAD4(b + i));                        \
            acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), LOAD4(b + i + 4));                \
        }                                                                                  \
        total = vaddvq_f32(vaddq_f32(acc0, acc1));                                         \
        for (; i < n; i++)                                                                 \
            total += a[i] * SCALAR(b[i]);                                                  \
        return total;                                                                      \
    }                                                                                      \
    ESL_ALWAYS_INLINE void axpy_##SUFFIX(float *y, float a, const KT *x, int64_t n)         \
    {                                                                                      \
        int64_t i = 0;                                                                     \
        for (; i + 4 <= n; i += 4)                                                         \
            vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), LOAD4(x + i), a));              \
        for (; i < n; i++)                                                                 \
            y[i] += a * SCALAR(x[i]);                                                      \
    }                                                                                      \
    static void weighted_64_##SUFFIX(float *o, const float *p, float inv, const KT *v,      \
                                     int64_t n, int64_t dim)                               \
    {                                                                                      \
        int64_t c, t;                                                                      \
        int j;                                                                             \
        for (c = 0; c < dim; c += 64) {                                                    \
            float32x4_t acc[16];                                                           \
            ESL_UNROLL16                                                                   \
            for (j = 0; j < 16; j++)                                                       \
                acc[j] = vdupq_n_f32(0.0f);                                                \
            for (t = 0; t < n; t++) {                                                      \
                const float w = p[t] * inv;                                                \
                const KT *vt = v + t * dim + c;                                            \
                ESL_UNROLL16                                                               \
                for (j = 0; j < 16; j++)                                                   \
                    acc[j] = vfmaq_n_f32(acc[j], LOAD4(vt + 4 * j), w);                    \
            }                                                                              \
            ESL_UNROLL16                                                                   \
            for (j = 0; j < 16; j++)                                                       \
                vst1q_f32(o + c + 4 * j, acc[j]);                                          \
        }                                                                                  \
    }

ESL_DEFINE_NEON_ROUTINES(neon, float, load4f_neon, float_of)
ESL_DEFINE_NEON_ROUTINES(h_neon, uint16_t, load4h_neon, esl__half)

/* exp(x), x <= 0, 4 lanes: the same scheme as exp_avx2. */
static float32x4_t exp_neon(float32x4_t x)
{
    float32x4_t t, f, p;
    int32x4_t k;
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    t = vmulq_n_f32(x, 1.44269504088896341f);
    f = vrndmq_f32(t);
    k = vcvtq_s32_f32(f);
    t = vsubq_f32(t, f);
    p = vdupq_n_f32(2.154066972e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.248284004e-3f), p, t);
    p = vfmaq_f32(vdupq_n_f32(9.674549892e-3f), p, t);
    p = vfmaq_f32(vdupq_n_f32(5.548532072e-2f), p, t);
    p = vfmaq_f32(vdupq_n_f32(2.402294005e-1f), p, t);
    p = vfmaq_f32(vdupq_n_f32(6.931470282e-1f), p, t);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, t);
    k = vshlq_n_s32(vaddq_s32(k, vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(k));
}

static float softmax_exp_neon(float *scores, int64_t n, float max)
{
    const float32x4_t vmax = vdupq_n_f32(max);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float sum;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t e = exp_neon(vsubq_f32(vld1q_f32(scores + i), vmax));
        vst1q_f32(scores + i, e);
        acc = vaddq_f32(acc, e);
    }
    sum = vaddvq_f32(acc);
    for (; i < n; i++) {
        scores[i] = expf(scores[i] - max);
        sum += scores[i];
    }
    return sum;
}
#endif

/* The portable routines. */
#define ESL_DEFINE_C_ROUTINES(SUFFIX, KT, SCALAR)                                            \
    ESL_ALWAYS_INLINE float dot_##SUFFIX(const float *a, const KT *b, int64_t n)            \
    {                                                                                      \
        float total = 0.0f;                                                                \
        int64_t i;                                                                         \
        for (i = 0; i < n; i++)                                                            \
            total += a[i] * SCALAR(b[i]);                                                  \
        return total;                                                                      \
    }                                                                                      \
    ESL_ALWAYS_INLINE void axpy_##SUFFIX(float *y, float a, const KT *x, int64_t n)         \
    {                                                                                      \
        int64_t i;                                                                         \
        for (i = 0; i < n; i++)                                                            \
            y[i] += a * SCALAR(x[i]);                                                      \
    }

ESL_DEFINE_C_ROUTINES(c, float, float_of)
ESL_DEFINE_C_ROUTINES(h_c, uint16_t, esl__half)

static float softmax_exp_c(float *scores, int64_t n, float max)
{
    float sum = 0.0f;
    int64_t i;
    for (i = 0; i < n; i++) {
        scores[i] = expf(scores[i] - max);
        sum += scores[i];
    }
    return sum;
}

/*
 * A head's loops over its keys, one copy per ISA, so that every dot product and update
 * is inlined (an indirect call per key cost more than its 64 multiply-adds):
 *   scores[t] = dot(q, k[t]) * scale for t < n;
 *   o = sum over t of (p[t] * inv) v[t], key after key.
 */
#define ESL_DEFINE_HEAD_LOOPS(ISA, TARGET, DOT, AXPY, KT)                                  \
    TARGET static void scores_##ISA(const float *q, const KT *k, int64_t n, int64_t dim,    \
                                    float scale, float *scores)                            \
    {                                                                                      \
        int64_t t;                                                                         \
        for (t = 0; t < n; t++)                                                            \
            scores[t] = DOT(q, k + t * dim, dim) * scale;                                  \
    }                                                                                      \
    TARGET static void weighted_##ISA(float *o, const float *p, float inv, const KT *v,    \
                                      int64_t n, int64_t dim)                              \
    {                                                                                      \
        int64_t t;                                                                         \
        memset(o, 0, (size_t)dim * sizeof(float));                                         \
        for (t = 0; t < n; t++)                                                            \
            AXPY(o, p[t] * inv, v + t * dim, dim);                                         \
    }

/* The weighted sum in registers when the head allows it (the same bits either way). */
#define ESL_DEFINE_WEIGHTED(ISA, TARGET, KT)                                               \
    TARGET static void weighted_##ISA(float *o, const float *p, float inv, const KT *v,    \
                                      int64_t n, int64_t dim)                              \
    {                                                                                      \
        if (dim % 64 == 0)                                                                 \
            weighted_64_##ISA(o, p, inv, v, n, dim);                                       \
        else                                                                               \
            weighted_##ISA##_any(o, p, inv, v, n, dim);                                    \
    }

ESL_DEFINE_HEAD_LOOPS(c, , dot_c, axpy_c, float)
ESL_DEFINE_HEAD_LOOPS(h_c, , dot_h_c, axpy_h_c, uint16_t)
#if ESL_HAVE_AVX2_CODE
ESL_DEFINE_HEAD_LOOPS(avx2_any, ESL_TARGET_QMM_AVX2, dot_avx2, axpy_avx2, float)
ESL_DEFINE_HEAD_LOOPS(h_avx2_any, ESL_TARGET_QMM_AVX2, dot_h_avx2, axpy_h_avx2, uint16_t)
ESL_DEFINE_WEIGHTED(avx2, ESL_TARGET_QMM_AVX2, float)
ESL_DEFINE_WEIGHTED(h_avx2, ESL_TARGET_QMM_AVX2, uint16_t)
#endif
#if ESL_HAVE_NEON
ESL_DEFINE_HEAD_LOOPS(neon_any, , dot_neon, axpy_neon, float)
ESL_DEFINE_HEAD_LOOPS(h_neon_any, , dot_h_neon, axpy_h_neon, uint16_t)
ESL_DEFINE_WEIGHTED(neon, , float)
ESL_DEFINE_WEIGHTED(h_neon, , uint16_t)
#endif

typedef struct vec_ops {
    void (*scores)(const float *, const float *, int64_t, int64_t, float, float *);
    void (*weighted)(float *, const float *, float, const float *, int64_t, int64_t);
    void (*scores_h)(const float *, const uint16_t *, int64_t, int64_t, float, float *);
    void (*weighted_h)(float *, const float *, float, const uint16_t *, int64_t, int64_t);
    float (*softmax_exp)(float *, int64_t, float);
    void (*to_half)(uint16_t *, const float *, int64_t);
} vec_ops;

static void to_half_c(uint16_t *h, const float *x, int64_t n)
{
    int64_t i;
    for (i = 0; i < n; i++)
        h[i] = esl__half_from(x[i]);
}

/* The vector routines of the matmul's SIMD level (esl_qmm_level). */
static vec_ops ops_for_level(int32_t level)
{
    vec_ops ops = {scores_c, weighted_c, scores_h_c, weighted_h_c, softmax_exp_c, to_half_c};
#if ESL_HAVE_AVX2_CODE
    if (level >= 1) {
        ops.scores = scores_avx2_any;
        ops.weighted = weighted_avx2;
        ops.scores_h = scores_h_avx2_any;
        ops.weighted_h = weighted_h_avx2;
        ops.softmax_exp = softmax_exp_avx2;
        ops.to_half = to_half_avx2;
    }
#elif ESL_HAVE_NEON
    if (level >= 1) {
        ops.scores = scores_neon_any;
        ops.weighted = weighted_neon;
        ops.scores_h = scores_h_neon_any;
        ops.weighted_h = weighted_h_neon;
        ops.softmax_exp = softmax_exp_neon;
        ops.to_half = to_half_neon;
    }
#else
    (void)level;
#endif
    return ops;
}

/* ---- the steps -------------------------------------------------------------------- */

/* Rotates the first 2 * half values of x (rotate-half) by the angles at `pos`. */
static void rope(float *x, const float *cos_t, const float *sin_t, int64_t pos, int64_t half)
{
    const float *c = cos_t + pos * half, *s = sin_t + pos * half;
    int64_t j;
    for (j = 0; j < half; j++) {
        float a = x[j], b = x[j + half];
        x[j] = a * c[j] - b * s[j];
        x[j + half] = a * s[j] + b * c[j];
    }
}

/* Contract: see edgeslm_kernel.h. */
void esl_attn_to_half(uint16_t *h, const float *x, int64_t n)
{
    ops_for_level(esl_qmm_level()).to_half(h, x, n);
}

/* Contract: see attention.h. */
int32_t esl__attn_check(const esl_attn_desc *d)
{
    if (!d || d->n_heads < 1 || d->n_kv_heads < 1 || d->n_heads % d->n_kv_heads ||
        d->head_dim < 2 || d->head_dim % 2 || d->max_seq < 1 || d->s < 1 ||
        d->total < d->s || d->total > d->max_seq || d->head_dim > ESL_ATTN_MAX_HEAD_DIM)
        return ESL_ERR_ARG;
    return ESL_OK;
}

/* Contract: see attention.h. */
void esl__attn_store(const esl_attn_desc *d, const float *qkv, const float *cos_t,
                     const float *sin_t, void *keys, void *values)
{
    const int64_t dim = d->head_dim, width = (d->n_heads + 2 * d->n_kv_heads) * dim;
    const vec_ops ops = ops_for_level(esl_qmm_level());
    int64_t i, h;

    for (i = 0; i < d->s; i++) {
        const int64_t pos = d->total - d->s + i;
        const float *row = qkv + i * width;
        for (h = 0; h < d->n_kv_heads; h++) {
            const int64_t at = (h * d->max_seq + pos) * dim;
            const float *v = row + (d->n_heads + d->n_kv_heads + h) * dim;
            float k[ESL_ATTN_MAX_HEAD_DIM];

            /* The key rotated in float, then both stored in the cache's precision. */
            memcpy(k, row + (d->n_heads + h) * dim, (size_t)dim * sizeof(float));
            if (cos_t)
                rope(k, cos_t, sin_t, pos, dim / 2);
            if (!d->kv_half) {
                memcpy((float *)keys + at, k, (size_t)dim * sizeof(float));
                memcpy((float *)values + at, v, (size_t)dim * sizeof(float));
                continue;
            }
            ops.to_half((uint16_t *)keys + at, k, dim);
            ops.to_half((uint16_t *)values + at, v, dim);
        }
    }
}

/* Contract: see attention.h. */
void esl__attn_head(const esl_attn_desc *d, const float *qkv, const float *cos_t,
                    const float *sin_t, const void *keys, const void *values, int64_t h,
                    int64_t row0, int64_t row1, float *scores, float *out)
{
    const int64_t dim = d->head_dim, width = (d->n_heads + 2 * d->n_kv_heads) * dim;
    const int64_t head0 = h / (d->n_heads / d->n_kv_heads) * d->max_seq * dim;
    const vec_ops ops = ops_for_level(esl_qmm_level());
    int64_t i;

    for (i = row0; i < row1; i++) {
        const int64_t pos = d->total - d->s + i, n = pos + 1;
        float q[ESL_ATTN_MAX_HEAD_DIM], *o = out + (i * d->n_heads + h) * dim;
        float max = -FLT_MAX, inv;
        int64_t t;

        /* Scores of the rotated query against every visible key, then softmax. */
        memcpy(q, qkv + i * width + h * dim, (size_t)dim * sizeof(float));
        if (cos_t)
            rope(q, cos_t, sin_t, pos, dim / 2);
        if (d->kv_half)
            ops.scores_h(q, (const uint16_t *)keys + head0, n, dim, d->scale, scores);
        else
            ops.scores(q, (const float *)keys + head0, n, dim, d->scale, scores);
        for (t = 0; t < n; t++)
            max = scores[t] > max ? scores[t] : max;
        inv = 1.0f / ops.softmax_exp(scores, n, max);

        /* The weighted sum of the values. */
        if (d->kv_half)
            ops.weighted_h(o, scores, inv, (const uint16_t *)values + head0, n, dim);
        else
            ops.weighted(o, scores, inv, (const float *)values + head0, n, dim);
    }
}
