/*
 * ort_util.h - what the operator files (ort_op.c, ort_attention.c) share: the API
 * table, error statuses that name the operator, tensor shape and data access.
 */
#ifndef ESL_ORT_UTIL_H
#define ESL_ORT_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "ort_abi.h"

/* The largest tensor rank the operators read. */
#define ESL_ORT_MAX_DIMS 8

/* The API table that RegisterCustomOps was given; set before any kernel runs. */
extern const OrtApi *esl__ort_api;

/* Returns a status "ai.edgeslm::<op>: <message>" with onnxruntime error `code`. */
OrtStatus *esl__ort_fail(const char *op, int code, const char *fmt, ...);

/* Reads the element type, rank and dims (rank <= ESL_ORT_MAX_DIMS) of a tensor value. */
OrtStatus *esl__ort_shape(const char *op, const OrtValue *v, int *type, size_t *rank,
                          int64_t *dims);

/* The data pointer of a tensor value (onnxruntime's API takes it as mutable). */
OrtStatus *esl__ort_data(const OrtValue *v, void **out);

/* The cached attention operator (ort_attention.c) and the SwiGLU one (swiglu.c). */
extern const OrtCustomOp esl__attention_op;
extern const OrtCustomOp esl__swiglu_op;

#endif /* ESL_ORT_UTIL_H */
