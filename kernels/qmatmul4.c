/*
 * qmatmul4.c - 4-bit block matrix products: y = x @ dequant(w)^T, w = scale * q + min.
 *
 * The blocks are GGUF's Q4_1 (Q4_0 is min = -8 * scale): 32 inputs, a scale and a
 * minimum each, q in 0..15, so a GGUF file's 4-bit tensors carry over exactly. Rows
 * are interleaved in groups of 16 like the int8 weights (qmatmul.c), two 4-input units
 * per byte:
 *   data    uint8 [n_groups][kp / 32][4][16][4]: for block c and v = 0..3, row 16g + r,
 *           input t: low nibble = q at input 32c + 4v + t, high = q at 32c + 4(v + 4) + t
 *   scales, mins   IEEE half [n_groups][kp / 32][16]
 * Activations are the int8 chunks of qmatmul.c (one chunk per block). With q centred
 * on 8 (w = scale * (q - 8) + (min + 8 * scale)), per block
 *   sum_k w_k x_k = sx * scale * (dot(q, qx) - 8 * sum(qx)) + (min + 8 * scale) * sum(x),
 * dot(q, qx) exact in int32 and sum(x) the float sum of the activations themselves:
 * the offset term sees no rounding of x, and the rounded part stays small (q - 8 in
 * -8..7), which keeps it as faithful as onnxruntime's centred zero points. The
 * weights are unsigned and small, so AVX-512 VNNI and AVX2 multiply them directly by
 * the signed activations, and NEON reads them as signed bytes. Levels as in
 * qmatmul.c.
 */
#include <stdlib.h>

#include "edgeslm_kernel.h"
#include "qmatmul.h"

#define CHUNK ESL_QMM_CHUNK
#define GROUP ESL_QMM_GROUP
#define UNROLL ESL_UNROLL
/* Bytes of one group's block: 16 rows x 32 nibbles. */
#define BLOCK_BYTES (GROUP * CHUNK / 2)

/* ---- portable C --------------------------------------------------------------------- */

/* Rows [m0, m0 + mr) of y for the 16 weight rows of group g. */
static void tile4_c(const esl_qmm_act *a, int64_t m0, int mr, const esl_qmm4_weights *w,
                    int64_t g, float *y)
{
    const int64_t nb = w->kp / CHUNK;
    int64_t i, c, v, r, t;

    for (i = m0; i < m0 + mr; i++) {
        const int8_t *q = a->q + i * a->row;
        float acc[GROUP] = {0};
        for (c = 0; c < nb; c++) {
            const uint8_t *wb = w->data + (g * nb + c) * BLOCK_BYTES;
            const uint16_t *sc = w->scales + (g * nb + c) * GROUP;
            const uint16_t *mn = w->mins + (g * nb + c) * GROUP;
            const float sx = a->sx[i * a->sx_row + c];
            const int32_t sumq = a->sumq[i * a->sx_row + c];
            const float xsum = a->xsum[i * a->sx_row + c];
            int32_t dot[GROUP] = {0};
            for (v = 0; v < 4; v++)
                for (r = 0; r < GROUP; r++)
                    for (t = 0; t < 4; t++) {
                        int32_t byte = wb[(v * GROUP + r) * 4 + t];
                        dot[r] += (byte & 15) * q[c * CHUNK + 4 * v + t] +
                                  (byte >> 4) * q[c * CHUNK + 4 * (v + 4) + t];
                    }
            for (r = 0; r < GROUP; r++) {
                const float scale = esl__half(sc[r]);
                const float offset = esl__half(mn[r]) + 8.0f * scale;
                acc[r] += (float)(dot[r] - 8 * sumq) * (scale * sx) + offset * xsum;
            }
        }
        for (r = 0; r < GROUP && g * GROUP + r < w->n; r++)
            y[i * w->n + g * GROUP + r] = acc[r];
    }
}

/* ---- AVX2 and AVX-512 VNNI ---------------------------------------------------------- */

#if ESL_HAVE_AVX2_CODE

/*
 * AVX2 tile: mr rows by one group, two registers of 8 rows x 4 inputs per unit.
 * maddubs multiplies the unsigned nibbles by the signed activations; a pair of
 * products is at most 2 * 15 * 127, so the int16 sums cannot saturate.
 */
ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE void tile4_avx2(const esl_qmm_act *a, int64_t m0,
                                                      const int mr,
                                                      const esl_qmm4_weights *w,
                                                      int64_t g, float *y)
{
    const int64_t nb = w->kp / CHUNK;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4][2];
    int64_t c, left;
    int i, h, v;

    UNROLL
    for (i = 0; i < mr; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (c = 0; c < nb; c++) {
        const uint8_t *wb = w->data + (g * nb + c) * BLOCK_BYTES;
        const uint16_t *sc = w->scales + (g * nb + c) * GROUP;
        const uint16_t *mn = w->mins + (g * nb + c) * GROUP;
        __m256 scale[2], offset[2];
        __m256i lo[4][2], hi[4][2];
        UNROLL
        for (h = 0; h < 2; h++) {
            scale[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 8 * h)));
            offset[h] = _mm256_fmadd_ps(
                _mm256_set1_ps(8.0f), scale[h],
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + 8 * h))));
        }
        UNROLL
        for (v = 0; v < 4; v++)
            UNROLL
            for (h = 0; h < 2; h++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + 64 * v + 32 * h));
                lo[v][h] = _mm256_and_si256(raw, low);
                hi[v][h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            }
        UNROLL
        for (i = 0; i < mr; i++) {
            const int64_t row = m0 + i;
            const int8_t *q = a->q + row * a->row + c * CHUNK;
            const __m256 sx = _mm256_set1_ps(a->sx[row * a->sx_row + c]);
            const __m256i sum8 = _mm256_set1_epi32(8 * a->sumq[row * a->sx_row + c]);
            const __m256 xsum = _mm256_set1_ps(a->xsum[row * a->sx_row + c]);
            UNROLL
            for (h = 0; h < 2; h++) {
                __m256i d = _mm256_setzero_si256();
                UNROLL
                for (v = 0; v < 4; v++) {
                    __m256i xl = _mm256_set1_epi32(esl__load4(q + 4 * v));
                    __m256i xh = _mm256_set1_epi32(esl__load4(q + 16 + 4 * v));
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[v][h], xl),
                                                 _mm256_maddubs_epi16(hi[v][h], xh));
                    d = _mm256_add_epi32(d, _mm256_madd_epi16(p, ones));
                }
                __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(d, sum8));
                acc[i][h] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale[h], sx),
                                            _mm256_fmadd_ps(offset[h], xsum, acc[i][h]));
            }
        }
    }
    left = w->n - g * GROUP;
    UNROLL
    for (i = 0; i < mr; i++) {
        float *dst = y + (m0 + i) * w->n + g * GROUP;
        esl__store8(dst, acc[i][0], left);
        if (left > 8)
            esl__store8(dst + 8, acc[i][1], left - 8);
    }
}

/* VNNI tile: mr rows by one group; dpbusd takes the nibbles as its unsigned operand. */
ESL_TARGET_QMM_VNNI ESL_ALWAYS_INLINE void tile4_vnni(const esl_qmm_act *a, int64_t m0,
                                                      const int mr,
                                                      const esl_qmm4_weights *w,
                                                      int64_t g, float *y)
{
    const int64_t nb = w->kp / CHUNK;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[8];
    int64_t c, left;
    int i, v;

    UNROLL
    for (i = 0; i < mr; i++)
        acc[i] = _mm512_setzero_ps();
    for (c = 0; c < nb; c++) {
        const uint8_t *wb = w->data + (g * nb + c) * BLOCK_BYTES;
        const __m512 scale = _mm512_cvtph_ps(
            _mm256_loadu_si256((const __m256i *)(w->scales + (g * nb + c) * GROUP)));
        const __m512 offset = _mm512_fmadd_ps(
            _mm512_set1_ps(8.0f), scale,
            _mm512_cvtph_ps(
                _mm256_loadu_si256((const __m256i *)(w->mins + (g * nb + c) * GROUP))));
        __m512i lo[4], hi[4];
        UNROLL
        for (v = 0; v < 4; v++) {
            __m512i raw = _mm512_loadu_si512(wb + 64 * v);
            lo[v] = _mm512_and_si512(raw, low);
            hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        }
        UNROLL
        for (i = 0; i < mr; i++) {
            const int64_t row = m0 + i;
            const int8_t *q = a->q + row * a->row + c * CHUNK;
            __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
            UNROLL
            for (v = 0; v < 4; v++) {
                d0 = _mm512_dpbusd_epi32(d0, lo[v], _mm512_set1_epi32(esl__load4(q + 4 * v)));
                d1 = _mm512_dpbusd_epi32(d1, hi[v],
                                         _mm512_set1_epi32(esl__load4(q + 16 + 4 * v)));
            }
            const __m512i sum8 = _mm512_set1_epi32(8 * a->sumq[row * a->sx_row + c]);
            const __m512 xsum = _mm512_set1_ps(a->xsum[row * a->sx_row + c]);
            __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(d0, d1), sum8));
            acc[i] = _mm512_fmadd_ps(
                f, _mm512_mul_ps(scale, _mm512_set1_ps(a->sx[row * a->sx_row + c])),
                _mm512_fmadd_ps(offset, xsum, acc[i]));
        }
    }
    left = w->n - g * GROUP;
    UNROLL
    for (i = 0; i < mr; i++) {
        float *dst = y + (m0 + i) * w->n + g * GROUP;
        if (left >= GROUP)
            _mm512_storeu_ps(dst, acc[i]);
        else
            _mm512_mask_storeu_ps(dst, (__mmask16)((1u << left) - 1u), acc[i]);
    }
}
#endif /* ESL_HAVE_AVX2_CODE */

/* ---- NEON ----------------------------------------------------------------------------- */

#if ESL_HAVE_NEON

/* One quad (4 rows) of units v and v + 4: low and high nibbles as signed bytes. */
#define NIBBLES_LO(P) vreinterpretq_s8_u8(vandq_u8(vld1q_u8(P), vdupq_n_u8(0x0F)))
#define NIBBLES_HI(P) vreinterpretq_s8_u8(vshrq_n_u8(vld1q_u8(P), 4))

/* D[r] += dot(row r of units v and v + 4, their inputs), v = 0..3; W at unit 0's quad. */
#define DOT8_1(D, W, XA, XB)                                                               \
    do {                                                                                   \
        D = vdotq_laneq_s32(D, NIBBLES_LO(W), XA, 0);                                      \
        D = vdotq_laneq_s32(D, NIBBLES_HI(W), XB, 0);                                      \
        D = vdotq_laneq_s32(D, NIBBLES_LO((W) + 64), XA, 1);                               \
        D = vdotq_laneq_s32(D, NIBBLES_HI((W) + 64), XB, 1);                               \
        D = vdotq_laneq_s32(D, NIBBLES_LO((W) + 128), XA, 2);                              \
        D = vdotq_laneq_s32(D, NIBBLES_HI((W) + 128), XB, 2);                              \
        D = vdotq_laneq_s32(D, NIBBLES_LO((W) + 192), XA, 3);                              \
        D = vdotq_laneq_s32(D, NIBBLES_HI((W) + 192), XB, 3);                              \
    } while (0)
#define DOT8_0(D, W, XA, XB)                                                               \
    do {                                                                                   \
        D = esl__dot4_neon(D, NIBBLES_LO(W), ESL_REPEAT4(XA, 0));                          \
        D = esl__dot4_neon(D, NIBBLES_HI(W), ESL_REPEAT4(XB, 0));                          \
        D = esl__dot4_neon(D, NIBBLES_LO((W) + 64), ESL_REPEAT4(XA, 1));                   \
        D = esl__dot4_neon(D, NIBBLES_HI((W) + 64), ESL_REPEAT4(XB, 1));                   \
        D = esl__dot4_neon(D, NIBBLES_LO((W) + 128), ESL_REPEAT4(XA, 2));                  \
        D = esl__dot4_neon(D, NIBBLES_HI((W) + 128), ESL_REPEAT4(XB, 2));                  \
        D = esl__dot4_neon(D, NIBBLES_LO((W) + 192), ESL_REPEAT4(XA, 3));                  \
        D = esl__dot4_neon(D, NIBBLES_HI((W) + 192), ESL_REPEAT4(XB, 3));                  \
    } while (0)

/* NEON tile: mr rows by one group as 4 quads of 4 rows; DOTPROD picks DOT8_0/1. */
#define DEFINE_TILE4_NEON(NAME, DOTPROD, TARGET)                                           \
    TARGET ESL_ALWAYS_INLINE void NAME(const esl_qmm_act *a, int64_t m0, const int mr,     \
                                       const esl_qmm4_weights *w, int64_t g, float *y)     \
    {                                                                                      \
        const int64_t nb = w->kp / CHUNK;                                                  \
        float32x4_t acc[2][4];                                                             \
        int64_t c, n;                                                                      \
        int i, h;                                                                          \
        UNROLL                                                                             \
        for (i = 0; i < mr; i++)                                                           \
            UNROLL                                                                         \
            for (h = 0; h < 4; h++)                                                        \
                acc[i][h] = vdupq_n_f32(0.0f);                                             \
        for (c = 0; c < nb; c++) {                                                         \
            const uint8_t *wb = w->data + (g * nb + c) * BLOCK_BYTES;                      \
            const __fp16 *sc = (const __fp16 *)w->scales + (g * nb + c) * GROUP;           \
            const __fp16 *mn = (const __fp16 *)w->mins + (g * nb + c) * GROUP;             \
            UNROLL                                                                         \
            for (i = 0; i < mr; i++) {                                                     \
                const int64_t row = m0 + i;                                                \
                const int8_t *q = a->q + row * a->row + c * CHUNK;                         \
                const int8x16_t xa = vld1q_s8(q), xb = vld1q_s8(q + 16);                   \
                const float sx = a->sx[row * a->sx_row + c];                               \
                const int32x4_t sum8 = vdupq_n_s32(8 * a->sumq[row * a->sx_row + c]);      \
                const float xsum = a->xsum[row * a->sx_row + c];                           \
                UNROLL                                                                     \
                for (h = 0; h < 4; h++) {                                                  \
                    int32x4_t d = vdupq_n_s32(0);                                          \
                    float32x4_t scale = vcvt_f32_f16(vld1_f16(sc + 4 * h));                \
                    float32x4_t offset = vfmaq_n_f32(vcvt_f32_f16(vld1_f16(mn + 4 * h)),   \
                                                     scale, 8.0f);                         \
                    DOT8_##DOTPROD(d, wb + 16 * h, xa, xb);                                \
                    acc[i][h] = vfmaq_n_f32(acc[i][h], offset, xsum);                      \
                    acc[i][h] = vfmaq_f32(acc[i][h], vcvtq_f32_s32(vsubq_s32(d, sum8)),   \
                                          vmulq_n_f32(scale, sx));                         \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        UNROLL                                                                             \
        for (i = 0; i < mr; i++)                                                           \
            UNROLL                                                                         \
            for (h = 0; h < 4; h++) {                                                      \
                n = g * GROUP + 4 * h;                                                     \
                if (n < w->n)                                                              \
                    esl__store4(y + (m0 + i) * w->n + n, acc[i][h], w->n - n);             \
            }                                                                              \
    }

DEFINE_TILE4_NEON(tile4_neon, 0, )
DEFINE_TILE4_NEON(tile4_dotprod, 1, ESL_TARGET_QMM_DOTPROD)
#endif /* ESL_HAVE_NEON */

/* ---- drivers ---------------------------------------------------------------------------- */

ESL_DEFINE_QMM_DRIVER(rows4_c, tile4_c, , 4, esl_qmm4_weights)
#if ESL_HAVE_AVX2_CODE
ESL_DEFINE_QMM_DRIVER(rows4_avx2, tile4_avx2, ESL_TARGET_QMM_AVX2, 4, esl_qmm4_weights)
ESL_DEFINE_QMM_DRIVER(rows4_vnni, tile4_vnni, ESL_TARGET_QMM_VNNI, 8, esl_qmm4_weights)
#endif
#if ESL_HAVE_NEON
ESL_DEFINE_QMM_DRIVER(rows4_neon, tile4_neon, , 2, esl_qmm4_weights)
ESL_DEFINE_QMM_DRIVER(rows4_dotprod, tile4_dotprod, ESL_TARGET_QMM_DOTPROD, 2, esl_qmm4_weights)
#endif

/* Contract: see qmatmul.h. */
void esl__qmm4_groups(const esl_qmm_act *a, const esl_qmm4_weights *w, int64_t g0,
                      int64_t g1, float *y)
{
    switch (a->level) {
#if ESL_HAVE_AVX2_CODE
    case 2: rows4_vnni(a, w, g0, g1, y); return;
    case 1: rows4_avx2(a, w, g0, g1, y); return;
#endif
#if ESL_HAVE_NEON
    case 2: rows4_dotprod(a, w, g0, g1, y); return;
    case 1: rows4_neon(a, w, g0, g1, y); return;
#endif
    default: rows4_c(a, w, g0, g1, y); return;
    }
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_qmm4_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w,
                        const uint16_t *scales, const uint16_t *mins, int64_t n, float *y)
{
    esl_qmm4_weights wt;
    esl_qmm_act a;
    void *scratch;
    int32_t status = esl__qmm_check(m, k, n, CHUNK);

    if (status != ESL_OK)
        return status;
    if (!x || !w || !scales || !mins || !y)
        return ESL_ERR_ARG;
    if (m == 0)
        return ESL_OK;
    wt.data = w;
    wt.scales = scales;
    wt.mins = mins;
    wt.n = n;
    wt.kp = esl__round_up(k, CHUNK);
    scratch = malloc(esl__qmm_scratch_size(m, wt.kp));
    if (!scratch)
        return ESL_ERR_NOMEM;
    esl__qmm_prepare(&a, scratch, x, m, k, wt.kp, esl_qmm_level());
    esl__qmm4_groups(&a, &wt, 0, (n + GROUP - 1) / GROUP, y);
    free(scratch);
    return ESL_OK;
}
