/*
 * ort_embed.c - rows of an int8 table kept in MatMulQ8's layout: the token embedding
 * of a model whose output projection shares the table (tied weights).
 *
 *   ai.edgeslm::GatherQ8(ids, B, scales) -> Y       attributes K, N, block_size
 *     ids     int64 [...], each in [0, N)
 *     B       uint8 [ceil(N / 16), kp / 4, 16, 4]  (as MatMulQ8's B; qmatmul.c)
 *     scales  float16 [ceil(N / 16), kp / block_size, 16]
 *     Y       float32 [..., K]: Y[..., j] = (B's byte of row id, input j - 128) * scale
 *
 * One node instead of the twenty-odd Gather, Expand, Cast and Reshape ops that pick
 * a row out of a 16-row group in standard ONNX, with the same float operations
 * (a byte minus 128, times its block's scale), so the same bits. A token costs K
 * bytes and K / block_size scales; one thread does all rows.
 */
#include <stdint.h>
#include <stdlib.h>

#include "edgeslm_kernel.h"
#include "esl_internal.h"
#include "ort_util.h"
#include "qmatmul.h"

#define OP_NAME "GatherQ8"
#define fail(...) esl__ort_fail(OP_NAME, __VA_ARGS__)

typedef struct embed_kernel {
    int64_t k, n, block, kp;
} embed_kernel;

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                const OrtKernelInfo *info, void **out)
{
    esl_ort_attr_int64_fn attr = ESL_ORT_SLOT(api, ESL_ORT_KernelInfoGetAttribute_int64,
                                              esl_ort_attr_int64_fn);
    embed_kernel *kn;
    OrtStatus *st;

    (void)op;
    *out = NULL;
    kn = (embed_kernel *)calloc(1, sizeof *kn);
    if (!kn)
        return fail(ESL_ORT_FAIL, "out of memory");
    st = attr(info, "K", &kn->k);
    if (!st)
        st = attr(info, "N", &kn->n);
    if (!st)
        st = attr(info, "block_size", &kn->block);
    if (!st && esl__qmm_check(0, kn->k, kn->n, kn->block) != ESL_OK)
        st = fail(ESL_ORT_INVALID_ARGUMENT,
                  "K=%lld, N=%lld, block_size=%lld: K and N must be in [1, 2^24] and "
                  "block_size 32, 64, 128 or 256",
                  (long long)kn->k, (long long)kn->n, (long long)kn->block);
    if (st) {
        free(kn);
        return st;
    }
    kn->kp = esl__round_up(kn->k, kn->block);
    *out = kn;
    return NULL;
}

/* Reads input `index`, which must be of `type` with `count` elements (count < 0: any). */
static OrtStatus *input(OrtKernelContext *ctx, size_t index, int type, int64_t count,
                        const char *what, size_t *rank, int64_t *dims, void **data)
{
    const OrtValue *v = NULL;
    int64_t have = 1;
    size_t i;
    int got;
    OrtStatus *st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_GetInput,
                                 esl_ort_get_input_fn)(ctx, index, &v);
    if (!st && !v)
        return fail(ESL_ORT_INVALID_ARGUMENT, "input %s is missing", what);
    if (!st)
        st = esl__ort_shape(OP_NAME, v, &got, rank, dims);
    if (st)
        return st;
    for (i = 0; i < *rank; i++)
        have *= dims[i];
    if (got != type || (count >= 0 && have != count))
        return fail(ESL_ORT_INVALID_ARGUMENT,
                    "%s has element type %d with %lld elements; expected type %d%s; "
                    "re-export the model",
                    what, got, (long long)have, type, count >= 0 ? " and the table's size" : "");
    return esl__ort_data(v, data);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx)
{
    const embed_kernel *kn = (const embed_kernel *)kernel;
    const int64_t groups = (kn->n + ESL_QMM_GROUP - 1) / ESL_QMM_GROUP;
    const int64_t n_blocks = kn->kp / kn->block;
    int64_t dims[ESL_ORT_MAX_DIMS], wdims[ESL_ORT_MAX_DIMS], rows = 1, t, j;
    size_t rank, wrank, i;
    void *ids_v, *b_v, *s_v;
    float *y;
    OrtValue *y_val = NULL;
    OrtStatus *st;

    st = input(ctx, 1, ESL_ORT_UINT8, groups * kn->kp * ESL_QMM_GROUP, "B", &wrank, wdims,
               &b_v);
    if (!st)
        st = input(ctx, 2, ESL_ORT_FLOAT16, groups * n_blocks * ESL_QMM_GROUP, "scales",
                   &wrank, wdims, &s_v);
    if (!st)
        st = input(ctx, 0, ESL_ORT_INT64, -1, "ids", &rank, dims, &ids_v);
    if (st)
        return st;
    if (rank + 1 > ESL_ORT_MAX_DIMS)
        return fail(ESL_ORT_INVALID_ARGUMENT, "ids of rank %zu (at most %d)", rank,
                    ESL_ORT_MAX_DIMS - 1);
    for (i = 0; i < rank; i++)
        rows *= dims[i];
    dims[rank] = kn->k;
    st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_GetOutput, esl_ort_get_output_fn)(
        ctx, 0, dims, rank + 1, &y_val);
    if (!st)
        st = esl__ort_data(y_val, (void **)&y);
    if (st)
        return st;

    for (t = 0; t < rows; t++) {
        const int64_t id = ((const int64_t *)ids_v)[t];
        const uint8_t *data;
        const uint16_t *scales;
        int64_t lane;
        if (id < 0 || id >= kn->n)
            return fail(ESL_ORT_INVALID_ARGUMENT, "token id %lld is out of range [0, %lld)",
                        (long long)id, (long long)kn->n);

        /* Row id is lane id % 16 of group id / 16: 4 bytes per 64-byte stripe. */
        lane = id % ESL_QMM_GROUP;
        data = (const uint8_t *)b_v + (id / ESL_QMM_GROUP) * kn->kp * ESL_QMM_GROUP + lane * 4;
        scales = (const uint16_t *)s_v + (id / ESL_QMM_GROUP) * n_blocks * ESL_QMM_GROUP + lane;
        for (j = 0; j < kn->k; j++) {
            float q = (float)data[(j / 4) * 4 * ESL_QMM_GROUP + j % 4] - 128.0f;
            y[t * kn->k + j] = q * esl__half(scales[(j / kn->block) * ESL_QMM_GROUP]);
        }
    }
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

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

static int input_type(const OrtCustomOp *op, size_t index)
{
    static const int types[3] = {ESL_ORT_INT64, ESL_ORT_UINT8, ESL_ORT_FLOAT16};
    (void)op;
    return index < 3 ? types[index] : 0;
}

static size_t input_count(const OrtCustomOp *op)
{
    (void)op;
    return 3;
}

const OrtCustomOp esl__embed_op = {
    ESL_ORT_CUSTOM_OP_VERSION,
    create_kernel_v1,
    op_name,
    esl__ort_cpu_provider,
    input_type,
    input_count,
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
