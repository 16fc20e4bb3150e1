/*
 * attention.h - causal attention over the KV cache (attention.c), shared with
 * ort_op.c only. A call is two steps: esl__attn_store writes the new tokens' keys
 * (rotated) and values into the cache (one thread), then esl__attn_head computes one
 * head's output for a range of the new rows, so callers split heads and rows between
 * threads. Neither step allocates.
 */
#ifndef ESL_ATTENTION_H
#define ESL_ATTENTION_H

#include <stdint.h>

/* Longest head the per-row query buffer holds. */
#define ESL_ATTN_MAX_HEAD_DIM 256

/* One attention call: sizes and where the new tokens are. */
typedef struct esl_attn_desc {
    int64_t n_heads, n_kv_heads, head_dim;
    int64_t max_seq; /* positions the cache holds */
    int64_t s;       /* new tokens */
    int64_t total;   /* cache length after them: they are at total - s .. total - 1 */
    float scale;     /* score scale, usually 1 / sqrt(head_dim) */
    int32_t kv_half; /* the cache holds IEEE halves (uint16) instead of float32 */
} esl_attn_desc;

/* Returns ESL_OK when the sizes are consistent, else ESL_ERR_ARG. */
int32_t esl__attn_check(const esl_attn_desc *d);

/*
 * Writes the new keys and values of qkv ([s][(n_heads + 2 n_kv_heads) head_dim]) into
 * keys and values ([n_kv_heads][max_seq][head_dim], float32 or, with kv_half, halves
 * rounded to nearest even); keys are rotated (in float) when cos_t and sin_t
 * ([max_seq][head_dim / 2]) are given (NULL: no rotary embedding).
 */
void esl__attn_store(const esl_attn_desc *d, const float *qkv, const float *cos_t,
                     const float *sin_t, void *keys, void *values);

/*
 * Head h's attention for new rows [row0, row1), into out ([s][n_heads][head_dim]).
 * scores is scratch for `total` floats, used by this call only.
 */
void esl__attn_head(const esl_attn_desc *d, const float *qkv, const float *cos_t,
                    const float *sin_t, const void *keys, const void *values, int64_t h,
                    int64_t row0, int64_t row1, float *scores, float *out);

#endif /* ESL_ATTENTION_H */
