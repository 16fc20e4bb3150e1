/*
 * qmatmul.c - int8 block matrix products: y = x @ dequant(w)^T for the linear layers.
 *
 * Weights are int8 in blocks along K, stored interleaved in groups of 16 rows so that
 * one 64-byte load holds 4 consecutive inputs of 16 rows (docs/KERNEL.md):
 *   data    uint8 [n_groups][kp / 4][16][4]: row 16g + r, inputs 4j..4j+3, as q + 128
 *   scales  IEEE half [n_groups][kp / block][16]: w_real = scale * q
 * with kp = K rounded up to the block (32, 64, 128 or 256) and rows past n zero.
 * Activations are quantized per row in chunks of 32 (ESL_QMM_CHUNK), whatever the
 * weight block: scale = max|x| / 127, q = rint(x / scale). Then
 *   y[m][n] = sum over chunks c of sx[m][c] * sw[n][block of c] * dot(qx, qw),
 * the dot products exact in int32. Only the float sum's order differs between levels.
 *
 * Levels: 0 portable C; 1 AVX2 (x86) or NEON (aarch64, ARMv8.0 as the Pi 4's
 * Cortex-A72); 2 AVX-512 VNNI (x86) or NEON with dot-product instructions (ARMv8.2,
 * as the Pi 5's Cortex-A76). One activation row (decode) streams the weights once,
 * several groups at a time; a prompt's rows share each group's weights from L1.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "edgeslm_kernel.h"
#include "esl_internal.h"
#include "qmatmul.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#define CHUNK ESL_QMM_CHUNK
#define GROUP ESL_QMM_GROUP
#define UNITS (CHUNK / 4) /* 4-input units per chunk */
#define UNROLL ESL_UNROLL

/* ---- half precision -------------------------------------------------------------- */

/* Contract: see edgeslm_kernel.h. */
float esl_qmm_half(uint16_t h) { return esl__half(h); }

/* Contract: see edgeslm_kernel.h. */
uint16_t esl_qmm_to_half(float f) { return esl__half_from(f); }

/* ---- levels -------------------------------------------------------------------- */

static int32_t g_level = -1;

/* Returns the best level this CPU supports. */
static int32_t supported_level(void)
{
#if ESL_HAVE_AVX2_CODE
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
#elif ESL_HAVE_NEON && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) ? 2 : 1;
#elif ESL_HAVE_NEON
    return 1;
#else
    return 0;
#endif
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_qmm_level(void)
{
    if (g_level < 0)
        g_level = supported_level();
    return g_level;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_qmm_set_level(int32_t level)
{
    int32_t best = supported_level();
    g_level = level <= 0 ? 0 : (level > best ? best : level);
    return g_level;
}

/* Contract: see edgeslm_kernel.h. */
const char *esl_qmm_name(void)
{
    int32_t level = esl_qmm_level();
    if (level == 0)
        return "c";
#if ESL_HAVE_NEON
    return level == 2 ? "neon-dotprod" : "neon";
#else
    return level == 2 ? "avx512-vnni" : "avx2";
#endif
}

/* ---- activations ------------------------------------------------------------------ */

/* Bytes of one row of each activation array: q, |q|, scales, sums of q, sums of x. */
static void act_sizes(int64_t kp, int64_t sizes[5])
{
    int64_t n_chunks = kp / CHUNK;
    sizes[0] = esl__round_up(kp, 64);
    sizes[1] = esl__round_up(kp, 64);
    sizes[2] = 4 * esl__round_up(n_chunks, 16);
    sizes[3] = 4 * esl__round_up(n_chunks, 16);
    sizes[4] = 4 * esl__round_up(n_chunks, 16);
}

/* Contract: see qmatmul.h. */
size_t esl__qmm_scratch_size(int64_t m, int64_t kp)
{
    int64_t sizes[5], total = 64; /* room to align the start */
    int i;
    act_sizes(kp, sizes);
    for (i = 0; i < 5; i++)
        total += m * sizes[i];
    return (size_t)total;
}

/* Quantizes one chunk of 32 values (zero past `len`), writes q, returns the scale. */
static float quantize_chunk(const float *x, int64_t len, int8_t *q, int32_t *sum)
{
    float amax = 0.0f, scale, inv;
    int finite = 1;
    int32_t total = 0;
    int64_t i;

    for (i = 0; i < len; i++) {
        float v = fabsf(x[i]);
        finite &= v <= FLT_MAX; /* false for NaN and inf */
        amax = v > amax ? v : amax;
    }
    if (!finite) { /* the products become NaN, and no NaN is converted to an integer */
        memset(q, 0, CHUNK);
        *sum = 0;
        return NAN;
    }
    scale = amax / 127.0f;
    inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (i = 0; i < CHUNK; i++) {
        float v = i < len ? rintf(x[i] * inv) : 0.0f;
        q[i] = (int8_t)(v > 127.0f ? 127 : (v < -127.0f ? -127 : v));
        total += q[i];
    }
    *sum = total;
    return scale;
}

/* Contract: see qmatmul.h. */
void esl__qmm_prepare(esl_qmm_act *a, void *scratch, const float *x, int64_t m,
                      int64_t k, int64_t kp, int32_t level)
{
    uintptr_t p = ((uintptr_t)scratch + 63) & ~(uintptr_t)63;
    int64_t sizes[5], n_chunks = kp / CHUNK, r, c, i;

    act_sizes(kp, sizes);
    a->m = m;
    a->k = k;
    a->kp = kp;
    a->level = level;
    a->row = sizes[0];
    a->sx_row = sizes[2] / 4;
    a->q = (int8_t *)p;
    a->absq = (uint8_t *)(p + (uintptr_t)(m * sizes[0]));
    a->sx = (float *)(p + (uintptr_t)(m * (sizes[0] + sizes[1])));
    a->sumq = (int32_t *)(p + (uintptr_t)(m * (sizes[0] + sizes[1] + sizes[2])));
    a->xsum = (float *)(p + (uintptr_t)(m * (sizes[0] + sizes[1] + sizes[2] + sizes[3])));

    for (r = 0; r < m; r++) {
        const float *xr = x + r * k;
        int8_t *q = a->q + r * a->row;
        float *sx = a->sx + r * a->sx_row;
        int32_t *sums = a->sumq + r * a->sx_row;
        float *xsums = a->xsum + r * a->sx_row;

        for (c = 0; c < n_chunks; c++) {
            int64_t start = c * CHUNK, len = k - start;
            int32_t sum;
            len = len < 0 ? 0 : (len > CHUNK ? CHUNK : len);
            sx[c] = quantize_chunk(xr + start, len, q + start, &sum);
            sums[c] = sum;
            xsums[c] = 0.0f;
            for (i = 0; i < len; i++)
                xsums[c] += xr[start + i];
        }
        if (level == 1) {
            uint8_t *absq = a->absq + r * a->row;
            for (i = 0; i < kp; i++)
                absq[i] = (uint8_t)(q[i] < 0 ? -q[i] : q[i]);
        }
    }
}

/* ---- portable C --------------------------------------------------------------------- */

/* Rows [m0, m0 + mr) of y for the 16 weight rows of group g. */
static void tile_c(const esl_qmm_act *a, int64_t m0, int mr, const esl_qmm_weights *w,
                   int64_t g, float *y)
{
    const int64_t kp = a->kp, n_chunks = kp / CHUNK, nb = kp / w->block;
    const uint8_t *wg = w->data + g * kp * GROUP;
    const uint16_t *sg = w->scales + g * nb * GROUP;
    int64_t i, c, j, r, t;

    for (i = m0; i < m0 + mr; i++) {
        const int8_t *q = a->q + i * a->row;
        const float *sx = a->sx + i * a->sx_row;
        float acc[GROUP] = {0};
        for (c = 0; c < n_chunks; c++) {
            const uint16_t *s = sg + (c >> esl__block_shift(w->block)) * GROUP;
            int32_t dot[GROUP] = {0};
            for (j = c * UNITS; j < (c + 1) * UNITS; j++)
                for (r = 0; r < GROUP; r++)
                    for (t = 0; t < 4; t++)
                        dot[r] += (int32_t)q[4 * j + t] *
                                  ((int32_t)wg[(j * GROUP + r) * 4 + t] - 128);
            for (r = 0; r < GROUP; r++)
                acc[r] += (float)dot[r] * (sx[c] * esl__half(s[r]));
        }
        for (r = 0; r < GROUP && g * GROUP + r < w->n; r++)
            y[i * w->n + g * GROUP + r] = acc[r];
    }
}

/* ---- AVX2 and AVX-512 VNNI ---------------------------------------------------------- */

#if ESL_HAVE_AVX2_CODE

/*
 * AVX2 tile: mr activation rows by one group, held as two registers of 8 rows x 4
 * inputs per unit. Signed products through the sign trick: |qx| (unsigned) times
 * qw * sign(qx) (signed) by maddubs, whose int16 pair sums cannot saturate since
 * |q| <= 127; the weights become signed by flipping their top bit (q + 128 -> q).
 */
ESL_TARGET_QMM_AVX2 ESL_ALWAYS_INLINE void tile_avx2(const esl_qmm_act *a, int64_t m0,
                                                 const int mr, const esl_qmm_weights *w,
                                                 int64_t g, float *y)
{
    const int64_t kp = a->kp, n_chunks = kp / CHUNK, nb = kp / w->block;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const uint8_t *wg = w->data + g * kp * GROUP;
    const uint16_t *sg = w->scales + g * nb * GROUP;
    __m256 acc[4][2];
    int64_t c, left;
    int i, h, j;

    UNROLL
    for (i = 0; i < mr; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (c = 0; c < n_chunks; c++) {
        const uint16_t *s = sg + (c >> esl__block_shift(w->block)) * GROUP;
        const __m256 sw0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s));
        const __m256 sw1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8)));
        __m256i ws[UNITS][2];
        UNROLL
        for (j = 0; j < UNITS; j++)
            UNROLL
            for (h = 0; h < 2; h++)
                ws[j][h] = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(wg + c * CHUNK * GROUP + 64 * j +
                                                         32 * h)),
                    flip);
        UNROLL
        for (i = 0; i < mr; i++) {
            const int8_t *q = a->q + (m0 + i) * a->row + c * CHUNK;
            const uint8_t *aq = a->absq + (m0 + i) * a->row + c * CHUNK;
            const __m256 sx = _mm256_set1_ps(a->sx[(m0 + i) * a->sx_row + c]);
            __m256i d0 = _mm256_setzero_si256(), d1 = _mm256_setzero_si256();
            UNROLL
            for (j = 0; j < UNITS; j++) {
                const __m256i xb = _mm256_set1_epi32(esl__load4(q + 4 * j));
                const __m256i ab = _mm256_set1_epi32(esl__load4(aq + 4 * j));
                __m256i p0 = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(ws[j][0], xb));
                __m256i p1 = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(ws[j][1], xb));
                d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(p0, ones));
                d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(p1, ones));
            }
            acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(sw0, sx),
                                        acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(sw1, sx),
                                        acc[i][1]);
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

/*
 * VNNI tile: mr activation rows by one group, one 64-byte register per unit. dpbusd
 * multiplies the unsigned weight bytes (q + 128) by 4 broadcast activations and adds
 * to its accumulator, which starts at -128 * (the chunk's activation sum) so the +128
 * cancels exactly. With fewer than 4 rows each chunk's chain is split in two, so that
 * consecutive dpbusd do not wait on each other.
 */
ESL_TARGET_QMM_VNNI ESL_ALWAYS_INLINE void tile_vnni(const esl_qmm_act *a, int64_t m0,
                                                 const int mr, const esl_qmm_weights *w,
                                                 int64_t g, float *y)
{
    const int64_t kp = a->kp, n_chunks = kp / CHUNK, nb = kp / w->block;
    const int split = mr < 4;
    const uint8_t *wg = w->data + g * kp * GROUP;
    const uint16_t *sg = w->scales + g * nb * GROUP;
    __m512 acc[8];
    int64_t c, left;
    int i, j;

    UNROLL
    for (i = 0; i < mr; i++)
        acc[i] = _mm512_setzero_ps();
    for (c = 0; c < n_chunks; c++) {
        const uint16_t *s = sg + (c >> esl__block_shift(w->block)) * GROUP;
        const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
        __m512i wv[UNITS];
        UNROLL
        for (j = 0; j < UNITS; j++)
            wv[j] = _mm512_loadu_si512(wg + c * CHUNK * GROUP + 64 * j);
        UNROLL
        for (i = 0; i < mr; i++) {
            const int64_t row = m0 + i;
            const int8_t *q = a->q + row * a->row + c * CHUNK;
            __m512i d0 = _mm512_set1_epi32(-128 * a->sumq[row * a->sx_row + c]);
            __m512i d1 = _mm512_setzero_si512();
            UNROLL
            for (j = 0; j < UNITS; j++) {
                const __m512i xb = _mm512_set1_epi32(esl__load4(q + 4 * j));
                if (split && (j & 1))
                    d1 = _mm512_dpbusd_epi32(d1, wv[j], xb);
                else
                    d0 = _mm512_dpbusd_epi32(d0, wv[j], xb);
            }
            if (split)
                d0 = _mm512_add_epi32(d0, d1);
            acc[i] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(d0),
                _mm512_mul_ps(sw, _mm512_set1_ps(a->sx[row * a->sx_row + c])), acc[i]);
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

/* The 16 weight bytes at P (4 rows x 4 inputs), made signed: q + 128 -> q. */
#define WEIGHT_QUAD(P) vreinterpretq_s8_u8(veorq_u8(vld1q_u8(P), vdupq_n_u8(0x80)))

/*
 * Four units (j .. j + 3) of one quad: D[r] += dot(row r, inputs 4(j + u) .. + 3) for
 * u = 0..3, where W points at unit j's quad and X16 holds the 16 inputs. DOT4_1 uses
 * the by-lane dot product (ARMv8.2); DOT4_0 repeats each unit's 4 inputs across a
 * register and multiplies out (ARMv8.0).
 */
#define DOT4_1(D, W, X16)                                                                  \
    do {                                                                                   \
        D = vdotq_laneq_s32(D, WEIGHT_QUAD(W), X16, 0);                                    \
        D = vdotq_laneq_s32(D, WEIGHT_QUAD((W) + 64), X16, 1);                             \
        D = vdotq_laneq_s32(D, WEIGHT_QUAD((W) + 128), X16, 2);                            \
        D = vdotq_laneq_s32(D, WEIGHT_QUAD((W) + 192), X16, 3);                            \
    } while (0)
#define DOT4_0(D, W, X16)                                                                  \
    do {                                                                                   \
        D = esl__dot4_neon(D, WEIGHT_QUAD(W), ESL_REPEAT4(X16, 0));                        \
        D = esl__dot4_neon(D, WEIGHT_QUAD((W) + 64), ESL_REPEAT4(X16, 1));                 \
        D = esl__dot4_neon(D, WEIGHT_QUAD((W) + 128), ESL_REPEAT4(X16, 2));                \
        D = esl__dot4_neon(D, WEIGHT_QUAD((W) + 192), ESL_REPEAT4(X16, 3));                \
    } while (0)

/*
 * NEON tile: mr activation rows by one group, as 4 quads of 4 rows. DOTPROD (0 or 1)
 * picks DOT4_0 or DOT4_1; TARGET enables the instructions it needs.
 */
#define DEFINE_TILE_NEON(NAME, DOTPROD, TARGET)                                            \
    TARGET ESL_ALWAYS_INLINE void NAME(const esl_qmm_act *a, int64_t m0, const int mr,         \
                                   const esl_qmm_weights *w, int64_t g, float *y)          \
    {                                                                                      \
        const int64_t kp = a->kp, n_chunks = kp / CHUNK, nb = kp / w->block;               \
        const uint8_t *wg = w->data + g * kp * GROUP;                                      \
        const __fp16 *sg = (const __fp16 *)w->scales + g * nb * GROUP;                     \
        float32x4_t acc[2][4];                                                             \
        int64_t c, n;                                                                      \
        int i, h, j;                                                                       \
        UNROLL                                                                             \
        for (i = 0; i < mr; i++)                                                           \
            UNROLL                                                                         \
            for (h = 0; h < 4; h++)                                                        \
                acc[i][h] = vdupq_n_f32(0.0f);                                             \
        for (c = 0; c < n_chunks; c++) {                                                   \
            const __fp16 *s = sg + (c >> esl__block_shift(w->block)) * GROUP;                   \
            const uint8_t *wc = wg + c * CHUNK * GROUP;                                    \
            UNROLL                                                                         \
            for (i = 0; i < mr; i++) {                                                     \
                const int8_t *q = a->q + (m0 + i) * a->row + c * CHUNK;                    \
                const float sx = a->sx[(m0 + i) * a->sx_row + c];                          \
                int32x4_t d[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0),          \
                                  vdupq_n_s32(0)};                                         \
                UNROLL                                                                     \
                for (j = 0; j < UNITS; j += 4) {                                           \
                    const int8x16_t x16 = vld1q_s8(q + 4 * j);                             \
                    UNROLL                                                                 \
                    for (h = 0; h < 4; h++)                                                \
                        DOT4_##DOTPROD(d[h], wc + 64 * j + 16 * h, x16);                   \
                }                                                                          \
                UNROLL                                                                     \
                for (h = 0; h < 4; h++) {                                                  \
                    float32x4_t sw = vcvt_f32_f16(vld1_f16(s + 4 * h));                    \
                    acc[i][h] = vfmaq_f32(acc[i][h], vcvtq_f32_s32(d[h]),                  \
                                          vmulq_n_f32(sw, sx));                            \
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

DEFINE_TILE_NEON(tile_neon, 0, )
DEFINE_TILE_NEON(tile_dotprod, 1, ESL_TARGET_QMM_DOTPROD)
#endif /* ESL_HAVE_NEON */

/* ---- drivers ---------------------------------------------------------------------------- */

ESL_DEFINE_QMM_DRIVER(rows_c, tile_c, , 4, esl_qmm_weights)
#if ESL_HAVE_AVX2_CODE
ESL_DEFINE_QMM_DRIVER(rows_avx2, tile_avx2, ESL_TARGET_QMM_AVX2, 4, esl_qmm_weights)
ESL_DEFINE_QMM_DRIVER(rows_vnni, tile_vnni, ESL_TARGET_QMM_VNNI, 8, esl_qmm_weights)
#endif
#if ESL_HAVE_NEON
ESL_DEFINE_QMM_DRIVER(rows_neon, tile_neon, , 2, esl_qmm_weights)
ESL_DEFINE_QMM_DRIVER(rows_dotprod, tile_dotprod, ESL_TARGET_QMM_DOTPROD, 2, esl_qmm_weights)
#endif

/* Contract: see qmatmul.h. */
void esl__qmm_groups(const esl_qmm_act *a, const esl_qmm_weights *w, int64_t g0,
                     int64_t g1, float *y)
{
    switch (a->level) {
#if ESL_HAVE_AVX2_CODE
    case 2: rows_vnni(a, w, g0, g1, y); return;
    case 1: rows_avx2(a, w, g0, g1, y); return;
#endif
#if ESL_HAVE_NEON
    case 2: rows_dotprod(a, w, g0, g1, y); return;
    case 1: rows_neon(a, w, g0, g1, y); return;
#endif
    default: rows_c(a, w, g0, g1, y); return;
    }
}

/* Contract: see qmatmul.h. */
int32_t esl__qmm_check(int64_t m, int64_t k, int64_t n, int64_t block)
{
    if (m < 0 || k < 1 || n < 1 || k > (INT64_C(1) << 24) || n > (INT64_C(1) << 24))
        return ESL_ERR_ARG;
    if (block != 32 && block != 64 && block != 128 && block != 256)
        return ESL_ERR_ARG;
    return ESL_OK;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_qmm_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w,
                       const uint16_t *scales, int64_t n, int64_t block, float *y)
{
    esl_qmm_weights wt;
    esl_qmm_act a;
    void *scratch;
    int32_t status = esl__qmm_check(m, k, n, block);

    if (status != ESL_OK)
        return status;
    if (!x || !w || !scales || !y)
        return ESL_ERR_ARG;
    if (m == 0)
        return ESL_OK;
    wt.data = w;
    wt.scales = scales;
    wt.n = n;
    wt.block = block;
    wt.kp = esl__round_up(k, block);
    scratch = malloc(esl__qmm_scratch_size(m, wt.kp));
    if (!scratch)
        return ESL_ERR_NOMEM;
    esl__qmm_prepare(&a, scratch, x, m, k, wt.kp, esl_qmm_level());
    esl__qmm_groups(&a, &wt, 0, (n + GROUP - 1) / GROUP, y);
    free(scratch);
    return ESL_OK;
}
