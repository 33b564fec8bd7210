/* SwiGLU (domain llm.kernels): the MLP's gate after W8A8's fused gate-and-up product, in
   one node instead of five (the product's row scale Mul, Split, Sigmoid, Mul, Mul).

   y float [..., 2F] (the product's unscaled output: gate then up), s float [..., 1] (the
   row's scale, RowQuantize's m) -> h float [..., F], per row:
       g = y[:F] * s;  u = y[F:] * s;  h = g * sigmoid(g) * u
   The scaling is the export's Mul, product for product; the sigmoid is computed here
   (1 / (1 + exp(-g)), the argument kept within +-80), within float rounding of
   onnxruntime's. One pass over the row instead of five nodes, each with onnxruntime's
   fixed cost and a pass of its own over the row.

   Compiled with -ffast-math (vectorized expf). At API version 13 a kernel cannot return
   an error: what it cannot take (an odd width, a scale not of one per row, a failed
   call) gives NaN. */
#include <math.h>
#include "ort_api.h"

typedef struct { const float *y, *s; float *h; int64_t rows, f, chunks; } Work;

static void gate_row(const float *y, float s, float *h, int64_t f) {
    const float *up = y + f;
    for (int64_t i = 0; i < f; i++) {
        float g = y[i] * s, u = up[i] * s;
        float t = g > 80.f ? 80.f : g < -80.f ? -80.f : g;
        h[i] = g / (1.f + expf(-t)) * u;
    }
}

static void gate_rows(void *data, size_t chunk) {
    const Work *w = data;
    int64_t first, last;
    chunk_rows(w->rows, chunk, w->chunks, &first, &last);
    for (int64_t r = first; r < last; r++) gate_row(w->y + r * 2 * w->f, w->s[r], w->h + r * w->f, w->f);
}

static void compute(void *kernel, void *context) {
    (void)kernel;
    const void *y_in = input_of(context, 0), *s_in = input_of(context, 1);
    int64_t dims[MAX_RANK];
    size_t n = 0;
    if (!y_in || !s_in || shape_of(y_in, dims, &n) || n < 1) return;
    int64_t width = dims[n - 1], rows = 1;
    for (size_t i = 0; i + 1 < n; i++) rows *= dims[i];
    int ok = width % 2 == 0 && one_per_row(s_in, rows);
    dims[n - 1] = width / 2;
    void *h_out = output_of(context, 0, dims, n);
    float *h = h_out ? data_of(h_out) : 0;
    if (!h) return;
    const float *y = data_of(y_in), *s = data_of(s_in);
    int64_t f = width / 2;
    if (!ok || !y || !s) {
        for (int64_t i = 0; i < rows * f; i++) h[i] = NAN;
        return;
    }
    Work w = {y, s, h, rows, f, row_chunks(rows, f)};
    run_units(context, gate_rows, (size_t)w.chunks, &w);
}

static const char *name(const OpTable *op) { (void)op; return "SwiGLU"; }
static int input_type(const OpTable *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t input_count(const OpTable *op) { (void)op; return 2; }
static int output_type(const OpTable *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t output_count(const OpTable *op) { (void)op; return 1; }

static OpTable op = {API_VERSION, op_stateless_create, name, op_on_cpu, input_type, input_count, output_type,
                     output_count, compute, op_stateless_destroy, op_required, op_required, op_default_memory};
OpTable *const swiglu_op = &op;
