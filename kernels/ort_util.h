/*
 * ort_util.h - what the operator files (ort_op.c, ort_attention.c, swiglu.c,
 * ort_embed.c) share: the API
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

/* Releases `st` if there is one (a V1 entry point has nowhere to return it). */
void esl__ort_release(const OrtApi *api, OrtStatus *st);

/* OrtCustomOp members that most operators answer alike (ort_util.c): */
const char *esl__ort_cpu_provider(const OrtCustomOp *op); /* NULL: the CPU provider */
int esl__ort_float_type(const OrtCustomOp *op, size_t index); /* float32 */
size_t esl__ort_one(const OrtCustomOp *op);                    /* one output */
int esl__ort_required(const OrtCustomOp *op, size_t index);   /* required, default memory */
int esl__ort_one_arity(const OrtCustomOp *op);                /* variadic arity 1 */
int esl__ort_not_homogeneous(const OrtCustomOp *op);          /* not homogeneous */

/* The cached attention operator (ort_attention.c), SwiGLU (swiglu.c) and the rows of a
 * MatMulQ8 table (ort_embed.c). */
extern const OrtCustomOp esl__qmm_ops[2]; /* MatMulQ8, MatMulQ4 (ort_op.c) */
extern const OrtCustomOp esl__attention_op;     /* float32 cache */
extern const OrtCustomOp esl__attention_op_f16; /* half-precision cache */
extern const OrtCustomOp esl__swiglu_op;
extern const OrtCustomOp esl__embed_op;

#endif /* ESL_ORT_UTIL_H */
