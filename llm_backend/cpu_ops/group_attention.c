/* GroupAttention (domain llm.kernels): onnxruntime's GroupQueryAttention as the export
   uses it on the CPU (packed QKV, rotary embedding on q and k, half-rotation, KV buffers
   written in place), with one pass over each key-value head's keys and values
   for all the query heads that share them. onnxruntime's kernel takes each row and
   query head on its own, so with 3 query heads per key-value head it reads every key and
   value 3 times; at 16 rows that kernel was a third of a decode step (bench.op_profile).

   inputs   0 qkv [B, S, (H + 2 Hkv) D]   1 past_key, 2 past_value [B, Hkv, M, D], float or
            float16 (two kernels of one name, as GroupQueryAttention's T; in float16 the
            KV stream is half the bytes, which a decode step of many rows waits on)
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

   float16 KV: keys (after rotation) and values are rounded to nearest on the way in,
   clamped to +-65504 (no infinity; a NaN stays NaN), and read back exactly; everything
   else is computed in float as with float KV.

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

typedef struct { float scale; int64_t heads; int half; } Kernel;

typedef struct {
    const float *qkv, *cos, *sin;
    float *q, *out;
    void *kc, *vc;                  /* float, or float16 (uint16_t) where half */
    const int64_t *start;           /* position of each row's first new token */
    int64_t b, s, h, hkv, m;
    int half;
} Work;

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* 16 elements of a KV buffer at element i, as floats */
ALWAYS_INLINE __m512 load_kv(const void *buf, int64_t i, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)buf + i)))
                : _mm512_loadu_ps((const float *)buf + i);
}

/* a head's D floats into a KV buffer at element i */
static void store_kv(void *buf, int64_t i, const float *x, int half) {
    if (!half) {
        memcpy((float *)buf + i, x, D * sizeof(float));
        return;
    }
    const __m512 lo = _mm512_set1_ps(-65504.f), hi = _mm512_set1_ps(65504.f);
    for (int c = 0; c < D; c += 16) {
        /* max/min return their second operand when either is NaN: x's NaN stays */
        __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_loadu_ps(x + c)));
        _mm256_storeu_si256((__m256i *)((uint16_t *)buf + i + c),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

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
        float k[D];
        rotate(x + (w->h + h) * D, k, cos, sin);
        store_kv(w->kc, at, k, w->half);
        store_kv(w->vc, at, x + (w->h + w->hkv + h) * D, w->half);
    }
}

/* phase 2, one token of one row and one key-value head: its G query heads over the
   positions 0..pos, keys and values read once, softmax online in blocks of 32 keys.
   Inlined with G and half constant (attend_unit). */
ALWAYS_INLINE void attend(const Work *w, int64_t b, int64_t s, int64_t kvh, float scale, const int G,
                          const int half) {
    int64_t len = w->start[b] + s + 1, base = (b * w->hkv + kvh) * w->m * D;
    const float *qs = w->q + ((b * w->s + s) * w->h + kvh * G) * D;
    __m512 q[MAX_GROUP][4], acc[MAX_GROUP][4];
    float mx[MAX_GROUP], sum[MAX_GROUP], p[MAX_GROUP][BLOCK];
    for (int g = 0; g < G; g++) {
        for (int c = 0; c < 4; c++) { q[g][c] = _mm512_loadu_ps(qs + g * D + c * 16); acc[g][c] = _mm512_setzero_ps(); }
        mx[g] = -INFINITY; sum[g] = 0.f;
    }
    for (int64_t j0 = 0; j0 < len; j0 += BLOCK) {
        int n = len - j0 < BLOCK ? (int)(len - j0) : BLOCK;
        for (int j = 0; j < n; j++) {
            int64_t at = base + (j0 + j) * D;
            __m512 k0 = load_kv(w->kc, at, half), k1 = load_kv(w->kc, at + 16, half),
                   k2 = load_kv(w->kc, at + 32, half), k3 = load_kv(w->kc, at + 48, half);
            for (int g = 0; g < G; g++) {
                __m512 a = _mm512_mul_ps(q[g][0], k0);
                a = _mm512_fmadd_ps(q[g][1], k1, a);
                a = _mm512_fmadd_ps(q[g][2], k2, a);
                a = _mm512_fmadd_ps(q[g][3], k3, a);
                p[g][j] = _mm512_reduce_add_ps(a) * scale;
            }
        }
        for (int g = 0; g < G; g++) {
            float m = mx[g];
            for (int j = 0; j < n; j++) m = p[g][j] > m ? p[g][j] : m;
            float fix = expf(mx[g] - m), t = 0.f;
            for (int j = 0; j < n; j++) { p[g][j] = expf(p[g][j] - m); t += p[g][j]; }
            sum[g] = sum[g] * fix + t;
            mx[g] = m;
            __m512 f = _mm512_set1_ps(fix);
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], f);
        }
        for (int j = 0; j < n; j++) {
            int64_t at = base + (j0 + j) * D;
            __m512 v0 = load_kv(w->vc, at, half), v1 = load_kv(w->vc, at + 16, half),
                   v2 = load_kv(w->vc, at + 32, half), v3 = load_kv(w->vc, at + 48, half);
            for (int g = 0; g < G; g++) {
                __m512 pw = _mm512_set1_ps(p[g][j]);
                acc[g][0] = _mm512_fmadd_ps(pw, v0, acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(pw, v1, acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(pw, v2, acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(pw, v3, acc[g][3]);
            }
        }
    }
    float *o = w->out + ((b * w->s + s) * w->h + kvh * G) * D;
    for (int g = 0; g < G; g++) {
        __m512 inv = _mm512_set1_ps(1.f / sum[g]);
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + g * D + c * 16, _mm512_mul_ps(acc[g][c], inv));
    }
}

typedef struct { const Work *w; float scale; } Phase2;

static void attend_unit(void *data, size_t unit) {
    const Phase2 *p = data;
    const Work *w = p->w;
    int64_t kvh = (int64_t)unit % w->hkv, bs = (int64_t)unit / w->hkv;
    int64_t b = bs / w->s, s = bs % w->s;
    float scale = p->scale;
    switch ((w->h / w->hkv) * 2 + (w->half != 0)) {
    case 2: attend(w, b, s, kvh, scale, 1, 0); break;
    case 3: attend(w, b, s, kvh, scale, 1, 1); break;
    case 4: attend(w, b, s, kvh, scale, 2, 0); break;
    case 5: attend(w, b, s, kvh, scale, 2, 1); break;
    case 6: attend(w, b, s, kvh, scale, 3, 0); break;
    case 7: attend(w, b, s, kvh, scale, 3, 1); break;
    case 8: attend(w, b, s, kvh, scale, 4, 0); break;
    default: attend(w, b, s, kvh, scale, 4, 1); break;
    }
}

/* A refused call still gives its present output: the past as it was (nothing written
   when present is bound onto it, a copy otherwise). */
static void keep_past(void *context, const void *past, const int64_t *dims, size_t index, size_t elem) {
    void *value = output_of(context, index, dims, 4);
    void *dst = value ? data_of(value) : 0;
    const void *src = data_of(past);
    size_t n = 1;
    for (int i = 0; i < 4; i++) n *= dims[i] > 0 ? (size_t)dims[i] : 0;
    if (dst && src && dst != src) memmove(dst, src, n * elem);
}

static void compute(void *kernel, void *context) {
    const Kernel *kern = kernel;
    size_t elem = kern->half ? 2 : 4;   /* a KV element's bytes */
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
    void *kc = pk ? data_of(pk) : 0, *vc = pv ? data_of(pv) : 0;
    const void *past_k = ok ? data_of(in[1]) : 0, *past_v = ok ? data_of(in[2]) : 0;
    float *q = ok ? malloc(sizeof(float) * (size_t)(b * s * h * D)) : 0;
    const float *x = ok ? data_of(in[0]) : 0, *cos = ok ? data_of(in[5]) : 0, *sin = ok ? data_of(in[6]) : 0;
    if (!kc || !vc || !past_k || !past_v || !q || !x || !cos || !sin) {
        for (size_t i = 0; i < out_len; i++) out[i] = NAN;
        if (kn == 4) keep_past(context, in[1], kd, 1, elem);
        if (vn == 4) keep_past(context, in[2], vd, 2, elem);
        free(start);
        free(q);
        return;
    }
    size_t kv_bytes = (size_t)(b * hkv * m * D) * elem;
    if (kc != past_k) memmove(kc, past_k, kv_bytes);
    if (vc != past_v) memmove(vc, past_v, kv_bytes);
    Work w = {x, cos, sin, q, out, kc, vc, start, b, s, h, hkv, m, kern->half};
    run_units(context, place_token, (size_t)(b * s), &w);
    Phase2 p = {&w, kern->scale > 0 ? kern->scale : 1.f / sqrtf((float)D)};
    run_units(context, attend_unit, (size_t)(b * s * hkv), &p);
    free(start);
    free(q);
}

static void *create_kernel(int half, const void *info) {
    Kernel *k = calloc(1, sizeof(Kernel));
    if (!k) return 0;
    k->half = half;
    if (failed(((Status *(*)(const void *, const char *, float *))api[INFO_ATTRIBUTE_FLOAT])(info, "scale", &k->scale)))
        k->scale = 0.f;   /* absent: 1/sqrt(D) */
    if (failed(((Status *(*)(const void *, const char *, int64_t *))api[INFO_ATTRIBUTE_INT64])(info, "num_heads", &k->heads)))
        k->heads = 0;     /* absent: the output of a refused call takes the input's width */
    return k;
}
static void *create_float(const OpTable *op, const void *a, const void *info) { (void)op; (void)a; return create_kernel(0, info); }
static void *create_half(const OpTable *op, const void *a, const void *info) { (void)op; (void)a; return create_kernel(1, info); }
static void destroy(void *kernel) { free(kernel); }
static const char *name(const OpTable *op) { (void)op; return "GroupAttention"; }
static int is_kv(size_t i) { return i == 1 || i == 2; }   /* past (inputs) and present (outputs) */
static int input_float(const OpTable *op, size_t i) { (void)op; return i == 3 || i == 4 ? ELEM_INT32 : ELEM_FLOAT; }
static int input_half(const OpTable *op, size_t i) { return is_kv(i) ? ELEM_FLOAT16 : input_float(op, i); }
static size_t input_count(const OpTable *op) { (void)op; return 7; }
static int output_float(const OpTable *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static int output_half(const OpTable *op, size_t i) { (void)op; return is_kv(i) ? ELEM_FLOAT16 : ELEM_FLOAT; }
static size_t output_count(const OpTable *op) { (void)op; return 3; }

static OpTable op_float = {API_VERSION, create_float, name, op_on_cpu, input_float, input_count, output_float,
                           output_count, compute, destroy, op_required, op_required, op_default_memory};
static OpTable op_half = {API_VERSION, create_half, name, op_on_cpu, input_half, input_count, output_half,
                          output_count, compute, destroy, op_required, op_required, op_default_memory};
OpTable *const group_attention_op = &op_float;
OpTable *const group_attention_half_op = &op_half;
#else
OpTable *const group_attention_op = 0;   /* no AVX-512 here: the op is not registered */
OpTable *const group_attention_half_op = 0;
#endif
