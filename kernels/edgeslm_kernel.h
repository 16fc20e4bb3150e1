/*
 * edgeslm_kernel.h - the per-token C kernel of edgeslm: sampler, PRNG and KV-cache ops.
 *
 * A plain shared library (no Python C-API); edgeslm/_kernel.py loads it with ctypes.
 * Every function returns an esl_status (int32_t) unless it cannot fail. Nothing on the
 * per-token path allocates: the sampler owns scratch sized at esl_sampler_init, the
 * KV-cache functions work on caller-owned buffers.
 *
 * Determinism contract: for the same inputs the sampler picks the same token as the numpy
 * reference in edgeslm/sampling.py on every platform and SIMD level. All float arithmetic
 * is single IEEE operations (built with -ffp-contract=off, no fast-math), probabilities
 * are 30-bit fixed point summed in integers, and the PRNG is xoshiro256** seeded by
 * splitmix64. docs/SAMPLING.md describes the arithmetic.
 */
#ifndef EDGESLM_KERNEL_H
#define EDGESLM_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ESL_API __declspec(dllexport)
#else
#define ESL_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature or struct layout below changes; _kernel.py checks it. */
#define ESL_ABI_VERSION 4

/* Status codes. Keep in sync with _STATUS in edgeslm/_kernel.py. */
typedef enum esl_status {
    ESL_OK = 0,
    ESL_ERR_ARG = 1,          /* NULL pointer or a parameter outside its range */
    ESL_ERR_NOMEM = 2,        /* allocation failed (only in *_init) */
    ESL_ERR_NONFINITE = 3,    /* logits hold NaN or +inf after mask, bias and penalties */
    ESL_ERR_ALL_MASKED = 4,   /* no token has a finite logit */
    ESL_ERR_TOKEN_RANGE = 5,  /* a token id (recent tokens, bias ids) is outside [0, vocab) */
    ESL_ERR_IO = 6,           /* open, read, write or close failed; errno says why */
    ESL_ERR_BAD_MAGIC = 7,    /* file does not start with the KV-cache magic */
    ESL_ERR_BAD_VERSION = 8,  /* file format version is not one this build reads */
    ESL_ERR_BAD_HEADER = 9,   /* header checksum or fields are invalid */
    ESL_ERR_TRUNCATED = 10,   /* file ends before the size its header announces */
    ESL_ERR_CHECKSUM = 11,    /* payload checksum mismatch */
    ESL_ERR_TRAILING = 12,    /* bytes after the announced end of the file */
    ESL_ERR_MISMATCH = 13     /* file dimensions differ from the destination cache */
} esl_status;

/* Returns a static, NUL-terminated English description of `status` (never NULL). */
ESL_API const char *esl_strerror(int32_t status);

/* Returns ESL_ABI_VERSION as compiled into the library. */
ESL_API int32_t esl_abi_version(void);

/*
 * SIMD level used by functions that dispatch at run time: 0 = portable C, 1 = AVX2 (x86)
 * or NEON (aarch64). esl_simd_level() returns the level in use; esl_simd_set() requests
 * one, clamped to what the CPU supports, and returns the level now in use. Results are
 * bit-identical at every level; the setter exists so tests can prove it. Not thread-safe
 * against concurrent sampling (it is a process-wide setting).
 */
ESL_API int32_t esl_simd_level(void);
ESL_API int32_t esl_simd_set(int32_t level);
/* Returns "avx2", "neon" or "c" for the level in use (static string). */
ESL_API const char *esl_simd_name(void);

/* ---- PRNG: xoshiro256** with splitmix64 seeding; state is 4 caller-owned uint64. ---- */

/* Fills state[0..3] from `seed` with splitmix64. state must not be NULL. */
ESL_API void esl_rng_seed(uint64_t state[4], uint64_t seed);

/* Advances state by one step and returns the next 64-bit output. */
ESL_API uint64_t esl_rng_next(uint64_t state[4]);

/* ---- Sampler ---- */

/* Settings of one sampling call; the Python SamplerSettings validates them first. */
typedef struct esl_sampler_params {
    double temperature;        /* >= 0; 0 = greedy argmax (no PRNG draw) */
    double top_p;              /* (0, 1]; 1 = off */
    double min_p;              /* [0, 1]; 0 = off */
    double repetition_penalty; /* > 0; 1 = off; positive logits divided, negative multiplied */
    double frequency_penalty;  /* subtracted once per occurrence in the penalty window */
    double presence_penalty;   /* subtracted once if the token occurs in the window */
    int32_t top_k;             /* >= 0; 0 = off */
    int32_t penalty_window;    /* >= 0; the last N of `recent`; 0 = all of `recent` */
} esl_sampler_params;

typedef struct esl_sampler esl_sampler;

/*
 * Allocates a sampler with all scratch for `vocab_size` tokens (1 <= vocab_size <= 2^22)
 * and stores it in *out. The caller owns it and releases it with esl_sampler_free.
 * Returns ESL_OK, ESL_ERR_ARG or ESL_ERR_NOMEM (then *out is NULL).
 */
ESL_API int32_t esl_sampler_init(int32_t vocab_size, esl_sampler **out);

/* Releases a sampler from esl_sampler_init; NULL is a no-op. */
ESL_API void esl_sampler_free(esl_sampler *s);

/* Returns the vocabulary size the sampler was made for (0 for NULL). */
ESL_API int32_t esl_sampler_vocab(const esl_sampler *s);

/*
 * Picks one token from `logits` (vocab_size float32, modified in place: masked entries
 * become -inf, bias and penalties are applied). Steps: mask, bias, penalties, then greedy
 * argmax if temperature == 0, else temperature, top-k, softmax, top-p, min-p,
 * renormalize, one draw from `rng` (advanced by exactly one step).
 *   mask        NULL or ceil(vocab/32) words; bit i%32 of word i/32 set = token i allowed.
 *   bias_ids    n_bias token ids, bias_values n_bias float32 added to those logits in order.
 *   recent      n_recent token ids, oldest first; the penalties use the last window.
 * All pointers are borrowed for the call only. Writes the token to *out_token and returns
 * ESL_OK, or returns an error (ESL_ERR_NONFINITE, ESL_ERR_ALL_MASKED, ESL_ERR_TOKEN_RANGE,
 * ESL_ERR_ARG) with *out_token = -1; logits may then be partly modified, rng is untouched.
 */
ESL_API int32_t esl_sampler_sample(esl_sampler *s, const esl_sampler_params *params,
                                   float *logits, const uint32_t *mask,
                                   const int32_t *bias_ids, const float *bias_values,
                                   int32_t n_bias, const int32_t *recent, int32_t n_recent,
                                   uint64_t rng[4], int32_t *out_token);

/*
 * Computes the fixed-point softmax masses the sampler draws from, for tests and tools (not
 * on the per-token path): q[i] = rint(exp2(max((x[i] - max) * c, -32)) * 2^30) with
 * c = (float)(log2(e) / temperature), using the same SIMD code as sampling. `logits` (n
 * floats, finite or -inf) is borrowed; q (n uint32) and *z (exact sum) are written.
 * Returns ESL_OK, ESL_ERR_ARG, ESL_ERR_NONFINITE or ESL_ERR_ALL_MASKED.
 */
ESL_API int32_t esl_fixed_softmax(const float *logits, int32_t n, double temperature,
                                  uint32_t *q, uint64_t *z);

/* ---- KV cache ---- */

/*
 * Geometry of a cache buffer: [n_layers][2][n_kv_heads][max_seq_len][head_dim] float32,
 * or IEEE half (uint16) when `half` is 1; index 0 of the second axis = keys (stored
 * after RoPE), 1 = values. rotary_dim == 0 means no rotary embedding (learned
 * positions); otherwise it is even and <= head_dim.
 */
typedef struct esl_kv_desc {
    int32_t n_layers;
    int32_t n_kv_heads;
    int32_t max_seq_len;
    int32_t head_dim;
    int32_t rotary_dim;
    int32_t length;      /* valid positions [0, length) */
    double rope_theta;   /* 0 when rotary_dim == 0 */
    int32_t half;        /* 0: float32 values (the default), 1: IEEE halves */
} esl_kv_desc;

/*
 * Drops positions [keep, keep + drop) of every layer and head of `data` (caller-owned,
 * laid out as `desc`), moves positions [keep + drop, length) down by `drop`, and when
 * rotary_dim > 0 re-rotates the moved keys by -drop positions using `cos_sin`: rotary_dim/2
 * pairs (cos, sin) of the angle -drop * theta^(-2i/rotary_dim), computed by the caller.
 * Does not change desc->length (the caller subtracts drop). Positions past the new length
 * keep stale data. Returns ESL_OK or ESL_ERR_ARG.
 */
ESL_API int32_t esl_kv_shift(const esl_kv_desc *desc, void *data, int32_t keep, int32_t drop,
                             const double *cos_sin);

/*
 * Writes the valid prefix of `data` and `n_tokens` tokens to the file `path` (replaced)
 * in the edgeslm KV-cache format (docs/KERNEL.md). Returns ESL_OK, ESL_ERR_ARG or
 * ESL_ERR_IO (a partial file may remain).
 */
ESL_API int32_t esl_kv_save(const char *path, const esl_kv_desc *desc, const void *data,
                            const int32_t *tokens, int64_t n_tokens);

/*
 * Reads and checks the header of the file `path`; fills *desc and *n_tokens. The caller
 * then allocates buffers of that geometry and calls esl_kv_load. Returns ESL_OK,
 * ESL_ERR_IO, ESL_ERR_BAD_MAGIC, ESL_ERR_BAD_VERSION, ESL_ERR_BAD_HEADER,
 * ESL_ERR_TRUNCATED or ESL_ERR_TRAILING (the file size is checked against the header).
 */
ESL_API int32_t esl_kv_read_header(const char *path, esl_kv_desc *desc, int64_t *n_tokens);

/*
 * Reads the file `path` into caller-owned `data` (geometry `desc`, which must equal the
 * file's except that max_seq_len may be larger, else ESL_ERR_MISMATCH) and `tokens`
 * (room for n_tokens, which must equal the file's). Positions past the file's length
 * are left untouched. Returns ESL_OK or any status of esl_kv_read_header plus
 * ESL_ERR_CHECKSUM and ESL_ERR_MISMATCH.
 */
ESL_API int32_t esl_kv_load(const char *path, const esl_kv_desc *desc, void *data,
                            int32_t *tokens, int64_t n_tokens);

/* ---- int8 block matmul (qmatmul.c) ---- */

/*
 * SIMD level of the matmul, chosen at run time apart from the sampler's (its results
 * are not bit-identical across levels: only the order of the float sums differs): 0 =
 * portable C, 1 = AVX2 or NEON, 2 = AVX-512 VNNI or NEON dot product. esl_qmm_set_level
 * clamps a request to what the CPU supports and returns the level now in use (a
 * process-wide setting, for tests and benchmarks; not thread-safe against running
 * products). esl_qmm_name returns "c", "avx2", "avx512-vnni", "neon" or "neon-dotprod".
 */
ESL_API int32_t esl_qmm_level(void);
ESL_API int32_t esl_qmm_set_level(int32_t level);
ESL_API const char *esl_qmm_name(void);

/*
 * y = x @ dequant(w)^T on one thread, for tests and tools (the model runs it as an
 * onnxruntime operator, see ort_op.c). x is [m][k] float32; w holds the weights in
 * groups of 16 rows, uint8 [ceil(n / 16)][kp / 4][16][4] (q + 128, zero rows past n),
 * and scales IEEE half [ceil(n / 16)][kp / block][16], kp = k rounded up to the block
 * (32, 64, 128 or 256); y is [m][n] float32. The activations are quantized to int8 in
 * chunks of 32 first (docs/KERNEL.md). All pointers are borrowed. Returns ESL_OK, ESL_ERR_ARG or
 * ESL_ERR_NOMEM (the scratch for the quantized activations is allocated per call).
 */
ESL_API int32_t esl_qmm_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w,
                               const uint16_t *scales, int64_t n, int64_t block, float *y);

/*
 * The same for 4-bit blocks of 32 (w = scale * q + min, q in 0..15: GGUF's Q4_1), laid
 * out by qmatmul4.c: w uint8 [ceil(n / 16)][kp / 32][4][16][4] nibble pairs, scales and
 * mins IEEE half [ceil(n / 16)][kp / 32][16], kp = k rounded up to 32. Same returns.
 */
ESL_API int32_t esl_qmm4_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w,
                                const uint16_t *scales, const uint16_t *mins, int64_t n,
                                float *y);

/* Returns the float value of the IEEE half `h`, as the portable path converts it. */
ESL_API float esl_qmm_half(uint16_t h);

/* Returns the IEEE binary16 nearest to f, ties to even (as numpy's astype(float16)); a
 * NaN becomes a quiet NaN. For tests of the KV cache's half-precision form. */
ESL_API uint16_t esl_qmm_to_half(float f);

/* h[i] = esl_qmm_to_half(x[i]) for i < n, by the vector routine CachedAttention stores
 * new keys and values with at the current esl_qmm_level (F16C, NEON's fcvtn or the
 * scalar form). For tests. */
ESL_API void esl_attn_to_half(uint16_t *h, const float *x, int64_t n);

/*
 * y[c] = silu(gate[c]) * up[c] = gate[c] / (1 + e^-gate[c]) * up[c] for c < count: the
 * epilogue of MatMulQ8/MatMulQ4 with activation 1 (ort_op.c), for tests. `simd` 0 runs
 * the scalar form, anything else the SSE2 or NEON one where there is one; both give the
 * same bits. Pointers are borrowed; y may not overlap the inputs.
 */
ESL_API void esl_swiglu(const float *gate, const float *up, float *y, int64_t count,
                        int32_t simd);

#ifdef __cplusplus
}
#endif

#endif /* EDGESLM_KERNEL_H */
