/*
 * common.c - status strings, ABI version, SIMD level selection, the PRNG and the
 * IEEE half conversions.
 */
#include <math.h>
#include <string.h>

#include "edgeslm_kernel.h"
#include "esl_internal.h"

/* Contract: see edgeslm_kernel.h. */
const char *esl_strerror(int32_t status)
{
    switch (status) {
    case ESL_OK: return "success";
    case ESL_ERR_ARG: return "invalid argument";
    case ESL_ERR_NOMEM: return "out of memory";
    case ESL_ERR_NONFINITE: return "logits contain NaN or +inf";
    case ESL_ERR_ALL_MASKED: return "every token is masked out";
    case ESL_ERR_TOKEN_RANGE: return "token id outside the vocabulary";
    case ESL_ERR_IO: return "I/O error";
    case ESL_ERR_BAD_MAGIC: return "not an edgeslm KV-cache file (bad magic)";
    case ESL_ERR_BAD_VERSION: return "unsupported KV-cache file version";
    case ESL_ERR_BAD_HEADER: return "corrupt KV-cache header";
    case ESL_ERR_TRUNCATED: return "KV-cache file is truncated";
    case ESL_ERR_CHECKSUM: return "KV-cache payload checksum mismatch";
    case ESL_ERR_TRAILING: return "unexpected bytes after the end of the KV-cache file";
    case ESL_ERR_MISMATCH: return "KV-cache geometry does not match the destination";
    default: return "unknown status";
    }
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_abi_version(void) { return ESL_ABI_VERSION; }

/* -1 = not yet detected. Written by esl__simd on first use or by esl_simd_set. */
static int32_t g_simd_level = -1;

/* Returns the highest SIMD level this CPU supports (see esl_simd_level). */
static int32_t esl__simd_supported(void)
{
#if ESL_HAVE_AVX2_CODE
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#elif ESL_HAVE_NEON
    return 1;
#else
    return 0;
#endif
}

/* Contract: see esl_internal.h. */
int32_t esl__simd(void)
{
    if (g_simd_level < 0)
        g_simd_level = esl__simd_supported();
    return g_simd_level;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_simd_level(void) { return esl__simd(); }

/* Contract: see edgeslm_kernel.h. */
int32_t esl_simd_set(int32_t level)
{
    int32_t best = esl__simd_supported();
    g_simd_level = level <= 0 ? 0 : (level > best ? best : level);
    return g_simd_level;
}

/* Contract: see edgeslm_kernel.h. */
const char *esl_simd_name(void)
{
    if (esl__simd() == 0)
        return "c";
#if ESL_HAVE_NEON
    return "neon";
#else
    return "avx2";
#endif
}

/* splitmix64 step: advances *x and returns a well-mixed 64-bit value. */
static uint64_t esl__splitmix64(uint64_t *x)
{
    uint64_t z = (*x += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Contract: see edgeslm_kernel.h. */
void esl_rng_seed(uint64_t state[4], uint64_t seed)
{
    uint64_t x = seed;
    int i;
    for (i = 0; i < 4; i++)
        state[i] = esl__splitmix64(&x);
}

static uint64_t esl__rotl64(uint64_t v, int k) { return (v << k) | (v >> (64 - k)); }

/* Contract: see edgeslm_kernel.h. */
uint64_t esl_rng_next(uint64_t state[4])
{
    uint64_t out = esl__rotl64(state[1] * 5, 7) * 9;
    uint64_t t = state[1] << 17;
    state[2] ^= state[0];
    state[3] ^= state[1];
    state[1] ^= state[2];
    state[0] ^= state[3];
    state[2] ^= t;
    state[3] = esl__rotl64(state[3], 45);
    return out;
}

/* Contract: see esl_internal.h. */
uint64_t esl__mulhi64(uint64_t a, uint64_t b)
{
    uint64_t a_lo = a & 0xFFFFFFFFu, a_hi = a >> 32;
    uint64_t b_lo = b & 0xFFFFFFFFu, b_hi = b >> 32;
    uint64_t ll = a_lo * b_lo, lh = a_lo * b_hi, hl = a_hi * b_lo, hh = a_hi * b_hi;
    uint64_t mid = (ll >> 32) + (lh & 0xFFFFFFFFu) + (hl & 0xFFFFFFFFu);
    return hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
}

/* ---- half precision -------------------------------------------------------------- */

/* Contract: see esl_internal.h. */
float esl__half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    float f;

    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13); /* inf or NaN */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
    } else if (man != 0) {
        int e = -1; /* subnormal: shift the mantissa up to its leading one */
        do {
            man <<= 1;
            e++;
        } while ((man & 0x400u) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    } else {
        bits = sign; /* zero */
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Contract: see esl_internal.h. */
uint16_t esl__half_from(float f)
{
    uint32_t x, ax, sign, h, rest;
    memcpy(&x, &f, sizeof x);
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u)
        return (uint16_t)(sign | 0x7E00u); /* NaN: a quiet NaN */
    if (ax >= 0x477FF000u)
        return (uint16_t)(sign | 0x7C00u); /* 65520 and up (and inf): infinity */
    if (ax < 0x38800000u) {
        /* Below 2^-14: a multiple of 2^-24 (subnormal, or the smallest normal when it
         * rounds up to 1024 of them). Scaling by 2^24 is exact; rintf rounds to even. */
        return (uint16_t)(sign | (uint32_t)rintf(fabsf(f) * 16777216.0f));
    }
    /* Normal: rebias the exponent (127 -> 15), round 23 mantissa bits to 10, to even
     * (a carry into the exponent is the right result). */
    h = (ax - 0x38000000u) >> 13;
    rest = ax & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}
