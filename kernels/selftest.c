/*
 * selftest.c - determinism self-test of the kernel, for native and cross builds.
 *
 * Not part of the library. Samples 3000 pseudo-random cases (vocabularies 1..3000 and
 * 49152, masks, bias, penalties, every filter) and hashes the chosen tokens, status codes
 * and fixed-point masses. Every platform and SIMD level must print the same hash, which
 * also equals ESL_SELFTEST_HASH below (so x86 and aarch64 runs agree with each other and
 * with the numpy reference the x86 build is tested against). No libm in the generator.
 *
 *   SRC="kernels/selftest.c kernels/common.c kernels/sampler.c kernels/kvcache.c"
 *   gcc -O2 -std=c99 -ffp-contract=off -Ikernels $SRC -lm -o selftest && ./selftest
 *   aarch64-linux-gnu-gcc -O2 -std=c99 -ffp-contract=off -static -Ikernels $SRC -lm \
 *       -o selftest-arm64 && qemu-aarch64 ./selftest-arm64
 * Any change to the sampling arithmetic changes the hash: update it together with the
 * numpy reference (tests/test_sampler.py checks both).
 * Exit status 0 when every SIMD level reproduces the pinned hash, 1 otherwise.
 */
#include "edgeslm_kernel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ESL_SELFTEST_HASH UINT64_C(0x5cbb6e6046a362ca)

/* Returns a uniform double in [0, 1) from the generator state g. */
static double esl__st_uniform(uint64_t g[4])
{
    return (double)(esl_rng_next(g) >> 11) * 0x1.0p-53;
}

/* Returns an approximately standard normal value (Irwin-Hall sum of 12 uniforms). */
static double esl__st_normal(uint64_t g[4])
{
    double s = 0.0;
    int i;
    for (i = 0; i < 12; i++)
        s += esl__st_uniform(g);
    return s - 6.0;
}

/* Runs all cases at the current SIMD level and returns their FNV-1a style hash. */
static uint64_t esl__st_run(void)
{
    static const double temps[] = {0.0, 0.3, 0.7, 1.0, 1.5};
    static const double top_ps[] = {1.0, 1.0, 0.95, 0.9, 0.5};
    static const double min_ps[] = {0.0, 0.0, 0.05, 0.2};
    static const int32_t top_ks[] = {0, 0, 1, 40, 50, 3000};
    uint64_t g[4], h = UINT64_C(1469598103934665603);
    int iter;
    esl_rng_seed(g, 12345);
    for (iter = 0; iter < 3000; iter++) {
        int32_t vocab = iter % 50 == 0 ? 49152 : 1 + (int32_t)(esl__st_uniform(g) * 3000);
        int32_t words = (vocab + 31) / 32, i, tok = -1, status, recent[32], bias_ids[2];
        int use_mask;
        float *x = (float *)malloc((size_t)vocab * 4), bias_values[2] = {1.5f, -2.0f};
        uint32_t *q = (uint32_t *)malloc((size_t)vocab * 4);
        uint32_t *mask = (uint32_t *)malloc((size_t)words * 4);
        esl_sampler *s = NULL;
        esl_sampler_params p;
        uint64_t rng[4], z = 0;
        if (!x || !q || !mask || esl_sampler_init(vocab, &s) != ESL_OK) {
            fprintf(stderr, "selftest: out of memory\n");
            exit(2);
        }
        for (i = 0; i < vocab; i++) {
            double v = esl__st_normal(g);
            switch (iter % 4) {
            case 0: x[i] = (float)(v * 2.5); break;
            case 1: x[i] = (float)(v * 0.3); break;
            case 2: x[i] = (float)(int)(v * 2.0); break;
            default: x[i] = esl__st_uniform(g) < 0.3 ? -1.0f / 0.0f : (float)(v * 30.0 - 20.0);
            }
        }
        x[(int32_t)(esl__st_uniform(g) * vocab)] += 10.0f;
        for (i = 0; i < words; i++) { /* two statements: operand order is unspecified */
            mask[i] = (uint32_t)esl_rng_next(g);
            mask[i] |= esl__st_uniform(g) < 0.5 ? 0xFFFFFFFFu : 0u;
        }
        for (i = 0; i < 32; i++)
            recent[i] = (int32_t)(esl__st_uniform(g) * vocab);
        bias_ids[0] = (int32_t)(esl__st_uniform(g) * vocab);
        bias_ids[1] = (int32_t)(esl__st_uniform(g) * vocab);
        p.temperature = temps[(int)(esl__st_uniform(g) * 5)];
        p.top_p = top_ps[(int)(esl__st_uniform(g) * 5)];
        p.min_p = min_ps[(int)(esl__st_uniform(g) * 4)];
        p.repetition_penalty = esl__st_uniform(g) < 0.5 ? 1.0 : 1.3;
        p.frequency_penalty = esl__st_uniform(g) < 0.5 ? 0.0 : 0.5;
        p.presence_penalty = 0.25;
        p.top_k = top_ks[(int)(esl__st_uniform(g) * 6)];
        p.penalty_window = 16;
        esl_rng_seed(rng, (uint64_t)iter);
        if (esl_fixed_softmax(x, vocab, 0.8, q, &z) == ESL_OK)
            for (i = 0; i < vocab; i++)
                h = (h ^ q[i]) * UINT64_C(1099511628211);
        h = (h ^ z) * UINT64_C(1099511628211);
        use_mask = esl__st_uniform(g) < 0.3;
        status = esl_sampler_sample(s, &p, x, use_mask ? mask : NULL, bias_ids, bias_values, 2,
                                    recent, 32, rng, &tok);
        h = (h ^ (uint64_t)(status * 100003 + tok)) * UINT64_C(1099511628211);
        h = (h ^ rng[0]) * UINT64_C(1099511628211);
        esl_sampler_free(s);
        free(x);
        free(q);
        free(mask);
    }
    return h;
}

int main(void)
{
    int level, best = esl_simd_set(99), failed = 0;
    for (level = 0; level <= best; level++) {
        uint64_t h;
        esl_simd_set(level);
        h = esl__st_run();
        printf("simd=%s hash=%016llx %s\n", esl_simd_name(), (unsigned long long)h,
               h == ESL_SELFTEST_HASH ? "ok" : "MISMATCH");
        failed |= h != ESL_SELFTEST_HASH;
    }
    return failed;
}
