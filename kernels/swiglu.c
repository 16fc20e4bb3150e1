/*
 * swiglu.c - SwiGLU, silu(gate) * up, and its onnxruntime operator.
 *
 *   ai.edgeslm::SwiGLU(X) -> Y      X float32 [..., 2F], Y float32 [..., F]
 *     Y = silu(X[..., :F]) * X[..., F:], silu(g) = g / (1 + e^-g)
 *
 * The quantized products apply it to their own output (MatMulQ8/MatMulQ4 with
 * activation 1, ort_op.c); an fp32 graph runs this operator after its gate + up MatMul.
 * Both compute it with esl__silu_times, so an fp32 package and a quantized one differ
 * only by their products, never by their SwiGLU. One thread: a decode step has F
 * values (1536 on SmolLM2), a fraction of a microsecond.
 */
#include <string.h>

#include "edgeslm_kernel.h"
#include "esl_internal.h"
#include "ort_util.h"

#define OP_NAME "SwiGLU"

/*
 * y = g / (1 + e^-g) * u. e^x is 2^n * p(r) after range reduction, p Cephes'
 * degree-6 polynomial for expf (relative error about 2e-7), x clamped to [-87, 88] so
 * 2^n stays a normal float (beyond it silu is 0 or g to float precision anyway). The
 * SSE2, NEON and scalar forms do the same IEEE operations in the same order, so every
 * CPU gets the same bits; a gate that is not finite gives no finite value. libm's expf,
 * one value at a time, made a 128-token prompt of SmolLM2 15% slower than onnxruntime's
 * separate Split, QuickGelu and Mul operators.
 */
#define EXP_LO -87.0f
#define EXP_HI 88.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_ROUND 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

static float silu_times_scalar(float g, float u)
{
    float x = -g, t, n, r, p, two_n;
    int32_t bits;
    x = x >= EXP_LO ? x : EXP_LO; /* a NaN becomes EXP_LO here, as in _mm_max_ps */
    x = x <= EXP_HI ? x : EXP_HI;
    t = x * EXP_LOG2E + EXP_ROUND;
    n = t - EXP_ROUND;
    r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    p = EXP_P0 * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r + EXP_P4;
    p = p * r + EXP_P5;
    p = p * r * r + r + 1.0f;
    bits = ((int32_t)n + 127) * (1 << 23);
    memcpy(&two_n, &bits, sizeof two_n);
    return g / (1.0f + p * two_n) * u;
}

#if defined(__SSE2__)
void esl__silu_times(const float *gate, const float *up, float *y, int64_t count)
{
    const __m128 lo = _mm_set1_ps(EXP_LO), hi = _mm_set1_ps(EXP_HI);
    const __m128 round = _mm_set1_ps(EXP_ROUND), one = _mm_set1_ps(1.0f);
    int64_t c = 0;
    for (; c + 4 <= count; c += 4) {
        __m128 g = _mm_loadu_ps(gate + c);
        __m128 x = _mm_min_ps(_mm_max_ps(_mm_sub_ps(_mm_setzero_ps(), g), lo), hi);
        __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(EXP_LOG2E)), round), round);
        __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(EXP_LN2_HI)));
        __m128 p;
        __m128i bits;
        r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(EXP_LN2_LO)));
        p = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(EXP_P0), r), _mm_set1_ps(EXP_P1));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(EXP_P2));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(EXP_P3));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(EXP_P4));
        p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(EXP_P5));
        p = _mm_add_ps(_mm_add_ps(_mm_mul_ps(_mm_mul_ps(p, r), r), r), one);
        bits = _mm_slli_epi32(_mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127)), 23);
        p = _mm_add_ps(one, _mm_mul_ps(p, _mm_castsi128_ps(bits)));
        _mm_storeu_ps(y + c, _mm_mul_ps(_mm_div_ps(g, p), _mm_loadu_ps(up + c)));
    }
    for (; c < count; c++)
        y[c] = silu_times_scalar(gate[c], up[c]);
}
#elif ESL_HAVE_NEON
void esl__silu_times(const float *gate, const float *up, float *y, int64_t count)
{
    const float32x4_t lo = vdupq_n_f32(EXP_LO), hi = vdupq_n_f32(EXP_HI);
    const float32x4_t round = vdupq_n_f32(EXP_ROUND), one = vdupq_n_f32(1.0f);
    int64_t c = 0;
    for (; c + 4 <= count; c += 4) {
        float32x4_t g = vld1q_f32(gate + c);
        float32x4_t x = vminq_f32(vmaxq_f32(vnegq_f32(g), lo), hi);
        float32x4_t n = vsubq_f32(vaddq_f32(vmulq_n_f32(x, EXP_LOG2E), round), round);
        float32x4_t r = vsubq_f32(x, vmulq_n_f32(n, EXP_LN2_HI));
        float32x4_t p;
        int32x4_t bits;
        r = vsubq_f32(r, vmulq_n_f32(n, EXP_LN2_LO));
        p = vaddq_f32(vmulq_n_f32(r, EXP_P0), vdupq_n_f32(EXP_P1));
        p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(EXP_P2));
        p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(EXP_P3));
        p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(EXP_P4));
        p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(EXP_P5));
        p = vaddq_f32(vaddq_f32(vmulq_f32(vmulq_f32(p, r), r), r), one);
        bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
        p = vaddq_f32(one, vmulq_f32(p, vreinterpretq_f32_s32(bits)));
        vst1q_f32(y + c, vmulq_f32(vdivq_f32(g, p), vld1q_f32(up + c)));
    }
    for (; c < count; c++)
        y[c] = silu_times_scalar(gate[c], up[c]);
}
#else
void esl__silu_times(const float *gate, const float *up, float *y, int64_t count)
{
    int64_t c;
    for (c = 0; c < count; c++)
        y[c] = silu_times_scalar(gate[c], up[c]);
}
#endif

/* Contract: see edgeslm_kernel.h. */
void esl_swiglu(const float *gate, const float *up, float *y, int64_t count, int32_t simd)
{
    int64_t c;
    if (simd) {
        esl__silu_times(gate, up, y, count);
        return;
    }
    for (c = 0; c < count; c++)
        y[c] = silu_times_scalar(gate[c], up[c]);
}

/* ---- the operator ------------------------------------------------------------------- */

#define fail(...) esl__ort_fail(OP_NAME, __VA_ARGS__)

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                const OrtKernelInfo *info, void **out)
{
    (void)op;
    (void)api;
    (void)info;
    *out = (void *)&esl__swiglu_op; /* no state: any non-NULL pointer */
    return NULL;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx)
{
    const OrtValue *x_val = NULL;
    OrtValue *y_val = NULL;
    int64_t dims[ESL_ORT_MAX_DIMS], rows = 1, width, half;
    size_t rank, i;
    int type;
    float *x, *y;
    OrtStatus *st;

    (void)kernel;
    st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_GetInput, esl_ort_get_input_fn)(
        ctx, 0, &x_val);
    if (!st)
        st = esl__ort_shape(OP_NAME, x_val, &type, &rank, dims);
    if (st)
        return st;
    if (type != ESL_ORT_FLOAT || rank < 1 || dims[rank - 1] < 2 || dims[rank - 1] % 2)
        return fail(ESL_ORT_INVALID_ARGUMENT,
                    "X must be float32 [..., 2F] (gate and up side by side), got type %d, "
                    "rank %zu, last dim %lld",
                    type, rank, rank ? (long long)dims[rank - 1] : -1LL);
    for (i = 0; i + 1 < rank; i++)
        rows *= dims[i];
    width = dims[rank - 1];
    half = width / 2;
    dims[rank - 1] = half;
    st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_GetOutput, esl_ort_get_output_fn)(
        ctx, 0, dims, rank, &y_val);
    if (!st)
        st = esl__ort_data(x_val, (void **)&x);
    if (!st)
        st = esl__ort_data(y_val, (void **)&y);
    if (st)
        return st;
    for (i = 0; i < (size_t)rows; i++)
        esl__silu_times(x + (int64_t)i * width, x + (int64_t)i * width + half,
                        y + (int64_t)i * half, half);
    return NULL;
}

static void destroy_kernel(void *kernel) { (void)kernel; }

static void *create_kernel_v1(const OrtCustomOp *op, const OrtApi *api,
                              const OrtKernelInfo *info)
{
    void *kernel = NULL;
    esl__ort_release(api, create_kernel(op, api, info, &kernel));
    return kernel;
}

static void compute_v1(void *kernel, OrtKernelContext *ctx)
{
    esl__ort_release(esl__ort_api, compute(kernel, ctx));
}

static const char *op_name(const OrtCustomOp *op)
{
    (void)op;
    return OP_NAME;
}

const OrtCustomOp esl__swiglu_op = {
    ESL_ORT_CUSTOM_OP_VERSION,
    create_kernel_v1,
    op_name,
    esl__ort_cpu_provider,
    esl__ort_float_type,
    esl__ort_one,
    esl__ort_float_type,
    esl__ort_one,
    compute_v1,
    destroy_kernel,
    esl__ort_required,
    esl__ort_required,
    esl__ort_required,
    esl__ort_one_arity,
    esl__ort_not_homogeneous,
    esl__ort_one_arity,
    esl__ort_not_homogeneous,
    create_kernel,
    compute,
};
