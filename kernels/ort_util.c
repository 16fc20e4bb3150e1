/*
 * ort_util.c - what edgeslm's onnxruntime operators share: the API table, errors that
 * name the operator, tensor access, the OrtCustomOp members most operators answer
 * alike, and RegisterCustomOps, which adds them all to a session's options.
 */
#include <stdarg.h>
#include <stdio.h>

#include "edgeslm_kernel.h"
#include "ort_util.h"

#define OP_DOMAIN "ai.edgeslm"
#define g_api esl__ort_api

/* The API table RegisterCustomOps was given (see ort_util.h). */
const OrtApi *esl__ort_api;

/* Contract: see ort_util.h. */
OrtStatus *esl__ort_fail(const char *op, int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    int used = snprintf(msg, sizeof msg, "%s::%s: ", OP_DOMAIN, op);
    va_start(ap, fmt);
    vsnprintf(msg + used, sizeof msg - (size_t)used, fmt, ap);
    va_end(ap);
    return ESL_ORT_SLOT(g_api, ESL_ORT_CreateStatus, esl_ort_create_status_fn)(code, msg);
}

/* Contract: see ort_util.h. */
OrtStatus *esl__ort_shape(const char *op, const OrtValue *v, int *type, size_t *rank,
                          int64_t *dims)
{
    OrtTensorTypeAndShapeInfo *info = NULL;
    OrtStatus *st = ESL_ORT_SLOT(g_api, ESL_ORT_GetTensorTypeAndShape,
                                 esl_ort_type_and_shape_fn)(v, &info);
    if (!st)
        st = ESL_ORT_SLOT(g_api, ESL_ORT_GetTensorElementType, esl_ort_element_type_fn)(info,
                                                                                      type);
    if (!st)
        st = ESL_ORT_SLOT(g_api, ESL_ORT_GetDimensionsCount, esl_ort_dims_count_fn)(info, rank);
    if (!st && *rank > ESL_ORT_MAX_DIMS)
        st = esl__ort_fail(op, ESL_ORT_INVALID_ARGUMENT, "tensor of rank %zu (at most %d)",
                           *rank, ESL_ORT_MAX_DIMS);
    if (!st)
        st = ESL_ORT_SLOT(g_api, ESL_ORT_GetDimensions, esl_ort_dims_fn)(info, dims, *rank);
    if (info)
        ESL_ORT_SLOT(g_api, ESL_ORT_ReleaseTensorTypeAndShapeInfo, esl_ort_release_info_fn)(info);
    return st;
}

/* Contract: see ort_util.h. */
OrtStatus *esl__ort_data(const OrtValue *v, void **out)
{
    return ESL_ORT_SLOT(g_api, ESL_ORT_GetTensorMutableData, esl_ort_mutable_data_fn)(
        (OrtValue *)v, out);
}

/* Contract: see ort_util.h. */
void esl__ort_release(const OrtApi *api, OrtStatus *st)
{
    if (st)
        ESL_ORT_SLOT(api, ESL_ORT_ReleaseStatus, esl_ort_release_status_fn)(st);
}

const char *esl__ort_cpu_provider(const OrtCustomOp *op)
{
    (void)op;
    return NULL;
}

int esl__ort_float_type(const OrtCustomOp *op, size_t index)
{
    (void)op;
    (void)index;
    return ESL_ORT_FLOAT;
}

size_t esl__ort_one(const OrtCustomOp *op)
{
    (void)op;
    return 1;
}

int esl__ort_required(const OrtCustomOp *op, size_t index)
{
    (void)op;
    (void)index;
    return ESL_ORT_REQUIRED;
}

int esl__ort_one_arity(const OrtCustomOp *op)
{
    (void)op;
    return 1;
}

int esl__ort_not_homogeneous(const OrtCustomOp *op)
{
    (void)op;
    return 0;
}

/* ---- registration ----------------------------------------------------------------- */

static OrtCustomOpDomain *g_domain;

/*
 * Called by onnxruntime for SessionOptions.register_custom_ops_library: adds the
 * ai.edgeslm domain (MatMulQ8, MatMulQ4, CachedAttention, SwiGLU, GatherQ8) to
 * `options`. The domain lives as long as the process, as every session made with it
 * must outlive it. Not thread-safe against itself (the Python API registers under the
 * GIL).
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
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(
                g_domain, &esl__qmm_ops[0]);
        if (!st)
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(
                g_domain, &esl__qmm_ops[1]);
        if (!st)
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(
                g_domain, &esl__attention_op);
        if (!st)
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(
                g_domain, &esl__attention_op_f16);
        if (!st)
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(
                g_domain, &esl__swiglu_op);
        if (!st)
            st = ESL_ORT_SLOT(api, ESL_ORT_CustomOpDomain_Add, esl_ort_domain_add_fn)(
                g_domain, &esl__embed_op);
        if (st) {
            g_domain = NULL; /* leaked on this error path only; the next call retries */
            return st;
        }
    }
    return ESL_ORT_SLOT(api, ESL_ORT_AddCustomOpDomain, esl_ort_add_domain_fn)(options,
                                                                               g_domain);
}
