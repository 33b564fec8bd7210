/* RowQuantize (domain llm.kernels): W8A8's per-row activation quantization in one node.

   x float [..., K] -> q uint8 [..., K], m float [..., 1], per row of K:
       m = max |x|;  q = saturate(round_half_even((x / m) / (1/127)) + 128)
   exactly what the export's Abs, ReduceMax, Div and QuantizeLinear(1/127, 128) compute,
   division for division, so the logits are bit for bit the same; one pass over the row
   instead of four nodes, each with onnxruntime's fixed cost per node. A row of zeros
   has m = 0: 0/0 gives q = 0 here as in QuantizeLinear, and the product's final x m
   makes that row's output 0.

   SkipNormQuantize (the same domain), in this file as it ends in the same quantization:
   a W8A8 product's row scale, the residual's SkipSimplifiedLayerNormalization and the
   next product's quantization in one node instead of three:
       x float [..., K] (residual), y float [..., K] (the product's unscaled output),
       s float [..., 1] (its row scale), gamma float [K]; attribute epsilon
       -> q uint8 [..., K], m float [..., 1] (as RowQuantize's, of the normed row),
          sum float [..., K] (x + y * s, the next residual)
   computed as onnxruntime's kernels do, operation for operation (the float product, the
   sum, the squares added in order, sqrt(sum / K + epsilon), value / rms * gamma), so the
   bytes are the same; compiled with -ffp-contract=off so that no product and sum fuse
   into one rounding. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ort_api.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static const float INV127 = 1.0f / 127.0f;

static float absmax(const float *x, int64_t k) {
    int64_t i = 0;
    float m = 0.f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) acc = _mm512_max_ps(acc, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    m = _mm512_reduce_max_ps(acc);
#endif
    for (; i < k; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

static void quantize_row(const float *x, uint8_t *q, int64_t k, float m) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(INV127);
    const __m512 lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
    const __m512i zp = _mm512_set1_epi32(128);
    for (; i + 16 <= k; i += 16) {
        __m512 t = _mm512_div_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vm), vs);
        t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);   /* a NaN (0/0) becomes -128 */
        __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(t), zp);   /* rounds half to even */
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(r));
    }
#endif
    for (; i < k; i++) {
        float t = (x[i] / m) / INV127;
        t = t > -128.f ? t : -128.f;   /* NaN compares false: -128, as above */
        t = t < 127.f ? t : 127.f;
        q[i] = (uint8_t)((int)nearbyintf(t) + 128);
    }
}

typedef struct { const float *x; uint8_t *q; float *m; int64_t rows, k, chunks; } Work;

static void quantize_rows(void *data, size_t chunk) {
    const Work *w = data;
    int64_t first, last;
    chunk_rows(w->rows, chunk, w->chunks, &first, &last);
    for (int64_t r = first; r < last; r++) {
        w->m[r] = absmax(w->x + r * w->k, w->k);
        quantize_row(w->x + r * w->k, w->q + r * w->k, w->k, w->m[r]);
    }
}

/* At API version 13 a kernel cannot return an error: on inputs it cannot take (a failed
   call, a rank above 8) it writes m = NaN, which turns the product's rows into NaN rather
   than into a plausible wrong answer. */
static void compute(void *kernel, void *context) {
    (void)kernel;
    const void *in = input_of(context, 0);
    int64_t dims[MAX_RANK];
    size_t n = 0;
    if (!in || shape_of(in, dims, &n) || n < 1) return;
    void *q_out = output_of(context, 0, dims, n);
    uint8_t *q = q_out ? data_of(q_out) : 0;
    int64_t k = dims[n - 1], rows = 1;
    for (size_t i = 0; i + 1 < n; i++) rows *= dims[i];
    dims[n - 1] = 1;
    void *m_out = output_of(context, 1, dims, n);
    float *m = m_out ? data_of(m_out) : 0;
    const float *x = data_of(in);
    if (!m) return;
    if (!q || !x) {
        for (int64_t r = 0; r < rows; r++) m[r] = NAN;
        return;
    }
    Work w = {x, q, m, rows, k, row_chunks(rows, k)};
    run_units(context, quantize_rows, (size_t)w.chunks, &w);
}

/* -- SkipNormQuantize ------------------------------------------------------------------ */

typedef struct { float epsilon; } NormKernel;

typedef struct {
    const float *x, *y, *s, *gamma;
    uint8_t *q;
    float *m, *sum;
    int64_t rows, k, chunks;
    float epsilon;
} NormWork;

static void norm_rows(void *data, size_t chunk) {
    const NormWork *w = data;
    int64_t first, last;
    chunk_rows(w->rows, chunk, w->chunks, &first, &last);
    float *normed = malloc(sizeof(float) * (size_t)w->k);
    for (int64_t r = first; r < last; r++) {
        const float *x = w->x + r * w->k, *y = w->y + r * w->k;
        float *sum = w->sum + r * w->k, s = w->s[r], squares = 0.f;
        if (!normed) { w->m[r] = NAN; continue; }
        for (int64_t i = 0; i < w->k; i++) {   /* in order, one rounding each, as onnxruntime */
            float v = x[i] + y[i] * s;
            sum[i] = v;
            squares += v * v;
        }
        float rms = sqrtf(squares / (float)w->k + w->epsilon);
        for (int64_t i = 0; i < w->k; i++) normed[i] = sum[i] / rms * w->gamma[i];
        w->m[r] = absmax(normed, w->k);
        quantize_row(normed, w->q + r * w->k, w->k, w->m[r]);
    }
    free(normed);
}

static void norm_compute(void *kernel, void *context) {
    const NormKernel *kern = kernel;
    const void *in[4];
    int64_t dims[MAX_RANK], yd[MAX_RANK], gd[MAX_RANK];
    size_t n = 0, yn = 0, gn = 0;
    for (int i = 0; i < 4; i++)
        if (!(in[i] = input_of(context, (size_t)i))) return;
    if (shape_of(in[0], dims, &n) || n < 1) return;
    int64_t k = dims[n - 1], rows = 1;
    for (size_t i = 0; i + 1 < n; i++) rows *= dims[i];
    int ok = !shape_of(in[1], yd, &yn) && yn == n && !memcmp(yd, dims, n * sizeof(int64_t)) &&
             one_per_row(in[2], rows) && !shape_of(in[3], gd, &gn) && gn == 1 && gd[0] == k;
    void *q_out = output_of(context, 0, dims, n), *sum_out = output_of(context, 2, dims, n);
    dims[n - 1] = 1;
    void *m_out = output_of(context, 1, dims, n);
    float *m = m_out ? data_of(m_out) : 0, *sum = sum_out ? data_of(sum_out) : 0;
    uint8_t *q = q_out ? data_of(q_out) : 0;
    if (!m) return;
    const float *x = data_of(in[0]), *y = data_of(in[1]), *s = data_of(in[2]), *gamma = data_of(in[3]);
    if (!ok || !q || !sum || !x || !y || !s || !gamma) {
        for (int64_t r = 0; r < rows; r++) m[r] = NAN;   /* the product after it gives NaN rows */
        return;
    }
    NormWork w = {x, y, s, gamma, q, m, sum, rows, k, row_chunks(rows, k), kern->epsilon};
    run_units(context, norm_rows, (size_t)w.chunks, &w);
}

static void *norm_create(const OpTable *op, const void *a, const void *info) {
    (void)op; (void)a;
    NormKernel *k = calloc(1, sizeof(NormKernel));
    if (k && failed(((Status *(*)(const void *, const char *, float *))api[INFO_ATTRIBUTE_FLOAT])(info, "epsilon", &k->epsilon)))
        k->epsilon = 1e-5f;   /* onnxruntime's requires it; the export always writes it */
    return k;
}
static void norm_destroy(void *kernel) { free(kernel); }
static const char *norm_name(const OpTable *op) { (void)op; return "SkipNormQuantize"; }
static size_t norm_input_count(const OpTable *op) { (void)op; return 4; }
static size_t norm_output_count(const OpTable *op) { (void)op; return 3; }

static const char *name(const OpTable *op) { (void)op; return "RowQuantize"; }
static int input_type(const OpTable *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t input_count(const OpTable *op) { (void)op; return 1; }
static int output_type(const OpTable *op, size_t i) { (void)op; return i == 0 ? ELEM_UINT8 : ELEM_FLOAT; }
static size_t output_count(const OpTable *op) { (void)op; return 2; }

static OpTable op = {API_VERSION, op_stateless_create, name, op_on_cpu, input_type, input_count, output_type,
                     output_count, compute, op_stateless_destroy, op_required, op_required, op_default_memory};
OpTable *const row_quantize_op = &op;

static OpTable norm_op = {API_VERSION, norm_create, norm_name, op_on_cpu, input_type, norm_input_count,
                          output_type, norm_output_count, norm_compute, norm_destroy, op_required, op_required,
                          op_default_memory};
OpTable *const skip_norm_quantize_op = &norm_op;
