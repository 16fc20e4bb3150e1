/*
 * ort_op.c - the int8 block matmul as an onnxruntime custom operator.
 *
 *   ai.edgeslm::MatMulQ8(A, B, scales) -> Y      attributes K, N, block_size
 *     A       float32 [..., K]
 *     B       uint8 [ceil(N / 16), kp / 4, 16, 4], rows interleaved (qmatmul.c)
 *     scales  float16 [ceil(N / 16), kp / block_size, 16]
 *     Y       float32 [..., N]
 *
 * onnxruntime loads this library with SessionOptions.register_custom_ops_library and
 * calls RegisterCustomOps; edgeslm/model.py does that when it finds the library. The
 * operator quantizes A once, then splits the weight groups among onnxruntime's
 * intra-op threads (KernelContext_ParallelFor), so a session's thread count holds.
 * Weights are read where onnxruntime keeps the initializers, never copied.
 * Not yet: a CPU without AVX2 (x86) runs the portable C path, about 20x slower.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgeslm_kernel.h"
#include "ort_abi.h"
#include "qmatmul.h"

#define OP_DOMAIN "ai.edgeslm"
#define OP_NAME "MatMulQ8"
#define MAX_DIMS 8
/* One decode row's activations fit this stack buffer for K up to 4096. */
#define STACK_SCRATCH 24576
/* Work items per product: enough to balance threads, few enough to stay cheap. */
#define MAX_ITEMS 16

static const OrtApi *g_api;

typedef struct qmm_kernel {
    int64_t k, n, block, kp, n_groups;
    const uint8_t *w;   /* constant weights found at creation, else NULL */
    const uint16_t *s;
} qmm_kernel;

typedef struct qmm_job {
    const esl_qmm_act *act;
    esl_qmm_weights weights;
    float *y;
    int64_t per_item; /* groups per work item */
} qmm_job;

/* Returns an onnxruntime status with a formatted message naming the operator. */
static OrtStatus *fail(int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    int used = snprintf(msg, sizeof msg, "%s::%s: ", OP_DOMAIN, OP_NAME);
    va_start(ap, fmt);
    vsnprintf(msg + used, sizeof msg - (size_t)used, fmt, ap);
    va_end(ap);
    return ESL_ORT_SLOT(g_api, ESL_ORT_CreateStatus, esl_ort_create_status_fn)(code, msg);
}

/* Reads the element type, rank and dims (up to MAX_DIMS) of a tensor value. */
static OrtStatus *tensor_shape(const OrtValue *v, int *type, size_t *rank, int64_t *dims)
{
    OrtTensorTypeAndShapeInfo *info = NULL;
    OrtStatus *st = ESL_ORT_SLOT(g_api, ESL_ORT_GetTensorTypeAndShape,
                                 esl_ort_type_and_shape_fn)(v, &info);
    if (!st)
        st = ESL_ORT_SLOT(g_api, ESL_ORT_GetTensorElementType, esl_ort_element_type_fn)(info,
                                                                                      type);
    if (!st)
        st = ESL_ORT_SLOT(g_api, ESL_ORT_GetDimensionsCount, esl_ort_dims_count_fn)(info, rank);
    if (!st && *rank > MAX_DIMS)
        st = fail(ESL_ORT_INVALID_ARGUMENT, "tensor of rank %zu (at most %d)", *rank, MAX_DIMS);
    if (!st)
        st = ESL_ORT_SLOT(g_api, ESL_ORT_GetDimensions, esl_ort_dims_fn)(info, dims, *rank);
    if (info)
        ESL_ORT_SLOT(g_api, ESL_ORT_ReleaseTensorTypeAndShapeInfo, esl_ort_release_info_fn)(info);
    return st;
}

/* The data pointer of a tensor value (onnxruntime's API takes it as mutable). */
static OrtStatus *tensor_data(const OrtValue *v, void **out)
{
    return ESL_ORT_SLOT(g_api, ESL_ORT_GetTensorMutableData, esl_ort_mutable_data_fn)(
        (OrtValue *)v, out);
}

/* Checks B and scales against the kernel's sizes; stores their data pointers. */
static OrtStatus *check_weights(const qmm_kernel *kn, const OrtValue *b, const OrtValue *s,
                                const uint8_t **w_out, const uint16_t **s_out)
{
    int64_t dims[MAX_DIMS], count, want;
    size_t rank, i;
    int type;
    OrtStatus *st;

    st = tensor_shape(b, &type, &rank, dims);
    if (st)
        return st;
    for (count = 1, i = 0; i < rank; i++)
        count *= dims[i];
    want = kn->n_groups * kn->kp * 16;
    if (type != ESL_ORT_UINT8 || count != want)
        return fail(ESL_ORT_INVALID_ARGUMENT,
                    "B must be uint8 with %lld elements for K=%lld N=%lld block_size=%lld, "
                    "got type %d with %lld; re-export the model",
                    (long long)want, (long long)kn->k, (long long)kn->n,
                    (long long)kn->block, type, (long long)count);
    st = tensor_shape(s, &type, &rank, dims);
    if (st)
        return st;
    for (count = 1, i = 0; i < rank; i++)
        count *= dims[i];
    want = kn->n_groups * (kn->kp / kn->block) * 16;
    if (type != ESL_ORT_FLOAT16 || count != want)
        return fail(ESL_ORT_INVALID_ARGUMENT,
                    "scales must be float16 with %lld elements, got type %d with %lld; "
                    "re-export the model",
                    (long long)want, type, (long long)count);
    st = tensor_data(b, (void **)w_out);
    if (!st)
        st = tensor_data(s, (void **)s_out);
    return st;
}

/* ---- kernel ------------------------------------------------------------------------- */

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                const OrtKernelInfo *info, void **out)
{
    esl_ort_attr_int64_fn attr = ESL_ORT_SLOT(api, ESL_ORT_KernelInfoGetAttribute_int64,
                                              esl_ort_attr_int64_fn);
    esl_ort_constant_input_fn constant = ESL_ORT_SLOT(
        api, ESL_ORT_KernelInfoGetConstantInput_tensor, esl_ort_constant_input_fn);
    const OrtValue *b = NULL, *s = NULL;
    int b_const = 0, s_const = 0;
    qmm_kernel *kn;
    OrtStatus *st;

    (void)op;
    *out = NULL;
    kn = (qmm_kernel *)calloc(1, sizeof *kn);
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
    kn->kp = (kn->k + kn->block - 1) / kn->block * kn->block;
    kn->n_groups = (kn->n + ESL_QMM_GROUP - 1) / ESL_QMM_GROUP;

    /* Constant weights (the usual case) are checked once, here. */
    if (!constant(info, 1, &b_const, &b) && !constant(info, 2, &s_const, &s) && b_const &&
        s_const && b && s) {
        st = check_weights(kn, b, s, &kn->w, &kn->s);
        if (st) {
            free(kn);
            return st;
        }
    }
    *out = kn;
    return NULL;
}

static void run_item(void *data, size_t item)
{
    const qmm_job *job = (const qmm_job *)data;
    int64_t g0 = (int64_t)item * job->per_item;
    int64_t g1 = g0 + job->per_item;
    int64_t n_groups = (job->weights.n + ESL_QMM_GROUP - 1) / ESL_QMM_GROUP;
    if (g1 > n_groups)
        g1 = n_groups;
    if (g0 < g1)
        esl__qmm_groups(job->act, &job->weights, g0, g1, job->y);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx)
{
    const qmm_kernel *kn = (const qmm_kernel *)kernel;
    esl_ort_get_input_fn get_input = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_GetInput,
                                                  esl_ort_get_input_fn);
    const OrtValue *a_val = NULL;
    OrtValue *y_val = NULL;
    int64_t dims[MAX_DIMS], m = 1, items;
    size_t rank, i, need;
    int type;
    float *x, *y;
    unsigned char stack[STACK_SCRATCH];
    void *scratch;
    esl_qmm_act act;
    qmm_job job;
    OrtStatus *st;

    /* A: float [..., K]; Y: the same leading dims, then N. */
    st = get_input(ctx, 0, &a_val);
    if (!st)
        st = tensor_shape(a_val, &type, &rank, dims);
    if (st)
        return st;
    if (type != ESL_ORT_FLOAT || rank < 1 || dims[rank - 1] != kn->k)
        return fail(ESL_ORT_INVALID_ARGUMENT,
                    "A must be float32 [..., %lld], got type %d, rank %zu, last dim %lld",
                    (long long)kn->k, type, rank, rank ? (long long)dims[rank - 1] : -1LL);
    for (i = 0; i + 1 < rank; i++) {
        if (dims[i] < 0 || (dims[i] > 0 && m > (INT64_C(1) << 40) / dims[i]))
            return fail(ESL_ORT_INVALID_ARGUMENT, "A has an invalid shape");
        m *= dims[i];
    }
    job.weights.n = kn->n;
    job.weights.kp = kn->kp;
    job.weights.block = kn->block;
    job.weights.data = kn->w;
    job.weights.scales = kn->s;
    if (!kn->w) { /* weights that are not initializers: check them on every run */
        const OrtValue *b = NULL, *s = NULL;
        st = get_input(ctx, 1, &b);
        if (!st)
            st = get_input(ctx, 2, &s);
        if (!st)
            st = check_weights(kn, b, s, &job.weights.data, &job.weights.scales);
        if (st)
            return st;
    }
    dims[rank - 1] = kn->n;
    st = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_GetOutput, esl_ort_get_output_fn)(
        ctx, 0, dims, rank, &y_val);
    if (!st)
        st = tensor_data(a_val, (void **)&x);
    if (!st)
        st = tensor_data(y_val, (void **)&y);
    if (st || m == 0)
        return st;

    /* Quantize A once (this thread), then share the groups out. */
    need = esl__qmm_scratch_size(m, kn->kp);
    scratch = need <= sizeof stack ? (void *)stack : malloc(need);
    if (!scratch)
        return fail(ESL_ORT_FAIL, "out of memory for %lld activation rows", (long long)m);
    esl__qmm_prepare(&act, scratch, x, m, kn->k, kn->kp, esl_qmm_level());
    items = kn->n_groups < MAX_ITEMS ? kn->n_groups : MAX_ITEMS;
    job.act = &act;
    job.y = y;
    job.per_item = (kn->n_groups + items - 1) / items;
    items = (kn->n_groups + job.per_item - 1) / job.per_item;
    st = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_ParallelFor, esl_ort_parallel_for_fn)(
        ctx, run_item, (size_t)items, 0, &job);
    if (scratch != (void *)stack)
        free(scratch);
    return st;
}

static void destroy_kernel(void *kernel) { free(kernel); }

/* Version-1 entry points; onnxruntime calls the V2 ones for version 16. */
static void *create_kernel_v1(const OrtCustomOp *op, const OrtApi *api,
                              const OrtKernelInfo *info)
{
    void *kernel = NULL;
    OrtStatus *st = create_kernel(op, api, info, &kernel);
    if (st)
        ESL_ORT_SLOT(api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(st);
    return kernel;
}

static void compute_v1(void *kernel, OrtKernelContext *ctx)
{
    OrtStatus *st = compute(kernel, ctx);
    if (st)
        ESL_ORT_SLOT(g_api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(st);
}

/* ---- operator description --------------------------------------------------------- */

static const char *op_name(const OrtCustomOp *op)
{
    (void)op;
    return OP_NAME;
}

static const char *op_provider(const OrtCustomOp *op)
{
    (void)op;
    return NULL; /* the CPU execution provider */
}

static int op_input_type(const OrtCustomOp *op, size_t index)
{
    static const int types[3] = {ESL_ORT_FLOAT, ESL_ORT_UINT8, ESL_ORT_FLOAT16};
    (void)op;
    return index < 3 ? types[index] : 0;
}

static size_t op_input_count(const OrtCustomOp *op)
{
    (void)op;
    return 3;
}

static int op_output_type(const OrtCustomOp *op, size_t index)
{
    (void)op;
    (void)index;
    return ESL_ORT_FLOAT;
}

static size_t op_output_count(const OrtCustomOp *op)
{
    (void)op;
    return 1;
}

static int op_zero(const OrtCustomOp *op, size_t index)
{
    (void)op;
    (void)index;
    return 0; /* required input or output; default memory type */
}

static int op_arity(const OrtCustomOp *op)
{
    (void)op;
    return 1;
}

static int op_homogeneous(const OrtCustomOp *op)
{
    (void)op;
    return 0;
}

static const OrtCustomOp g_op = {
    ESL_ORT_CUSTOM_OP_VERSION,
    create_kernel_v1,
    op_name,
    op_provider,
    op_input_type,
    op_input_count,
    op_output_type,
    op_output_count,
    compute_v1,
    destroy_kernel,
    op_zero,
    op_zero,
    op_zero,
    op_arity,
    op_homogeneous,
    op_arity,
    op_homogeneous,
    create_kernel,
    compute,
};

/* ---- registration ----------------------------------------------------------------- */

static OrtCustomOpDomain *g_domain;

/*
 * Called by onnxruntime for SessionOptions.register_custom_ops_library: adds the
 * ai.edgeslm domain to `options`. The domain lives as long as the process, as every
 * session made with it must outlive it. Not thread-safe against itself (the Python
 * API registers under the GIL).
 */
ESL_API OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base)
{
    const OrtApi *api = base->GetApi(ESL_ORT_API_VERSION);
    OrtStatus *st = NULL;

    if (!api) {
        const OrtApi *old = base->GetApi(1);
        char msg[200];
        snprintf(msg, sizeof msg,
                 "edgeslm's operators need onnxruntime 1.17 or newer, this is %s; "
                 "upgrade onnxruntime",
                 base->GetVersionString());
        return old ? ESL_ORT_SLOT(old, ESL_ORT_CreateStatus, esl_ort_create_status_fn)(
                         ESL_ORT_FAIL, msg)
                   : NULL;
    }
    g_api = api;
    if (!g_domain) {
        st = ESL_ORT_SLOT(api, ESL_ORT_CreateCustomOpDomain, esl_ort_create_domain_fn)(
            OP_DOMAIN, &g_domain);
        if (!st)
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(g_domain,
                                                                                    &g_op);
        if (st) {
            g_domain = NULL; /* leaked on this error path only; the next call retries */
            return st;
        }
    }
    return ESL_ORT_SLOT(api, ESL_ORT_AddCustomOpDomain, esl_ort_add_domain_fn)(options,
                                                                               g_domain);
}
