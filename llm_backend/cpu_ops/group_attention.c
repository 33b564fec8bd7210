/* GroupAttention (domain llm.kernels): onnxruntime's GroupQueryAttention as the export
   uses it on the CPU (packed QKV, rotary embedding on q and k, half-rotation, fp32 KV
   buffers written in place), with one pass over each key-value head's keys and values
   for all the query heads that share them. onnxruntime's kernel takes each row and
   query head on its own, so with 3 query heads per key-value head it reads every key and
   value 3 times; at 16 rows that kernel was a third of a decode step (bench.op_profile).

   inputs   0 qkv [B, S, (H + 2 Hkv) D]   1 past_key, 2 past_value [B, Hkv, M, D]
            3 seqlens_k int32 [B] (positions of the row after this call, minus 1)
            4 total_sequence_length int32 (scalar)   5 cos_cache, 6 sin_cache [P, D/2]
   outputs  0 [B, S, H D]   1 present_key, 2 present_value [B, Hkv, M, D] (bound onto the
            past buffers as the engine binds them; copied from them otherwise)
   attributes scale (float; 0 or absent: 1/sqrt(D)), num_heads (H; the output's width when a
            call is refused)

   As GroupQueryAttention does: when S equals total_sequence_length the call is a first
   prompt (rows right-padded to S; token s sits at position s), otherwise token s of row
   b sits at position seqlens_k[b] + 1 - S + s. Each token attends to the positions up to
   its own. D must be 64 (four AVX-512 registers a vector) and H / Hkv at most 4.

   Compiled with -ffast-math (vectorized expf), linked without it (no flush-to-zero for
   the process). At API version 13 a kernel cannot return an error: what it cannot take
   (shapes, a position outside the buffer or the rotary tables, a failed call) leaves
   the KV untouched and the output NaN. */
#include "ort_api.h"
#ifdef __AVX512F__
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

enum { D = 64, HALF = D / 2, MAX_GROUP = 4, BLOCK = 32 };

typedef struct { float scale; int64_t heads; } Kernel;

typedef struct {
    const float *qkv, *cos, *sin;
    float *q, *kc, *vc, *out;
    const int64_t *start;           /* position of each row's first new token */
    int64_t b, s, h, hkv, m;
} Work;

static void rotate(const float *x, float *y, const float *cos, const float *sin) {
    for (int i = 0; i < HALF; i++) {
        float x1 = x[i], x2 = x[i + HALF];
        y[i] = x1 * cos[i] - x2 * sin[i];
        y[i + HALF] = x2 * cos[i] + x1 * sin[i];
    }
}

/* phase 1, one token of one row: q rotated into the work buffer, k rotated and v copied
   into the KV buffers at the token's position */
static void place_token(void *data, size_t unit) {
    const Work *w = data;
    int64_t b = (int64_t)unit / w->s, s = (int64_t)unit % w->s, pos = w->start[b] + s;
    const float *x = w->qkv + ((b * w->s + s) * (w->h + 2 * w->hkv)) * D;
    const float *cos = w->cos + pos * HALF, *sin = w->sin + pos * HALF;
    for (int64_t h = 0; h < w->h; h++) rotate(x + h * D, w->q + ((b * w->s + s) * w->h + h) * D, cos, sin);
    for (int64_t h = 0; h < w->hkv; h++) {
        int64_t at = ((b * w->hkv + h) * w->m + pos) * D;
        rotate(x + (w->h + h) * D, w->kc + at, cos, sin);
        memcpy(w->vc + at, x + (w->h + w->hkv + h) * D, D * sizeof(float));
    }
}

/* phase 2, one token of one row and one key-value head: its G query heads over the
   positions 0..pos, keys and values read once, softmax online in blocks of 32 keys */
#define ATTEND(G) \
static void attend_##G(const Work *w, int64_t b, int64_t s, int64_t kvh, float scale) { \
    int64_t len = w->start[b] + s + 1; \
    const float *K = w->kc + (b * w->hkv + kvh) * w->m * D, *V = w->vc + (b * w->hkv + kvh) * w->m * D; \
    const float *qs = w->q + ((b * w->s + s) * w->h + kvh * G) * D; \
    __m512 q[G][4], acc[G][4]; \
    float mx[G], sum[G], p[G][BLOCK]; \
    for (int g = 0; g < G; g++) { \
        for (int c = 0; c < 4; c++) { q[g][c] = _mm512_loadu_ps(qs + g * D + c * 16); acc[g][c] = _mm512_setzero_ps(); } \
        mx[g] = -INFINITY; sum[g] = 0.f; \
    } \
    for (int64_t j0 = 0; j0 < len; j0 += BLOCK) { \
        int n = len - j0 < BLOCK ? (int)(len - j0) : BLOCK; \
        for (int j = 0; j < n; j++) { \
            const float *kj = K + (j0 + j) * D; \
            __m512 k0 = _mm512_loadu_ps(kj), k1 = _mm512_loadu_ps(kj + 16), \
                   k2 = _mm512_loadu_ps(kj + 32), k3 = _mm512_loadu_ps(kj + 48); \
            for (int g = 0; g < G; g++) { \
                __m512 a = _mm512_mul_ps(q[g][0], k0); \
                a = _mm512_fmadd_ps(q[g][1], k1, a); \
                a = _mm512_fmadd_ps(q[g][2], k2, a); \
                a = _mm512_fmadd_ps(q[g][3], k3, a); \
                p[g][j] = _mm512_reduce_add_ps(a) * scale; \
            } \
        } \
        for (int g = 0; g < G; g++) { \
            float m = mx[g]; \
            for (int j = 0; j < n; j++) m = p[g][j] > m ? p[g][j] : m; \
            float fix = expf(mx[g] - m), t = 0.f; \
            for (int j = 0; j < n; j++) { p[g][j] = expf(p[g][j] - m); t += p[g][j]; } \
            sum[g] = sum[g] * fix + t; \
            mx[g] = m; \
            __m512 f = _mm512_set1_ps(fix); \
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], f); \
        } \
        for (int j = 0; j < n; j++) { \
            const float *vj = V + (j0 + j) * D; \
            __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16), \
                   v2 = _mm512_loadu_ps(vj + 32), v3 = _mm512_loadu_ps(vj + 48); \
            for (int g = 0; g < G; g++) { \
                __m512 pw = _mm512_set1_ps(p[g][j]); \
                acc[g][0] = _mm512_fmadd_ps(pw, v0, acc[g][0]); \
                acc[g][1] = _mm512_fmadd_ps(pw, v1, acc[g][1]); \
                acc[g][2] = _mm512_fmadd_ps(pw, v2, acc[g][2]); \
                acc[g][3] = _mm512_fmadd_ps(pw, v3, acc[g][3]); \
            } \
        } \
    } \
    float *o = w->out + ((b * w->s + s) * w->h + kvh * G) * D; \
    for (int g = 0; g < G; g++) { \
        __m512 inv = _mm512_set1_ps(1.f / sum[g]); \
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + g * D + c * 16, _mm512_mul_ps(acc[g][c], inv)); \
    } \
}
ATTEND(1)
ATTEND(2)
ATTEND(3)
ATTEND(4)

typedef struct { const Work *w; float scale; } Phase2;

static void attend_unit(void *data, size_t unit) {
    const Phase2 *p = data;
    const Work *w = p->w;
    int64_t kvh = (int64_t)unit % w->hkv, bs = (int64_t)unit / w->hkv;
    int64_t b = bs / w->s, s = bs % w->s;
    switch (w->h / w->hkv) {
    case 1: attend_1(w, b, s, kvh, p->scale); break;
    case 2: attend_2(w, b, s, kvh, p->scale); break;
    case 3: attend_3(w, b, s, kvh, p->scale); break;
    default: attend_4(w, b, s, kvh, p->scale); break;
    }
}

/* A refused call still gives its present output: the past as it was (nothing written
   when present is bound onto it, a copy otherwise). */
static void keep_past(void *context, const void *past, const int64_t *dims, size_t index) {
    void *value = output_of(context, index, dims, 4);
    float *dst = value ? data_of(value) : 0;
    const float *src = data_of(past);
    size_t n = 1;
    for (int i = 0; i < 4; i++) n *= dims[i] > 0 ? (size_t)dims[i] : 0;
    if (dst && src && dst != src) memmove(dst, src, n * sizeof(float));
}

static void compute(void *kernel, void *context) {
    const Kernel *kern = kernel;
    const void *in[7];
    int64_t xd[MAX_RANK], kd[MAX_RANK], vd[MAX_RANK], sd[MAX_RANK], cd[MAX_RANK], nd[MAX_RANK], td[MAX_RANK];
    size_t xn = 0, kn = 0, vn = 0, sn = 0, cn = 0, nn = 0, tn = 0;
    for (int i = 0; i < 7; i++)
        if (!(in[i] = input_of(context, i))) return;
    if (shape_of(in[0], xd, &xn) || xn != 3) return;
    int64_t out_dims[3] = {xd[0], xd[1], 0};
    int ok = !shape_of(in[1], kd, &kn) && kn == 4 && !shape_of(in[2], vd, &vn) && vn == 4 &&
             !shape_of(in[3], sd, &sn) && sn == 1 && !shape_of(in[5], cd, &cn) && cn == 2 &&
             !shape_of(in[6], nd, &nn) && nn == 2 &&
             !shape_of(in[4], td, &tn) && (tn == 0 || (tn == 1 && td[0] == 1));   /* one total length */
    int64_t b = xd[0], s = xd[1], hkv = ok ? kd[1] : 0, m = ok ? kd[2] : 0;
    int64_t h = ok && hkv > 0 ? xd[2] / D - 2 * hkv : 0;
    ok = ok && hkv > 0 && h > 0 && xd[2] == (h + 2 * hkv) * D && h % hkv == 0 && h / hkv <= MAX_GROUP &&
         kd[0] == b && kd[3] == D && memcmp(kd, vd, sizeof(int64_t) * 4) == 0 && sd[0] == b &&
         cd[1] == HALF && memcmp(cd, nd, sizeof(int64_t) * 2) == 0;
    out_dims[2] = ok ? h * D : kern->heads > 0 ? kern->heads * D : xd[2];
    void *out_value = output_of(context, 0, out_dims, 3);
    float *out = out_value ? data_of(out_value) : 0;
    if (!out) return;
    size_t out_len = (size_t)(b * s * out_dims[2]);
    const int32_t *seqlens = ok ? data_of(in[3]) : 0, *total = ok ? data_of(in[4]) : 0;
    int64_t *start = ok ? malloc(sizeof(int64_t) * (b ? b : 1)) : 0;
    ok = ok && seqlens && total && start;
    for (int64_t r = 0; ok && r < b; r++) {
        start[r] = s == total[0] ? 0 : (int64_t)seqlens[r] + 1 - s;   /* a first prompt: from 0 */
        ok = start[r] >= 0 && start[r] + s <= m && start[r] + s <= cd[0];
    }
    void *pk = ok ? output_of(context, 1, kd, 4) : 0, *pv = ok ? output_of(context, 2, kd, 4) : 0;
    float *kc = pk ? data_of(pk) : 0, *vc = pv ? data_of(pv) : 0;
    const float *past_k = ok ? data_of(in[1]) : 0, *past_v = ok ? data_of(in[2]) : 0;
    float *q = ok ? malloc(sizeof(float) * (size_t)(b * s * h * D)) : 0;
    const float *x = ok ? data_of(in[0]) : 0, *cos = ok ? data_of(in[5]) : 0, *sin = ok ? data_of(in[6]) : 0;
    if (!kc || !vc || !past_k || !past_v || !q || !x || !cos || !sin) {
        for (size_t i = 0; i < out_len; i++) out[i] = NAN;
        if (kn == 4) keep_past(context, in[1], kd, 1);
        if (vn == 4) keep_past(context, in[2], vd, 2);
        free(start);
        free(q);
        return;
    }
    size_t kv_bytes = (size_t)(b * hkv * m * D) * sizeof(float);
    if (kc != past_k) memmove(kc, past_k, kv_bytes);
    if (vc != past_v) memmove(vc, past_v, kv_bytes);
    Work w = {x, cos, sin, q, kc, vc, out, start, b, s, h, hkv, m};
    run_units(context, place_token, (size_t)(b * s), &w);
    Phase2 p = {&w, kern->scale > 0 ? kern->scale : 1.f / sqrtf((float)D)};
    run_units(context, attend_unit, (size_t)(b * s * hkv), &p);
    free(start);
    free(q);
}

static void *create_kernel(const OpTable *op, const void *a, const void *info) {
    (void)op; (void)a;
    Kernel *k = calloc(1, sizeof(Kernel));
    if (k && failed(((Status *(*)(const void *, const char *, float *))api[INFO_ATTRIBUTE_FLOAT])(info, "scale", &k->scale)))
        k->scale = 0.f;   /* absent: 1/sqrt(D) */
    if (k && failed(((Status *(*)(const void *, const char *, int64_t *))api[INFO_ATTRIBUTE_INT64])(info, "num_heads", &k->heads)))
        k->heads = 0;     /* absent: the output of a refused call takes the input's width */
    return k;
}
static void destroy(void *kernel) { free(kernel); }
static const char *name(const OpTable *op) { (void)op; return "GroupAttention"; }
static int input_type(const OpTable *op, size_t i) { (void)op; return i == 3 || i == 4 ? ELEM_INT32 : ELEM_FLOAT; }
static size_t input_count(const OpTable *op) { (void)op; return 7; }
static int output_type(const OpTable *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t output_count(const OpTable *op) { (void)op; return 3; }

static OpTable op = {API_VERSION, create_kernel, name, op_on_cpu, input_type, input_count, output_type,
                     output_count, compute, destroy, op_required, op_required, op_default_memory};
OpTable *const group_attention_op = &op;
#else
OpTable *const group_attention_op = 0;   /* no AVX-512 here: the op is not registered */
#endif
