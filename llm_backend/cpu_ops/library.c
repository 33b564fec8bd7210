/* The library onnxruntime loads: registers the ops of the domain llm.kernels that this
   CPU can run, and names them for the engine (llm_kernel_ops). */
#include <string.h>
#include "ort_api.h"

ApiTable api;
ApiTable api_with_parallel_for;
extern OpTable *const row_quantize_op, *const group_attention_op, *const group_attention_half_op,
    *const nibble_matmul_op, *const swiglu_op, *const skip_norm_quantize_op;   /* 0 where not built */

#define EXPORT __attribute__((visibility("default")))

static size_t available(OpTable **ops) {
    size_t n = 0;
    if (row_quantize_op) ops[n++] = row_quantize_op;
    if (skip_norm_quantize_op) ops[n++] = skip_norm_quantize_op;
    if (group_attention_op) ops[n++] = group_attention_op;
    if (group_attention_half_op) ops[n++] = group_attention_half_op;   /* the same name, float16 KV */
    if (nibble_matmul_op) ops[n++] = nibble_matmul_op;
    if (swiglu_op) ops[n++] = swiglu_op;
    return n;
}

/* the names of the ops registered, comma-separated */
EXPORT const char *llm_kernel_ops(void) {
    static char names[256];
    OpTable *ops[8];
    size_t n = available(ops);
    names[0] = 0;
    for (size_t i = 0; i < n; i++) {
        if (i && !strcmp(ops[i]->name(ops[i]), ops[i - 1]->name(ops[i - 1]))) continue;   /* kernels of one op */
        if (i) strcat(names, ",");
        strcat(names, ops[i]->name(ops[i]));
    }
    return names;
}

EXPORT Status *RegisterCustomOps(void *options, const ApiBase *base) {
    OpTable *ops[8];
    size_t n = available(ops);
    return register_ops(options, base, "llm.kernels", ops, n);
}
