/*
 * ort_abi.h - the part of onnxruntime's C ABI that ort_op.c uses, declared here.
 *
 * onnxruntime's Python wheel ships its C library but no headers, and no package
 * registry this project builds from carries them. Its C API is one table of function
 * pointers (OrtApi) that only ever grows at the end: a slot keeps its index in every
 * later release, and OrtApiBase.GetApi(version) returns NULL when the library is
 * older than `version`. So a custom-operator library needs only the indices of the
 * slots it calls and the layout of the OrtCustomOp struct it hands over, both listed
 * below with the API version that introduced them. Only what ort_op.c calls is here.
 * Checked against onnxruntime 1.20 to 1.32 by tests/test_qmatmul.py, which runs the
 * operator through onnxruntime (a wrong slot would fail or crash those tests).
 */
#ifndef ESL_ORT_ABI_H
#define ESL_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

/* Opaque handles of onnxruntime. */
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtApi OrtApi; /* used only as a table of slots, see ESL_ORT_SLOT */

/* OrtCustomOpInputOutputCharacteristic values used here. */
enum { ESL_ORT_REQUIRED = 0, ESL_ORT_OPTIONAL = 1 };

/* OrtErrorCode values used here. */
enum { ESL_ORT_FAIL = 1, ESL_ORT_INVALID_ARGUMENT = 2 };

/* ONNXTensorElementDataType values used here. */
enum {
    ESL_ORT_FLOAT = 1,
    ESL_ORT_UINT8 = 2,
    ESL_ORT_INT32 = 6,
    ESL_ORT_INT64 = 7,
    ESL_ORT_FLOAT16 = 10
};

/* The exported entry point's table (never versioned). */
typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* API version whose table has every slot below (onnxruntime 1.17). */
#define ESL_ORT_API_VERSION 17

/* Slot indices in OrtApi, with the API version that added each. */
#define ESL_ORT_CreateStatus 0                       /* 1 */
#define ESL_ORT_CreateCustomOpDomain 26              /* 1 */
#define ESL_ORT_CustomOpDomain_Add 27                /* 1 */
#define ESL_ORT_AddCustomOpDomain 28                 /* 1 */
#define ESL_ORT_GetTensorMutableData 51              /* 1 */
#define ESL_ORT_GetTensorElementType 60              /* 1 */
#define ESL_ORT_GetDimensionsCount 61                /* 1 */
#define ESL_ORT_GetDimensions 62                     /* 1 */
#define ESL_ORT_GetTensorTypeAndShape 65             /* 1 */
#define ESL_ORT_KernelInfoGetAttribute_float 85      /* 1 */
#define ESL_ORT_KernelInfoGetAttribute_int64 86      /* 1 */
#define ESL_ORT_KernelContext_GetInput 90            /* 1 */
#define ESL_ORT_KernelContext_GetOutput 91           /* 1 */
#define ESL_ORT_ReleaseStatus 93                     /* 1 */
#define ESL_ORT_ReleaseTensorTypeAndShapeInfo 99     /* 1 */
#define ESL_ORT_KernelInfoGetConstantInput_tensor 249 /* 15 */
#define ESL_ORT_KernelContext_ParallelFor 274        /* 17 */

/* The function in slot IDX of `api`, cast to TYPE. */
#define ESL_ORT_SLOT(api, IDX, TYPE) ((TYPE)(((void *const *)(const void *)(api))[IDX]))

typedef OrtStatus *(*esl_ort_create_status_fn)(int code, const char *msg);
typedef OrtStatus *(*esl_ort_create_domain_fn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*esl_ort_domain_add_fn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*esl_ort_add_domain_fn)(OrtSessionOptions *options,
                                            OrtCustomOpDomain *domain);
typedef OrtStatus *(*esl_ort_mutable_data_fn)(OrtValue *value, void **out);
typedef OrtStatus *(*esl_ort_element_type_fn)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*esl_ort_dims_count_fn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*esl_ort_dims_fn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims,
                                      size_t n);
typedef OrtStatus *(*esl_ort_type_and_shape_fn)(const OrtValue *value,
                                                OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*esl_ort_attr_float_fn)(const OrtKernelInfo *info, const char *name,
                                            float *out);
typedef OrtStatus *(*esl_ort_attr_int64_fn)(const OrtKernelInfo *info, const char *name,
                                            int64_t *out);
typedef OrtStatus *(*esl_ort_get_input_fn)(const OrtKernelContext *ctx, size_t index,
                                           const OrtValue **out);
typedef OrtStatus *(*esl_ort_get_output_fn)(OrtKernelContext *ctx, size_t index,
                                            const int64_t *dims, size_t n, OrtValue **out);
typedef void (*esl_ort_release_status_fn)(OrtStatus *status);
typedef void (*esl_ort_release_info_fn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*esl_ort_constant_input_fn)(const OrtKernelInfo *info, size_t index,
                                                int *is_constant, const OrtValue **out);
typedef OrtStatus *(*esl_ort_parallel_for_fn)(const OrtKernelContext *ctx,
                                              void (*fn)(void *, size_t), size_t total,
                                              size_t num_batch, void *user_data);

/*
 * OrtCustomOp as onnxruntime reads it when `version` is 16: the thirteen members of
 * API 1-13, the variadic queries of 14, and the status-returning kernel functions of
 * 16. onnxruntime reads no member past KernelComputeV2 for version 16.
 */
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api,
                          const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api,
                                 const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
} OrtCustomOp;

#define ESL_ORT_CUSTOM_OP_VERSION 16

#endif /* ESL_ORT_ABI_H */
