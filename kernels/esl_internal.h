/*
 * esl_internal.h - shared by the kernel's .c files only; not part of the public API.
 */
#ifndef ESL_INTERNAL_H
#define ESL_INTERNAL_H

#include <float.h>
#include <stdint.h>

/* The determinism contract needs plain IEEE single/double evaluation (no x87 excess). */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "edgeslm kernel needs FLT_EVAL_METHOD == 0 (SSE2 or NEON floating point)"
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define ESL_HAVE_AVX2_CODE 1
#include <immintrin.h>
#define ESL_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define ESL_HAVE_AVX2_CODE 0
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#define ESL_HAVE_NEON 1
#include <arm_neon.h>
#else
#define ESL_HAVE_NEON 0
#endif

/* Returns the SIMD level in use (detected on first call); see esl_simd_level. */
int32_t esl__simd(void);

/* y[c] = silu(gate[c]) * up[c] for c < count, the same bits on every CPU (swiglu.c). */
void esl__silu_times(const float *gate, const float *up, float *y, int64_t count);

/* Returns the float value of an IEEE binary16 bit pattern (exact; NaN stays NaN). */
float esl__half(uint16_t h);

/* Returns the IEEE binary16 nearest to f, ties to even (NaN: the canonical quiet NaN;
 * beyond the largest half, infinity). Bit for bit what F16C's and NEON's conversions
 * give for every float but NaN, whose payload they keep. */
uint16_t esl__half_from(float f);

/* Returns the high 64 bits of the 128-bit product a * b (portable, no __int128). */
uint64_t esl__mulhi64(uint64_t a, uint64_t b);

#endif /* ESL_INTERNAL_H */
