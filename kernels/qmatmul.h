/*
 * qmatmul.h - the int8 block matmul's internals, shared by qmatmul.c and ort_op.c only.
 *
 * A product is two steps: esl__qmm_prepare quantizes the activations once (one thread),
 * then esl__qmm_groups computes any range of 16-row weight groups for every activation
 * row, so callers split the groups between threads. Neither step allocates.
 */
#ifndef ESL_QMATMUL_H
#define ESL_QMATMUL_H

#include <stddef.h>
#include <stdint.h>

/* Activations are quantized in chunks of this many values, whatever the weight block. */
#define ESL_QMM_CHUNK 32
/* Weight rows are interleaved in groups of this many (see qmatmul.c). */
#define ESL_QMM_GROUP 16

/* Block-quantized, interleaved weights, borrowed: layout at the top of qmatmul.c. */
typedef struct esl_qmm_weights {
    const uint8_t *data;    /* [n_groups][kp / 4][16][4] uint8, q + 128 */
    const uint16_t *scales; /* [n_groups][kp / block][16] IEEE half */
    int64_t n;              /* output columns (real weight rows); y's row stride */
    int64_t kp;             /* input width rounded up to the block */
    int64_t block;          /* 32, 64, 128 or 256 */
} esl_qmm_weights;

/* Quantized activations of m rows, in caller-owned scratch (esl__qmm_scratch_size). */
typedef struct esl_qmm_act {
    int64_t m, k, kp;  /* rows, input width, width padded to the weight block */
    int64_t row;       /* bytes between rows of q and absq (a multiple of 64) */
    int64_t sx_row;    /* entries between rows of sx and negcorr */
    int32_t level;     /* SIMD level the arrays were prepared for */
    int8_t *q;         /* [m][row] int8 values, zero past k */
    uint8_t *absq;     /* [m][row] |q| (level 1 on x86 only) */
    float *sx;         /* [m][sx_row] one scale per chunk (NaN for a non-finite chunk) */
    int32_t *negcorr;  /* [m][sx_row] -128 * the chunk's sum of q */
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

/* Returns ESL_OK when the sizes are ones the kernel handles, else ESL_ERR_ARG. */
int32_t esl__qmm_check(int64_t m, int64_t k, int64_t n, int64_t block);

#endif /* ESL_QMATMUL_H */
