/* onnxruntime's C API for a custom-op library, declared without onnxruntime's headers.

   A custom-op library exports RegisterCustomOps, which receives the API base. The C API
   is a versioned table of function pointers: the entries used here are declared by their
   index in that table (entries are only ever appended, so the indices hold for every
   later onnxruntime), and an op's own table by its layout at API version 13. The indices
   were read from onnxruntime's public onnxruntime_c_api.h at version 13;
   KernelContext_ParallelFor (version 17) from a binding that lists the table's offsets. */
#ifndef LLM_ORT_API_H
#define LLM_ORT_API_H
#include <stddef.h>
#include <stdint.h>

typedef void Status;
typedef struct { const void *(*get_api)(uint32_t version); const char *(*version_string)(void); } ApiBase;
typedef void *const *ApiTable;
enum { API_VERSION = 13, MAX_RANK = 8 };
enum { INFO_ATTRIBUTE_FLOAT = 85, INFO_ATTRIBUTE_INT64 = 86, CREATE_DOMAIN = 26, DOMAIN_ADD = 27, ADD_DOMAIN = 28, TENSOR_DATA = 51, DIMS_COUNT = 61, DIMS = 62,
       TYPE_AND_SHAPE = 65, CONTEXT_INPUT = 90, CONTEXT_OUTPUT = 91, RELEASE_STATUS = 93,
       RELEASE_TYPE_AND_SHAPE = 99, PARALLEL_FOR = 274 };
enum { PARALLEL_FOR_VERSION = 17 };
/* ONNX element types an op declares for its inputs and outputs */
enum { ELEM_FLOAT = 1, ELEM_UINT8 = 2, ELEM_INT8 = 3, ELEM_INT32 = 6, ELEM_FLOAT16 = 10 };

typedef struct OpTable {
    uint32_t version;
    void *(*create_kernel)(const struct OpTable *, const void *api, const void *info);
    const char *(*name)(const struct OpTable *);
    const char *(*provider)(const struct OpTable *);
    int (*input_type)(const struct OpTable *, size_t);
    size_t (*input_count)(const struct OpTable *);
    int (*output_type)(const struct OpTable *, size_t);
    size_t (*output_count)(const struct OpTable *);
    void (*compute)(void *kernel, void *context);
    void (*destroy)(void *kernel);
    int (*input_optional)(const struct OpTable *, size_t);
    int (*output_optional)(const struct OpTable *, size_t);
    int (*input_memory)(const struct OpTable *, size_t);
} OpTable;

extern ApiTable api;   /* set by RegisterCustomOps (library.c) */
extern ApiTable api_with_parallel_for;   /* the table at version 17, which has KernelContext_ParallelFor; or 0 */

/* 0 when `status` is success; otherwise releases it and returns 1 */
static inline int failed(Status *status) {
    if (!status) return 0;
    ((void (*)(Status *))api[RELEASE_STATUS])(status);
    return 1;
}

/* the shape of a tensor value; 1 on failure or a rank above MAX_RANK */
static inline int shape_of(const void *value, int64_t *dims, size_t *n) {
    void *info = 0;
    if (failed(((Status *(*)(const void *, void **))api[TYPE_AND_SHAPE])(value, &info))) return 1;
    int bad = failed(((Status *(*)(const void *, size_t *))api[DIMS_COUNT])(info, n)) || *n > MAX_RANK ||
              failed(((Status *(*)(const void *, int64_t *, size_t))api[DIMS])(info, dims, *n));
    ((void (*)(void *))api[RELEASE_TYPE_AND_SHAPE])(info);
    return bad;
}

static inline void *data_of(const void *value) {
    void *p = 0;
    return failed(((Status *(*)(const void *, void **))api[TENSOR_DATA])(value, &p)) ? 0 : p;
}

static inline const void *input_of(void *context, size_t i) {
    const void *v = 0;
    return failed(((Status *(*)(const void *, size_t, const void **))api[CONTEXT_INPUT])(context, i, &v)) ? 0 : v;
}

/* output i of the shape `dims`, allocated by onnxruntime (or the buffer bound to it) */
static inline void *output_of(void *context, size_t i, const int64_t *dims, size_t n) {
    void *v = 0;
    return failed(((Status *(*)(void *, size_t, const int64_t *, size_t, void **))api[CONTEXT_OUTPUT])(
        context, i, dims, n, &v)) ? 0 : v;
}

/* Runs fn(data, i) for i in [0, total) on the session's intra-op threads (the caller's
   included), so a kernel's threads are onnxruntime's own and none spin beside them;
   1 when that is not available or failed (the caller then runs the work itself). */
static inline int parallel_for(void *context, void (*fn)(void *, size_t), size_t total, void *data) {
    if (!api_with_parallel_for) return 1;
    return failed(((Status *(*)(const void *, void (*)(void *, size_t), size_t, size_t, void *))
                   api_with_parallel_for[PARALLEL_FOR])(context, fn, total, 0, data));
}

/* fn(data, i) for i in [0, total): on onnxruntime's threads where it can, on this one
   otherwise (one unit, or no ParallelFor). */
static inline void run_units(void *context, void (*fn)(void *, size_t), size_t total, void *data) {
    if (total > 1 && !parallel_for(context, fn, total, data)) return;
    for (size_t i = 0; i < total; i++) fn(data, i);
}

/* Rows of k elements split into chunks of about CHUNK_ELEMENTS for run_units: a decode
   step's few rows are one chunk (run on this thread), a prefill's many go over
   onnxruntime's threads. */
enum { CHUNK_ELEMENTS = 1 << 15 };
static inline int64_t row_chunks(int64_t rows, int64_t k) {
    int64_t chunks = rows * k / CHUNK_ELEMENTS;
    return chunks < 1 ? 1 : chunks < rows ? chunks : rows;
}

/* the rows [*first, *last) of chunk `chunk` of `chunks` */
static inline void chunk_rows(int64_t rows, size_t chunk, int64_t chunks, int64_t *first, int64_t *last) {
    *first = rows * (int64_t)chunk / chunks;
    *last = rows * ((int64_t)chunk + 1) / chunks;
}

/* whether `value` holds one element a row for `rows` rows ([..., 1]: a row scale) */
static inline int one_per_row(const void *value, int64_t rows) {
    int64_t dims[MAX_RANK], count = 1;
    size_t n = 0;
    if (shape_of(value, dims, &n) || n < 1 || dims[n - 1] != 1) return 0;
    for (size_t i = 0; i < n; i++) count *= dims[i];
    return count == rows;
}

/* Callbacks every op of ours shares: it runs on the CPU, each input and output is
   required, inputs are in the default memory; and, for an op that keeps no state,
   every kernel is one and the same. */
static inline const char *op_on_cpu(const OpTable *op) { (void)op; return 0; }
static inline int op_required(const OpTable *op, size_t i) { (void)op; (void)i; return 0; }
static inline int op_default_memory(const OpTable *op, size_t i) { (void)op; (void)i; return 0; }
static inline void *op_stateless_create(const OpTable *op, const void *a, const void *info) {
    static int instance;
    (void)op; (void)a; (void)info;
    return &instance;
}
static inline void op_stateless_destroy(void *kernel) { (void)kernel; }

/* Registers `ops` in the domain `domain` with the session options. */
static inline Status *register_ops(void *options, const ApiBase *base, const char *domain_name,
                                   OpTable *const *ops, size_t count) {
    api = (ApiTable)base->get_api(API_VERSION);
    if (!api) return 0;   /* an onnxruntime older than API version 13: the ops stay unknown to it */
    api_with_parallel_for = (ApiTable)base->get_api(PARALLEL_FOR_VERSION);
    void *domain = 0;
    Status *s = ((Status *(*)(const char *, void **))api[CREATE_DOMAIN])(domain_name, &domain);
    for (size_t i = 0; !s && i < count; i++) s = ((Status *(*)(void *, const void *))api[DOMAIN_ADD])(domain, ops[i]);
    if (!s) s = ((Status *(*)(void *, void *))api[ADD_DOMAIN])(options, domain);
    return s;
}
#endif
