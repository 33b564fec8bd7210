/* The library onnxruntime loads: registers the ops of the domain llm.kernels. */
#include "ort_api.h"

ApiTable api;
int api_has_parallel_for;
extern OpTable row_quantize_op;

__attribute__((visibility("default"))) Status *RegisterCustomOps(void *options, const ApiBase *base) {
    OpTable *const ops[] = {&row_quantize_op};
    return register_ops(options, base, "llm.kernels", ops, sizeof ops / sizeof ops[0]);
}
