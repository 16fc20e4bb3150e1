/*
 * ort_attention.c - causal attention over the KV cache as an onnxruntime operator.
 *
 *   ai.edgeslm::CachedAttention(qkv, "", "", past_key, past_value, seqlens_k,
 *                               total_sequence_length, cos_cache, sin_cache)
 *       -> (out, present_key, present_value)
 *   attributes num_heads, kv_num_heads, do_rotary, scale (0: 1 / sqrt(head_dim))
 *
 * The inputs, outputs and attributes of com.microsoft::GroupQueryAttention as
 * edgeslm's decoder graphs use it (batch 1, the packed QKV, rotate-half RoPE), so that
 * the portable graph swaps one for the other. The runtime binds present to the same
 * buffer as past; then only the new positions are written. Bound to another buffer,
 * present first gets a copy of past. The work (attention.c) is split by heads and by
 * blocks of new rows among onnxruntime's intra-op threads.
 *
 * Registered twice under the one name (onnxruntime picks by the types): past and present
 * float32 (esl__attention_op) or float16 (esl__attention_op_f16, a half-precision
 * cache; every other input and output stays float32).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "edgeslm_kernel.h"
#include "ort_util.h"

#define OP_NAME "CachedAttention"
#define N_INPUTS 9
#define N_OUTPUTS 3
/* Rows of a prompt per work item, and the scores scratch kept on the stack. */
#define ROW_BLOCK 16
#define STACK_FLOATS 16384

typedef struct attn_kernel {
    int64_t n_heads, n_kv_heads, rotary;
    float scale; /* 0: 1 / sqrt(head_dim) */
    int kv_half; /* registered as esl__attention_op_f16 */
} attn_kernel;

typedef struct attn_job {
    const esl_attn_desc *d;
    const float *qkv, *cos_t, *sin_t;
    const void *keys, *values; /* float32 or IEEE half (d->kv_half) */
    float *out, *scratch;
    int64_t row_blocks;
} attn_job;

#define fail(...) esl__ort_fail(OP_NAME, __VA_ARGS__)

/* Releases a status; returns whether there was one (an optional attribute absent). */
static int release(const OrtApi *api, OrtStatus *st)
{
    if (!st)
        return 0;
    ESL_ORT_SLOT(api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(st);
    return 1;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                const OrtKernelInfo *info, void **out)
{
    esl_ort_attr_int64_fn attr = ESL_ORT_SLOT(api, ESL_ORT_KernelInfoGetAttribute_int64,
                                              esl_ort_attr_int64_fn);
    esl_ort_attr_float_fn attr_f = ESL_ORT_SLOT(api, ESL_ORT_KernelInfoGetAttribute_float,
                                                esl_ort_attr_float_fn);
    attn_kernel *kn;
    OrtStatus *st;

    *out = NULL;
    kn = (attn_kernel *)calloc(1, sizeof *kn);
    if (!kn)
        return fail(ESL_ORT_FAIL, "out of memory");
    kn->kv_half = op == &esl__attention_op_f16;
    st = attr(info, "num_heads", &kn->n_heads);
    if (!st)
        st = attr(info, "kv_num_heads", &kn->n_kv_heads);
    if (!st && release(api, attr(info, "do_rotary", &kn->rotary)))
        kn->rotary = 0; /* absent: no rotary embedding */
    if (!st && release(api, attr_f(info, "scale", &kn->scale)))
        kn->scale = 0.0f; /* absent: 1 / sqrt(head_dim) */
    if (!st && (kn->n_heads < 1 || kn->n_kv_heads < 1 || kn->n_heads % kn->n_kv_heads))
        st = fail(ESL_ORT_INVALID_ARGUMENT,
                  "num_heads=%lld must be a positive multiple of kv_num_heads=%lld",
                  (long long)kn->n_heads, (long long)kn->n_kv_heads);
    if (st) {
        free(kn);
        return st;
    }
    *out = kn;
    return NULL;
}

static void run_item(void *data, size_t item)
{
    const attn_job *job = (const attn_job *)data;
    const esl_attn_desc *d = job->d;
    const int64_t h = (int64_t)item / job->row_blocks;
    const int64_t row0 = ((int64_t)item % job->row_blocks) * ROW_BLOCK;
    const int64_t row1 = row0 + ROW_BLOCK < d->s ? row0 + ROW_BLOCK : d->s;
    esl__attn_head(d, job->qkv, job->cos_t, job->sin_t, job->keys, job->values, h, row0,
                   row1, job->scratch + (int64_t)item * d->total, job->out);
}

/* Reads input `index` as a tensor of `type` and `rank`; NULL value if optional & absent. */
static OrtStatus *input(OrtKernelContext *ctx, size_t index, int type, size_t rank,
                        int64_t *dims, void **data, int optional)
{
    const OrtValue *v = NULL;
    size_t got_rank;
    int got_type;
    OrtStatus *st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_GetInput,
                                 esl_ort_get_input_fn)(ctx, index, &v);
    *data = NULL;
    if (st)
        return st;
    if (!v) {
        return optional ? NULL
                        : fail(ESL_ORT_INVALID_ARGUMENT, "input %zu is missing", index);
    }
    st = esl__ort_shape(OP_NAME, v, &got_type, &got_rank, dims);
    if (!st && (got_type != type || got_rank != rank))
        st = fail(ESL_ORT_INVALID_ARGUMENT,
                  "input %zu must have element type %d and rank %zu, got type %d rank %zu",
                  index, type, rank, got_type, got_rank);
    if (!st)
        st = esl__ort_data(v, data);
    return st;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx)
{
    const attn_kernel *kn = (const attn_kernel *)kernel;
    const int kv_type = kn->kv_half ? ESL_ORT_FLOAT16 : ESL_ORT_FLOAT;
    int64_t qd[ESL_ORT_MAX_DIMS], kd[ESL_ORT_MAX_DIMS], vd[ESL_ORT_MAX_DIMS];
    int64_t sd[ESL_ORT_MAX_DIMS], td[ESL_ORT_MAX_DIMS], cd[ESL_ORT_MAX_DIMS];
    void *qkv, *pk, *pv, *seqlens, *total, *cos_t = NULL, *sin_t = NULL;
    OrtValue *outs[N_OUTPUTS] = {NULL, NULL, NULL};
    void *out_data[N_OUTPUTS];
    float stack[STACK_FLOATS], *scratch;
    esl_attn_desc d;
    attn_job job;
    int64_t width, items, i;
    size_t cache_bytes;
    OrtStatus *st;

    /* Inputs: the shapes the decoder graphs give GroupQueryAttention. */
    st = input(ctx, 0, ESL_ORT_FLOAT, 3, qd, &qkv, 0);
    if (!st)
        st = input(ctx, 3, kv_type, 4, kd, &pk, 0);
    if (!st)
        st = input(ctx, 4, kv_type, 4, vd, &pv, 0);
    if (!st)
        st = input(ctx, 5, ESL_ORT_INT32, 1, sd, &seqlens, 0);
    if (!st)
        st = input(ctx, 6, ESL_ORT_INT32, 0, td, &total, 0);
    if (!st && kn->rotary) {
        st = input(ctx, 7, ESL_ORT_FLOAT, 2, cd, &cos_t, 0);
        if (!st)
            st = input(ctx, 8, ESL_ORT_FLOAT, 2, cd, &sin_t, 0);
    }
    if (st)
        return st;

    width = qd[2];
    d.n_heads = kn->n_heads;
    d.n_kv_heads = kn->n_kv_heads;
    d.head_dim = kd[3];
    d.max_seq = kd[2];
    d.s = qd[1];
    d.total = *(const int32_t *)total;
    d.scale = kn->scale != 0.0f ? kn->scale : 1.0f / sqrtf((float)d.head_dim);
    d.kv_half = kn->kv_half;
    if (qd[0] != 1 || kd[0] != 1 || kd[1] != d.n_kv_heads || memcmp(kd, vd, sizeof(int64_t) * 4) ||
        width != (d.n_heads + 2 * d.n_kv_heads) * d.head_dim || sd[0] != 1 ||
        ((const int32_t *)seqlens)[0] != d.total - 1 || esl__attn_check(&d) != ESL_OK ||
        (kn->rotary && (cd[0] < d.total || cd[1] * 2 != d.head_dim)))
        return fail(ESL_ORT_INVALID_ARGUMENT,
                    "inconsistent inputs: qkv (%lld, %lld, %lld), cache (%lld, %lld, %lld, %lld), "
                    "total_sequence_length %lld, seqlens_k %lld; batch 1, %lld heads, %lld kv "
                    "heads, %lld new tokens ending at total <= the cache's length",
                    (long long)qd[0], (long long)qd[1], (long long)qd[2], (long long)kd[0],
                    (long long)kd[1], (long long)kd[2], (long long)kd[3], (long long)d.total,
                    (long long)((const int32_t *)seqlens)[0], (long long)d.n_heads,
                    (long long)d.n_kv_heads, (long long)d.s);

    /* Outputs: out, and present key/value (normally the very buffers of past). */
    {
        int64_t od[3] = {1, d.s, d.n_heads * d.head_dim};
        const int64_t *dims[N_OUTPUTS] = {od, kd, vd};
        const size_t ranks[N_OUTPUTS] = {3, 4, 4};
        for (i = 0; i < N_OUTPUTS && !st; i++) {
            st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_GetOutput,
                              esl_ort_get_output_fn)(ctx, (size_t)i, dims[i], ranks[i],
                                                     &outs[i]);
            if (!st)
                st = esl__ort_data(outs[i], &out_data[i]);
        }
    }
    if (st)
        return st;
    cache_bytes = (size_t)(d.n_kv_heads * d.max_seq * d.head_dim) *
                  (d.kv_half ? sizeof(uint16_t) : sizeof(float));
    if (out_data[1] != pk)
        memcpy(out_data[1], pk, cache_bytes);
    if (out_data[2] != pv)
        memcpy(out_data[2], pv, cache_bytes);

    /* New keys and values into the cache, then heads x row blocks among threads. */
    esl__attn_store(&d, (const float *)qkv, (const float *)cos_t, (const float *)sin_t,
                    out_data[1], out_data[2]);
    job.d = &d;
    job.qkv = (const float *)qkv;
    job.cos_t = (const float *)cos_t;
    job.sin_t = (const float *)sin_t;
    job.keys = out_data[1];
    job.values = out_data[2];
    job.out = (float *)out_data[0];
    job.row_blocks = (d.s + ROW_BLOCK - 1) / ROW_BLOCK;
    items = d.n_heads * job.row_blocks;
    scratch = items * d.total <= STACK_FLOATS
                  ? stack
                  : (float *)malloc((size_t)(items * d.total) * sizeof(float));
    if (!scratch)
        return fail(ESL_ORT_FAIL, "out of memory for %lld scores", (long long)(items * d.total));
    job.scratch = scratch;
    st = ESL_ORT_SLOT(esl__ort_api, ESL_ORT_KernelContext_ParallelFor, esl_ort_parallel_for_fn)(
        ctx, run_item, (size_t)items, 0, &job);
    if (scratch != stack)
        free(scratch);
    return st;
}

static void destroy_kernel(void *kernel) { free(kernel); }

/* ---- operator description --------------------------------------------------------- */

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
        ESL_ORT_SLOT(esl__ort_api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(st);
}

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

/* The element type of the cache (past 3, 4; present 1, 2) of each registration. */
static int cache_type(const OrtCustomOp *op)
{
    return op == &esl__attention_op_f16 ? ESL_ORT_FLOAT16 : ESL_ORT_FLOAT;
}

static int op_input_type(const OrtCustomOp *op, size_t index)
{
    if (index == 3 || index == 4)
        return cache_type(op);
    return index == 5 || index == 6 ? ESL_ORT_INT32 : ESL_ORT_FLOAT;
}

static size_t op_input_count(const OrtCustomOp *op)
{
    (void)op;
    return N_INPUTS;
}

static int op_output_type(const OrtCustomOp *op, size_t index)
{
    return index == 1 || index == 2 ? cache_type(op) : ESL_ORT_FLOAT;
}

static size_t op_output_count(const OrtCustomOp *op)
{
    (void)op;
    return N_OUTPUTS;
}

/* The separate key and value (1, 2) and the RoPE tables (7, 8) are optional. */
static int op_input_characteristic(const OrtCustomOp *op, size_t index)
{
    (void)op;
    return index == 1 || index == 2 || index >= 7 ? ESL_ORT_OPTIONAL : ESL_ORT_REQUIRED;
}

static int op_required(const OrtCustomOp *op, size_t index)
{
    (void)op;
    (void)index;
    return ESL_ORT_REQUIRED; /* outputs; also the default memory type (0) */
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

#define ATTENTION_OP_TABLE                                                                 \
    {                                                                                      \
        ESL_ORT_CUSTOM_OP_VERSION, create_kernel_v1, op_name, op_provider, op_input_type,  \
            op_input_count, op_output_type, op_output_count, compute_v1, destroy_kernel,   \
            op_input_characteristic, op_required, op_required, op_arity, op_homogeneous,   \
            op_arity, op_homogeneous, create_kernel, compute,                              \
    }
const OrtCustomOp esl__attention_op = ATTENTION_OP_TABLE;
const OrtCustomOp esl__attention_op_f16 = ATTENTION_OP_TABLE;
