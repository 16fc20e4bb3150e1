/*
 * qmatmul.h - the block matmuls' internals, shared by qmatmul.c (int8 weights),
 * qmatmul4.c (4-bit weights) and ort_op.c only.
 *
 * A product is two steps: esl__qmm_prepare quantizes the activations once (one thread),
 * then esl__qmm_groups / esl__qmm4_groups compute any range of 16-row weight groups for
 * every activation row, so callers split the groups between threads. Neither step
 * allocates.
 */
#ifndef ESL_QMATMUL_H
#define ESL_QMATMUL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "esl_internal.h"

/* Activations are quantized in chunks of this many values, whatever the weight block. */
#define ESL_QMM_CHUNK 32
/* Weight rows are interleaved in groups of this many (see qmatmul.c). */
#define ESL_QMM_GROUP 16

/* int8 block-quantized, interleaved weights, borrowed: layout at the top of qmatmul.c. */
typedef struct esl_qmm_weights {
    const uint8_t *data;    /* [n_groups][kp / 4][16][4] uint8, q + 128 */
    const uint16_t *scales; /* [n_groups][kp / block][16] IEEE half */
    int64_t n;              /* output columns (real weight rows); y's row stride */
    int64_t kp;             /* input width rounded up to the block */
    int64_t block;          /* 32, 64, 128 or 256 */
} esl_qmm_weights;

/* 4-bit blocks of 32 with a scale and a minimum each: layout at the top of qmatmul4.c. */
typedef struct esl_qmm4_weights {
    const uint8_t *data;    /* [n_groups][kp / 32][4][16][4] nibble pairs */
    const uint16_t *scales; /* [n_groups][kp / 32][16] IEEE half: w = scale * q + min */
    const uint16_t *mins;   /* [n_groups][kp / 32][16] IEEE half */
    int64_t n;              /* output columns (real weight rows); y's row stride */
    int64_t kp;             /* input width rounded up to 32 */
} esl_qmm4_weights;

/* Quantized activations of m rows, in caller-owned scratch (esl__qmm_scratch_size). */
typedef struct esl_qmm_act {
    int64_t m, k, kp; /* rows, input width, width padded to the weight block */
    int64_t row;      /* bytes between rows of q and absq (a multiple of 64) */
    int64_t sx_row;   /* entries between rows of sx and sumq */
    int32_t level;    /* SIMD level the arrays were prepared for */
    int8_t *q;        /* [m][row] int8 values, zero past k */
    uint8_t *absq;    /* [m][row] |q| (level 1 on x86 only) */
    float *sx;        /* [m][sx_row] one scale per chunk (NaN for a non-finite chunk) */
    int32_t *sumq;    /* [m][sx_row] the chunk's sum of q */
    float *xsum;      /* [m][sx_row] the chunk's sum of x itself (float, in order) */
} esl_qmm_act;

/* Returns the scratch bytes for m rows of padded width kp. */
size_t esl__qmm_scratch_size(int64_t m, int64_t kp);

/*
 * Quantizes x ([m][k] float32, borrowed) into `a`, laid out in `scratch` (at least
 * esl__qmm_scratch_size(m, kp) bytes; any alignment) for SIMD level `level`.
 */
void esl__qmm_prepare(esl_qmm_act *a, void *scratch, const float *x, int64_t m, int64_t k,
                      int64_t kp, int32_t level);

/* Writes y[i][n] for every row i and every real row n of groups [g0, g1) (y: [m][w->n]). */
void esl__qmm_groups(const esl_qmm_act *a, const esl_qmm_weights *w, int64_t g0, int64_t g1,
                     float *y);
void esl__qmm4_groups(const esl_qmm_act *a, const esl_qmm4_weights *w, int64_t g0,
                      int64_t g1, float *y);

/* Returns ESL_OK when the sizes are ones the kernel handles, else ESL_ERR_ARG. */
int32_t esl__qmm_check(int64_t m, int64_t k, int64_t n, int64_t block);

/* ---- small helpers of the tiles ------------------------------------------------- */

/* Fully unrolls a loop of constant count, so a tile's accumulators stay in registers. */
#if defined(__clang__) || defined(__GNUC__)
#define ESL_UNROLL _Pragma("GCC unroll 8")
#define ESL_UNROLL16 _Pragma("GCC unroll 16")
#else
#define ESL_UNROLL
#define ESL_UNROLL16
#endif
#define ESL_ALWAYS_INLINE static inline __attribute__((always_inline))

/*
 * The driver both weight formats share: walks groups [g0, g1), one at a time and in
 * memory order, so that a single row (decode) streams the weights once, sequentially:
 * measured, that beats reading several groups side by side. Several rows take MR per
 * tile over the same group, whose weights then stay in L1. Every tile call has
 * constant sizes, so each copy keeps its accumulators in registers.
 */
#define ESL_DEFINE_QMM_DRIVER(NAME, TILE, TARGET, MR, WEIGHTS)                             \
    TARGET static void NAME(const esl_qmm_act *a, const WEIGHTS *w, int64_t g0, int64_t g1, \
                            float *y)                                                      \
    {                                                                                      \
        int64_t g, m;                                                                      \
        for (g = g0; g < g1; g++) {                                                        \
            for (m = 0; m + MR <= a->m; m += MR)                                           \
                TILE(a, m, MR, w, g, y);                                                   \
            for (; m < a->m; m++)                                                          \
                TILE(a, m, 1, w, g, y);                                                    \
        }                                                                                  \
    }

static inline int64_t esl__round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

/* Returns log2(block / ESL_QMM_CHUNK): chunk c lies in weight block c >> shift. */
static inline int esl__block_shift(int64_t block)
{
    return block >= 256 ? 3 : (block >= 128 ? 2 : (block >= 64 ? 1 : 0));
}

/* Loads 4 bytes as an int32 (any alignment). */
static inline int32_t esl__load4(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if ESL_HAVE_AVX2_CODE
#define ESL_TARGET_QMM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ESL_TARGET_QMM_VNNI \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* Stores the first `count` (any, clamped to 8) of the floats of v at dst. */
ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE void esl__store8(float *dst, __m256 v, int64_t count)
{
    float tmp[8];
    int64_t r;
    if (count >= 8) {
        _mm256_storeu_ps(dst, v);
        return;
    }
    _mm256_storeu_ps(tmp, v);
    for (r = 0; r < count; r++)
        dst[r] = tmp[r];
}
#endif

#if ESL_HAVE_NEON
#define ESL_TARGET_QMM_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

/* Stores the first `count` (any, clamped to 4) of the floats of v at dst. */
ESL_ALWAYS_INLINE void esl__store4(float *dst, float32x4_t v, int64_t count)
{
    float tmp[4];
    int64_t r;
    if (count >= 4) {
        vst1q_f32(dst, v);
        return;
    }
    vst1q_f32(tmp, v);
    for (r = 0; r < count; r++)
        dst[r] = tmp[r];
}

/*
 * Exact 4-input dot products of 4 rows (wq: 4 rows x 4 bytes) with 4 activations
 * repeated 4 times (xd), added to acc. ARMv8.0: widening multiplies, then pair sums;
 * a pair of int8 products is at most 2 * 127 * 127, so int16 cannot overflow.
 */
ESL_ALWAYS_INLINE int32x4_t esl__dot4_neon(int32x4_t acc, int8x16_t wq, int8x16_t xd)
{
    int16x8_t lo = vmull_s8(vget_low_s8(wq), vget_low_s8(xd));
    int16x8_t hi = vmull_high_s8(wq, xd);
    return vpadalq_s16(acc, vpaddq_s16(lo, hi));
}

/* The 4 activations of lane U of X16, repeated across a register. */
#define ESL_REPEAT4(X16, U) vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(X16), U))
#endif

#endif /* ESL_QMATMUL_H */
