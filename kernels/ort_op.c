/*
 * ort_op.c - the block matmuls as onnxruntime custom operators.
 *
 *   ai.edgeslm::MatMulQ8(A, B, scales[, gamma, R]) -> Y
 *                                    attributes K, N, block_size, activation, epsilon
 *     A       float32 [..., K]
 *     B       uint8 [ceil(N / 16), kp / 4, 16, 4], rows interleaved (qmatmul.c)
 *     scales  float16 [ceil(N / 16), kp / block_size, 16]
 *     Y       float32 [..., N], or [..., N / 2] with activation 1
 *   ai.edgeslm::MatMulQ4(A, B, scales, mins[, gamma, R]) -> Y
 *                                    attributes K, N, activation, epsilon
 *     B       uint8 [ceil(N / 16), kp / 32, 4, 16, 4], nibble pairs (qmatmul4.c)
 *     scales, mins   float16 [ceil(N / 16), kp / 32, 16]
 *
 * Two optional inputs fold a Llama block's glue into its products. gamma (float32 [K])
 * RMS-normalizes each row of A first: a = A / sqrt(mean(A^2) + epsilon) * gamma
 * (epsilon default 1e-5), so the norm before a product is no node of its own. R (float32,
 * Y's shape) is added to Y: the residual add after the output and down projections,
 * R + P with the same rounding as a separate Add.
 *
 * activation 0 (the default) writes the product P. activation 1 is SwiGLU over a
 * packed gate + up weight: Y = silu(P[:, :N/2]) * P[:, N/2:] as swiglu.c computes it,
 * for N a multiple of 32 (both halves whole groups). A work item computes the same
 * groups of both halves, so the gate and up values it combines are its own.
 *
 * onnxruntime loads this library with SessionOptions.register_custom_ops_library and
 * calls RegisterCustomOps; edgeslm/model.py does that when it finds the library. The
 * operator quantizes A once, then splits the weight groups among onnxruntime's
 * intra-op threads (KernelContext_ParallelFor), so a session's thread count holds.
 * Weights are read where onnxruntime keeps the initializers, never copied.
 * Not yet: a CPU without AVX2 (x86) runs the portable C path, about 20x slower.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "edgeslm_kernel.h"
#include "ort_abi.h"
#include "ort_util.h"
#include "qmatmul.h"

/* One decode row's activations fit this stack buffer for K up to 4096. */
#define STACK_SCRATCH 24576
/* Work items per product: enough to balance threads, few enough to stay cheap. */
#define MAX_ITEMS 16
/* A decode row's product before its SwiGLU (N up to 4096) fits this stack buffer. */
#define STACK_PRODUCT 4096
/* A decode row's normalized activations (K up to 4096) fit this stack buffer. */
#define STACK_NORMED 4096

/* What the operator does to the product before writing Y (attribute "activation"). */
enum { ACT_NONE = 0, ACT_SWIGLU = 1 };

#define g_api esl__ort_api

/* What a kernel multiplies by: int8 blocks (MatMulQ8) or 4-bit blocks (MatMulQ4). */
typedef enum { KIND_Q8 = 0, KIND_Q4 = 1 } op_kind;
static const char *const OP_NAMES[2] = {"MatMulQ8", "MatMulQ4"};

typedef struct qmm_kernel {
    op_kind kind;
    int64_t k, n, block, kp, n_groups;
    int64_t activation; /* ACT_NONE or ACT_SWIGLU */
    float epsilon;      /* of the RMS norm, when gamma is given */
    /* constant weights found at creation (data, scales, mins), else NULL */
    const void *w[3];
} qmm_kernel;

typedef struct qmm_job {
    const esl_qmm_act *act;
    op_kind kind;
    esl_qmm_weights q8;
    esl_qmm4_weights q4;
    float *y;          /* Y */
    float *product;    /* SwiGLU: the whole product [m][n] before it; else NULL */
    const float *residual; /* R, added to Y ([m][y_cols]); or NULL */
    int64_t y_cols;    /* Y's row length: n, or n / 2 with SwiGLU */
    int64_t m, n;      /* rows, product columns */
    int64_t n_groups;  /* groups the items share: all, or those of the gate half */
    int64_t per_item;  /* groups per work item */
} qmm_job;

/* The helpers under the names this file uses. */
#define fail(kind, ...) esl__ort_fail(OP_NAMES[kind], __VA_ARGS__)
#define tensor_shape(kind, ...) esl__ort_shape(OP_NAMES[kind], __VA_ARGS__)
#define tensor_data esl__ort_data

/* Element count of a tensor of `rank` dims. */
static int64_t count_of(const int64_t *dims, size_t rank)
{
    int64_t count = 1;
    size_t i;
    for (i = 0; i < rank; i++)
        count *= dims[i];
    return count;
}

/*
 * Checks the weight inputs (B, scales and, for MatMulQ4, mins) against the kernel's
 * sizes and stores their data pointers in w[0..2].
 */
static OrtStatus *check_weights(const qmm_kernel *kn, const OrtValue *const *inputs,
                                const void **w)
{
    static const char *const names[3] = {"B", "scales", "mins"};
    const int64_t blocks = kn->kp / kn->block;
    int64_t want[3];
    int types[3] = {ESL_ORT_UINT8, ESL_ORT_FLOAT16, ESL_ORT_FLOAT16};
    int n_inputs = kn->kind == KIND_Q4 ? 3 : 2, i;

    want[0] = kn->kind == KIND_Q4 ? kn->n_groups * kn->kp * 8 : kn->n_groups * kn->kp * 16;
    want[1] = want[2] = kn->n_groups * blocks * 16;
    for (i = 0; i < n_inputs; i++) {
        int64_t dims[ESL_ORT_MAX_DIMS];
        size_t rank;
        int type;
        OrtStatus *st = tensor_shape(kn->kind, inputs[i], &type, &rank, dims);
        if (st)
            return st;
        if (type != types[i] || count_of(dims, rank) != want[i])
            return fail(kn->kind, ESL_ORT_INVALID_ARGUMENT,
                        "%s must be %s with %lld elements for K=%lld N=%lld block_size=%lld, "
                        "got type %d with %lld; re-export the model",
                        names[i], i ? "float16" : "uint8", (long long)want[i],
                        (long long)kn->k, (long long)kn->n, (long long)kn->block, type,
                        (long long)count_of(dims, rank));
        st = tensor_data(inputs[i], (void **)&w[i]);
        if (st)
            return st;
    }
    return NULL;
}

/* ---- kernel ------------------------------------------------------------------------- */

static OrtStatus *create_kernel(op_kind kind, const OrtApi *api, const OrtKernelInfo *info,
                                void **out)
{
    esl_ort_attr_int64_fn attr = ESL_ORT_SLOT(api, ESL_ORT_KernelInfoGetAttribute_int64,
                                              esl_ort_attr_int64_fn);
    esl_ort_constant_input_fn constant = ESL_ORT_SLOT(
        api, ESL_ORT_KernelInfoGetConstantInput_tensor, esl_ort_constant_input_fn);
    const OrtValue *inputs[3] = {NULL, NULL, NULL};
    int n_inputs = kind == KIND_Q4 ? 3 : 2, i, all_constant = 1;
    qmm_kernel *kn;
    OrtStatus *st;

    *out = NULL;
    kn = (qmm_kernel *)calloc(1, sizeof *kn);
    if (!kn)
        return fail(kind, ESL_ORT_FAIL, "out of memory");
    kn->kind = kind;
    kn->block = ESL_QMM_CHUNK; /* MatMulQ4's blocks are always 32 */
    st = attr(info, "K", &kn->k);
    if (!st)
        st = attr(info, "N", &kn->n);
    if (!st && kind == KIND_Q8)
        st = attr(info, "block_size", &kn->block);
    if (!st) { /* optional: absent means no activation */
        OrtStatus *absent = attr(info, "activation", &kn->activation);
        if (absent) {
            ESL_ORT_SLOT(api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(absent);
            kn->activation = ACT_NONE;
        }
        absent = ESL_ORT_SLOT(api, ESL_ORT_KernelInfoGetAttribute_float,
                              esl_ort_attr_float_fn)(info, "epsilon", &kn->epsilon);
        if (absent) {
            ESL_ORT_SLOT(api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(absent);
            kn->epsilon = 1e-5f;
        }
    }
    if (!st && !(kn->epsilon >= 0.0f && kn->epsilon < 1.0f))
        st = fail(kind, ESL_ORT_INVALID_ARGUMENT, "epsilon=%g: it must be in [0, 1)",
                  (double)kn->epsilon);
    if (!st && esl__qmm_check(0, kn->k, kn->n, kn->block) != ESL_OK)
        st = fail(kind, ESL_ORT_INVALID_ARGUMENT,
                  "K=%lld, N=%lld, block_size=%lld: K and N must be in [1, 2^24] and "
                  "block_size 32, 64, 128 or 256",
                  (long long)kn->k, (long long)kn->n, (long long)kn->block);
    if (!st && kn->activation != ACT_NONE && kn->activation != ACT_SWIGLU)
        st = fail(kind, ESL_ORT_INVALID_ARGUMENT,
                  "activation=%lld: it must be 0 (none) or 1 (SwiGLU)",
                  (long long)kn->activation);
    if (!st && kn->activation == ACT_SWIGLU && kn->n % (2 * ESL_QMM_GROUP))
        st = fail(kind, ESL_ORT_INVALID_ARGUMENT,
                  "activation=1 (SwiGLU) needs N, the packed gate and up rows, to be a "
                  "multiple of %d, got N=%lld",
                  2 * ESL_QMM_GROUP, (long long)kn->n);
    if (st) {
        free(kn);
        return st;
    }
    kn->kp = (kn->k + kn->block - 1) / kn->block * kn->block;
    kn->n_groups = (kn->n + ESL_QMM_GROUP - 1) / ESL_QMM_GROUP;

    /* Constant weights (the usual case) are checked once, here. */
    for (i = 0; i < n_inputs; i++) {
        int is_constant = 0;
        OrtStatus *cst = constant(info, (size_t)i + 1, &is_constant, &inputs[i]);
        if (cst) {
            ESL_ORT_SLOT(api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(cst);
            is_constant = 0;
        }
        all_constant &= is_constant && inputs[i] != NULL;
    }
    if (all_constant) {
        st = check_weights(kn, inputs, kn->w);
        if (st) {
            free(kn);
            return st;
        }
    }
    *out = kn;
    return NULL;
}

static void run_groups(const qmm_job *job, int64_t g0, int64_t g1, float *y)
{
    if (job->kind == KIND_Q4)
        esl__qmm4_groups(job->act, &job->q4, g0, g1, y);
    else
        esl__qmm_groups(job->act, &job->q8, g0, g1, y);
}

/* Y[i][c] = silu(P[i][c]) * P[i][c + n/2] for columns [c0, c1) of every row. */
static void swiglu_columns(const qmm_job *job, int64_t c0, int64_t c1)
{
    const int64_t half = job->n / 2;
    int64_t i;
    for (i = 0; i < job->m; i++) {
        const float *gate = job->product + i * job->n;
        esl__silu_times(gate + c0, gate + half + c0, job->y + i * half + c0, c1 - c0);
    }
}

/* Y[i][c] = R[i][c] + Y[i][c] for columns [c0, c1) of every row (R + P, as Add rounds). */
static void add_residual(const qmm_job *job, int64_t c0, int64_t c1)
{
    int64_t i, c;
    if (c1 > job->y_cols)
        c1 = job->y_cols;
    for (i = 0; i < job->m; i++) {
        float *y = job->y + i * job->y_cols;
        const float *r = job->residual + i * job->y_cols;
        for (c = c0; c < c1; c++)
            y[c] = r[c] + y[c];
    }
}

static void run_item(void *data, size_t item)
{
    const qmm_job *job = (const qmm_job *)data;
    int64_t g0 = (int64_t)item * job->per_item;
    int64_t g1 = g0 + job->per_item < job->n_groups ? g0 + job->per_item : job->n_groups;
    if (g0 >= g1)
        return;
    if (!job->product) {
        run_groups(job, g0, g1, job->y);
    } else {
        run_groups(job, g0, g1, job->product);                               /* gate */
        run_groups(job, g0 + job->n_groups, g1 + job->n_groups, job->product); /* up */
        swiglu_columns(job, g0 * ESL_QMM_GROUP, g1 * ESL_QMM_GROUP);
    }
    if (job->residual)
        add_residual(job, g0 * ESL_QMM_GROUP, g1 * ESL_QMM_GROUP);
}

/*
 * out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * gamma for m rows of k. Eight running sums
 * in a fixed order, so every CPU rounds alike (the kernel is built without contraction).
 */
static void rms_norm_rows(const float *x, const float *gamma, float eps, int64_t m, int64_t k,
                          float *out)
{
    int64_t i, c;
    int j;
    for (i = 0; i < m; i++) {
        const float *row = x + i * k;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sum, inv;
        for (c = 0; c + 8 <= k; c += 8)
            for (j = 0; j < 8; j++)
                acc[j] += row[c + j] * row[c + j];
        sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; c < k; c++)
            sum += row[c] * row[c];
        inv = 1.0f / sqrtf(sum / (float)k + eps);
        for (c = 0; c < k; c++)
            out[i * k + c] = row[c] * inv * gamma[c];
    }
}

/*
 * Reads optional float input `index` into *data when present, checking it holds `count`
 * values (what: its name and shape, for the error). Absent: *data stays NULL.
 */
static OrtStatus *optional_floats(const qmm_kernel *kn, OrtKernelContext *ctx, size_t index,
                                  int64_t count, const char *what, const float **data)
{
    const OrtValue *v = NULL;
    int64_t dims[ESL_ORT_MAX_DIMS];
    size_t rank;
    int type;
    OrtStatus *st = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_GetInput,
                                 esl_ort_get_input_fn)(ctx, index, &v);
    *data = NULL;
    if (st || !v)
        return st;
    st = tensor_shape(kn->kind, v, &type, &rank, dims);
    if (!st && (type != ESL_ORT_FLOAT || count_of(dims, rank) != count))
        return fail(kn->kind, ESL_ORT_INVALID_ARGUMENT,
                    "%s must be float32 with %lld values, got type %d with %lld", what,
                    (long long)count, type, (long long)count_of(dims, rank));
    return st ? st : tensor_data(v, (void **)data);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx)
{
    const qmm_kernel *kn = (const qmm_kernel *)kernel;
    esl_ort_get_input_fn get_input = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_GetInput,
                                                  esl_ort_get_input_fn);
    const OrtValue *a_val = NULL;
    OrtValue *y_val = NULL;
    const void *w[3] = {kn->w[0], kn->w[1], kn->w[2]};
    const size_t first_optional = kn->kind == KIND_Q4 ? 4 : 3;
    const float *gamma = NULL, *residual = NULL;
    int64_t dims[ESL_ORT_MAX_DIMS], m = 1, items;
    size_t rank, i, need;
    int type;
    float *x, *y, *product = NULL, *normed = NULL;
    unsigned char stack[STACK_SCRATCH];
    float stack_product[STACK_PRODUCT];
    float stack_normed[STACK_NORMED];
    void *scratch;
    esl_qmm_act act;
    qmm_job job;
    OrtStatus *st;

    /* A: float [..., K]; Y: the same leading dims, then N. */
    st = get_input(ctx, 0, &a_val);
    if (!st)
        st = tensor_shape(kn->kind, a_val, &type, &rank, dims);
    if (st)
        return st;
    if (type != ESL_ORT_FLOAT || rank < 1 || dims[rank - 1] != kn->k)
        return fail(kn->kind, ESL_ORT_INVALID_ARGUMENT,
                    "A must be float32 [..., %lld], got type %d, rank %zu, last dim %lld",
                    (long long)kn->k, type, rank, rank ? (long long)dims[rank - 1] : -1LL);
    for (i = 0; i + 1 < rank; i++) {
        if (dims[i] < 0 || (dims[i] > 0 && m > (INT64_C(1) << 40) / dims[i]))
            return fail(kn->kind, ESL_ORT_INVALID_ARGUMENT, "A has an invalid shape");
        m *= dims[i];
    }
    if (!w[0]) { /* weights that are not initializers: check them on every run */
        const OrtValue *inputs[3] = {NULL, NULL, NULL};
        int n_inputs = kn->kind == KIND_Q4 ? 3 : 2, j;
        for (j = 0; j < n_inputs && !st; j++)
            st = get_input(ctx, (size_t)j + 1, &inputs[j]);
        if (!st)
            st = check_weights(kn, inputs, w);
        if (st)
            return st;
    }
    dims[rank - 1] = kn->activation == ACT_SWIGLU ? kn->n / 2 : kn->n;
    st = optional_floats(kn, ctx, first_optional, kn->k, "gamma ([K])", &gamma);
    if (!st)
        st = optional_floats(kn, ctx, first_optional + 1, m * dims[rank - 1],
                             "R (Y's shape)", &residual);
    if (st)
        return st;
    st = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_GetOutput, esl_ort_get_output_fn)(
        ctx, 0, dims, rank, &y_val);
    if (!st)
        st = tensor_data(a_val, (void **)&x);
    if (!st)
        st = tensor_data(y_val, (void **)&y);
    if (st || m == 0)
        return st;

    /* Normalize A (with gamma) and quantize it once (this thread), then share the
     * groups out. */
    if (gamma) {
        normed = m * kn->k <= STACK_NORMED
                     ? stack_normed
                     : (float *)malloc((size_t)m * (size_t)kn->k * sizeof(float));
        if (!normed)
            return fail(kn->kind, ESL_ORT_FAIL, "out of memory for %lld normalized rows",
                        (long long)m);
        rms_norm_rows(x, gamma, kn->epsilon, m, kn->k, normed);
        x = normed;
    }
    need = esl__qmm_scratch_size(m, kn->kp);
    scratch = need <= sizeof stack ? (void *)stack : malloc(need);
    if (!scratch) {
        if (normed != stack_normed)
            free(normed);
        return fail(kn->kind, ESL_ORT_FAIL, "out of memory for %lld activation rows",
                    (long long)m);
    }
    if (kn->activation == ACT_SWIGLU) {
        product = m * kn->n <= STACK_PRODUCT
                      ? stack_product
                      : (float *)malloc((size_t)m * (size_t)kn->n * sizeof(float));
        if (!product) {
            if (scratch != (void *)stack)
                free(scratch);
            if (normed != stack_normed)
                free(normed);
            return fail(kn->kind, ESL_ORT_FAIL, "out of memory for %lld product rows",
                        (long long)m);
        }
    }
    esl__qmm_prepare(&act, scratch, x, m, kn->k, kn->kp, esl_qmm_level());
    if (normed != stack_normed)
        free(normed); /* prepare keeps nothing of x (NULL when there was no gamma) */
    job.act = &act;
    job.kind = kn->kind;
    job.q8.data = (const uint8_t *)w[0];
    job.q8.scales = (const uint16_t *)w[1];
    job.q8.n = kn->n;
    job.q8.kp = kn->kp;
    job.q8.block = kn->block;
    job.q4.data = (const uint8_t *)w[0];
    job.q4.scales = (const uint16_t *)w[1];
    job.q4.mins = (const uint16_t *)w[2];
    job.q4.n = kn->n;
    job.q4.kp = kn->kp;
    job.y = y;
    job.product = product;
    job.residual = residual;
    job.y_cols = dims[rank - 1];
    job.m = m;
    job.n = kn->n;
    job.n_groups = product ? kn->n_groups / 2 : kn->n_groups;
    items = job.n_groups < MAX_ITEMS ? job.n_groups : MAX_ITEMS;
    job.per_item = (job.n_groups + items - 1) / items;
    items = (job.n_groups + job.per_item - 1) / job.per_item;
    st = ESL_ORT_SLOT(g_api, ESL_ORT_KernelContext_ParallelFor, esl_ort_parallel_for_fn)(
        ctx, run_item, (size_t)items, 0, &job);
    if (scratch != (void *)stack)
        free(scratch);
    if (product && product != stack_product)
        free(product);
    return st;
}

static void destroy_kernel(void *kernel) { free(kernel); }


/* ---- operator descriptions --------------------------------------------------------- */

static op_kind kind_of(const OrtCustomOp *op);

static OrtStatus *create_kernel_v2(const OrtCustomOp *op, const OrtApi *api,
                                   const OrtKernelInfo *info, void **kernel)
{
    return create_kernel(kind_of(op), api, info, kernel);
}

/* Version-1 entry points; onnxruntime calls the V2 ones for version 16. */
static void *create_kernel_v1(const OrtCustomOp *op, const OrtApi *api,
                              const OrtKernelInfo *info)
{
    void *kernel = NULL;
    OrtStatus *st = create_kernel(kind_of(op), api, info, &kernel);
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

static const char *op_name(const OrtCustomOp *op) { return OP_NAMES[kind_of(op)]; }

static const char *op_provider(const OrtCustomOp *op)
{
    (void)op;
    return NULL; /* the CPU execution provider */
}

static int op_input_type(const OrtCustomOp *op, size_t index)
{
    static const int types[4] = {ESL_ORT_FLOAT, ESL_ORT_UINT8, ESL_ORT_FLOAT16,
                                 ESL_ORT_FLOAT16};
    size_t first_optional = kind_of(op) == KIND_Q4 ? 4u : 3u;
    if (index < first_optional)
        return types[index];
    return index < first_optional + 2 ? ESL_ORT_FLOAT : 0; /* gamma, R */
}

/* A, the weights (B, scales[, mins]), then the optional gamma and R. */
static size_t op_input_count(const OrtCustomOp *op) { return kind_of(op) == KIND_Q4 ? 6 : 5; }

static int op_input_characteristic(const OrtCustomOp *op, size_t index)
{
    return index >= (kind_of(op) == KIND_Q4 ? 4u : 3u) ? ESL_ORT_OPTIONAL : ESL_ORT_REQUIRED;
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

#define OP_TABLE                                                                           \
    {                                                                                      \
        ESL_ORT_CUSTOM_OP_VERSION, create_kernel_v1, op_name, op_provider, op_input_type,  \
            op_input_count, op_output_type, op_output_count, compute_v1, destroy_kernel,   \
            op_input_characteristic, op_zero, op_zero, op_arity, op_homogeneous, op_arity, \
            op_homogeneous, create_kernel_v2, compute,                                     \
    }
const OrtCustomOp esl__qmm_ops[2] = {OP_TABLE, OP_TABLE};

static op_kind kind_of(const OrtCustomOp *op)
{
    return op == &esl__qmm_ops[1] ? KIND_Q4 : KIND_Q8;
}
