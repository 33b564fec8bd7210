/* NibbleMatMul (domain llm.kernels): W8A8's MatMulIntegerToFloat, the same integers and
   the same float result, reading a third fewer bytes of weights.

   Inputs as MatMulIntegerToFloat's in the export: a uint8 [..., K], b int8 [K, N],
   a_scale float [1], b_scale float [N], a_zero_point uint8 [1];
       y[m, n] = float(sum_k (a[m, k] - a_zero_point) * b[k, n]) * (a_scale * b_scale[n])
   exactly as onnxruntime computes it (integer sums are exact; one float conversion and
   one product after them), so the logits are bit for bit the same.

   Why it reads less: the export's int8 weights come from a 4-bit checkpoint (Q4_1: 32
   weights a block share one scale and minimum), so each column's block of 32 holds at
   most 16 distinct int8 values. On its first call the kernel repacks b, per column and
   block, into a 4-bit code per weight and a table of 16 values,
       value(c) = base + lo * c + p[c],
   where p rises from 0 by 0 or 1 a code (15 bits: 20 bytes for 32 weights instead of
   32), which the rounding of a Q4_1 block to int8 gives (its steps are lo or lo + 1);
   or, for weights that do not have that form, p[c] in 0..15 (4 bits each: 26 bytes).
   A one-row product reads every weight once and waits on memory (docs/engine.md), so
   fewer bytes is that much less time.
   The sum splits along the table: lo * sum(a * c) + sum(a * (base + p[c])), each part a
   VNNI dot product of bytes (the second through a 16-entry byte shuffle).

   Weights that do not have this form (more than 16 values in a block, or no base and lo
   fit) are read as int8 directly, the same result, slower. */
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include "ort_api.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

enum { BLOCK = 32, GROUP = 4, UNIT = 16 };
/* The two forms, by the bytes of a group (4 columns x 32 rows): codes 64, then p as 15
   bits a column (8) or 16 nibbles a column (32), then 4 bases and 4 lo. */
enum { DIRECT = 0, STEPS = 80, NIBBLES = 104 };
enum { INPUT_A, INPUT_B, INPUT_A_SCALE, INPUT_B_SCALE, INPUT_A_ZERO_POINT, INPUTS };

typedef struct {
    pthread_mutex_t lock;
    const int8_t *source;   /* the b the packed form was made from */
    int64_t k, n;
    int form;               /* STEPS or NIBBLES: packed (the bytes of a group); DIRECT: b as it is */
    uint8_t *data;          /* [n / UNIT][k / BLOCK][GROUP] groups of `form` bytes */
    int32_t *colsum;        /* sum_k b[k, n] */
} Kernel;

/* One column's block of 32 values: codes[32], p[16], base, lo; 0 when they do not fit
   the form (`steps`: p rises by 0 or 1 a code; otherwise p within 4 bits). Codes rise
   with the values. For a given lo the smallest codes that fit leave the most room to
   the values after them: a gap of dt between two values takes g codes where
   lo * g <= dt <= lo * g + (steps ? g : 15). lo = range / 15 fits a Q4_1 block; the
   others are tried after it. */
static int pack_block(const int8_t *b, int steps, uint8_t *codes, uint8_t *p, int8_t *base, uint8_t *lo) {
    uint64_t seen[4] = {0};
    for (int i = 0; i < BLOCK; i++) {
        const int v = b[i] + 128;
        seen[v >> 6] |= 1ull << (v & 63);
    }
    int values[BLOCK], r = 0;
    for (int word = 0; word < 4; word++)
        for (uint64_t bits = seen[word]; bits; bits &= bits - 1) {
            if (r == 16) return 0;
            values[r++] = word * 64 + __builtin_ctzll(bits);
        }
    const int range = values[r - 1] - values[0], first = range / 15;
    for (int attempt = 0; attempt <= range; attempt++) {
        const int step = attempt <= first ? first - attempt : attempt;   /* range/15, down to 0, then up */
        int code[16] = {0}, ok = 1;
        for (int j = 1; j < r && ok; j++) {
            const int t = values[j] - values[0], dt = values[j] - values[j - 1];
            int c = code[j - 1] + 1;
            if (steps) {
                const int g = (dt + step) / (step + 1);   /* ceil(dt / (step + 1)) */
                c = code[j - 1] + (g > 1 ? g : 1);
                ok = step * (c - code[j - 1]) <= dt;
            } else if (step && t - 15 > step * c) {
                c = (t - 15 + step - 1) / step;
            }
            ok = ok && c <= 15 && t - step * c >= 0 && t - step * c <= 15;
            code[j] = c;
        }
        if (!ok) continue;
        uint8_t of[256];
        memset(p, 0, 16);
        for (int j = 0; j < r; j++) {
            of[values[j]] = (uint8_t)code[j];
            p[code[j]] = (uint8_t)(values[j] - values[0] - step * code[j]);
        }
        if (steps) {   /* between two codes p rises first, then stays; after the last it stays */
            for (int j = 0; j + 1 < r; j++)
                for (int c = code[j] + 1; c < code[j + 1]; c++) p[c] = p[c - 1] + (p[c - 1] < p[code[j + 1]]);
            for (int c = code[r - 1] + 1; c < 16; c++) p[c] = p[c - 1];
        }
        for (int i = 0; i < BLOCK; i++) codes[i] = of[b[i] + 128];
        *base = (int8_t)(values[0] - 128);
        *lo = (uint8_t)step;
        return 1;
    }
    return 0;
}

typedef struct { Kernel *kn; const int8_t *b; int failed; } Packing;

/* Columns [16 unit, 16 unit + 16): their blocks into the packed form kn->form (a unit's
   blocks are contiguous, in the order the product reads them). */
static void pack_unit(void *data, size_t unit) {
    Packing *job = data;
    Kernel *kn = job->kn;
    const int64_t n = kn->n, blocks = kn->k / BLOCK, bytes = kn->form;
    for (int64_t kb = 0; kb < blocks && !__atomic_load_n(&job->failed, __ATOMIC_RELAXED); kb++) {
        int8_t tile[UNIT][BLOCK];   /* the block of 16 columns, a column a row */
        for (int i = 0; i < BLOCK; i++)
            for (int c = 0; c < UNIT; c++) tile[c][i] = job->b[(kb * BLOCK + i) * n + (int64_t)unit * UNIT + c];
        for (int c = 0; c < UNIT; c++) {
            uint8_t codes[BLOCK], p[16], lo;
            int8_t base;
            if (!pack_block(tile[c], kn->form == STEPS, codes, p, &base, &lo)) {
                __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
                return;
            }
            const int g = c / GROUP, j = c % GROUP;
            uint8_t *group = kn->data + (((int64_t)unit * blocks + kb) * GROUP + g) * bytes;
            for (int i = 0; i < 16; i++) group[j * 16 + i] = (uint8_t)(codes[i] | codes[i + 16] << 4);
            if (kn->form == STEPS) {   /* bit c set where p rises to code c: p[c] = popcount(bits & (2 << c) - 1) */
                uint16_t bits = 0;
                for (int i = 1; i < 16; i++) bits |= (uint16_t)((p[i] - p[i - 1]) << i);
                memcpy(group + 64 + 2 * j, &bits, 2);
            } else {
                for (int i = 0; i < 8; i++) group[64 + j * 8 + i] = (uint8_t)(p[i] | p[i + 8] << 4);
            }
            group[bytes - 8 + j] = (uint8_t)base;
            group[bytes - 4 + j] = lo;
            for (int i = 0; i < BLOCK; i++) kn->colsum[(int64_t)unit * UNIT + c] += tile[c][i];
        }
    }
}

/* Repacks b [k, n] into kn->data on onnxruntime's threads: the form of steps where every
   block has it (and this CPU counts bits a byte), else of nibbles; DIRECT (nothing kept)
   where some block has neither. */
static int pack(Kernel *kn, const int8_t *b, void *context) {
    const int64_t k = kn->k, n = kn->n;
    if (k % BLOCK || n % UNIT || k < BLOCK) return DIRECT;
#ifdef __AVX512BITALG__
    const int forms[] = {STEPS, NIBBLES};
#else
    const int forms[] = {NIBBLES};
#endif
    for (size_t f = 0; f < sizeof forms / sizeof *forms; f++) {
        kn->form = forms[f];
        kn->data = malloc((size_t)(n / GROUP * (k / BLOCK) * kn->form));
        kn->colsum = calloc((size_t)n, sizeof(int32_t));
        Packing job = {kn, b, !kn->data || !kn->colsum};
        if (!job.failed) run_units(context, pack_unit, (size_t)(n / UNIT), &job);
        if (!job.failed) return kn->form;
        free(kn->data);
        free(kn->colsum);
        kn->data = 0;
        kn->colsum = 0;
    }
    return DIRECT;
}

typedef struct {
    const Kernel *kn;
    const uint8_t *a;
    const int8_t *b;
    const float *b_scale;
    float a_scale, *y;
    int64_t rows;
    int zero_point;
} Work;

static inline float scaled(int32_t sum, float a_scale, float b_scale) { return (float)sum * (a_scale * b_scale); }

/* p of 4 columns, each column's 16 values in its 128-bit lane, from 15 bits a column:
   p[c] = popcount(bits & (2 << c) - 1), counted a byte at a time (code c < 8 in the low
   byte; c >= 8 in the high byte, plus all of the low one). */
#ifdef __AVX512BITALG__
static inline __m512i p_of_steps(const uint8_t *bits) {
    int64_t all;
    memcpy(&all, bits, 8);
    const __m512i b = _mm512_set1_epi64(all);
    const __m512i byte_of_code = _mm512_set_epi8(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6,
                                                 5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4,
                                                 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                                 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i low_byte_above_8 = _mm512_set_epi8(
        6, 6, 6, 6, 6, 6, 6, 6, -128, -128, -128, -128, -128, -128, -128, -128,
        4, 4, 4, 4, 4, 4, 4, 4, -128, -128, -128, -128, -128, -128, -128, -128,
        2, 2, 2, 2, 2, 2, 2, 2, -128, -128, -128, -128, -128, -128, -128, -128,
        0, 0, 0, 0, 0, 0, 0, 0, -128, -128, -128, -128, -128, -128, -128, -128);
    const __m512i below = _mm512_set4_epi32((int)0xff7f3f1f, 0x0f070301, (int)0xff7f3f1f, 0x0f070301);
    const __m512i within = _mm512_popcnt_epi8(_mm512_and_si512(_mm512_shuffle_epi8(b, byte_of_code), below));
    return _mm512_add_epi8(within, _mm512_popcnt_epi8(_mm512_shuffle_epi8(b, low_byte_above_8)));
}
#endif

/* p of 4 columns from 16 nibbles a column (p[c] and p[c + 8] share a byte). */
static inline __m512i p_of_nibbles(const uint8_t *nibbles) {
    const __m512i pairs = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i high_half = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i p = _mm512_permutexvar_epi64(pairs, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)nibbles)));
    return _mm512_and_si512(_mm512_srlv_epi64(p, high_half), _mm512_set1_epi8(0x0f));
}

/* Columns [16 unit, 16 unit + 16) of every row, from the packed form (`bytes`: of a group,
   STEPS or NIBBLES, a constant where inlined). */
static inline __attribute__((always_inline)) void packed_rows(const Work *w, size_t unit, const int bytes) {
    const Kernel *kn = w->kn;
    const int64_t k = kn->k, n = kn->n, blocks = k / BLOCK;
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const __m512i lane_byte = _mm512_set_epi8(3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
                                              2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                                              1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                              0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128i spread = _mm_set_epi8(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int64_t row = 0; row < w->rows; row++) {
        const uint8_t *a = w->a + row * k;
        const uint8_t *group = kn->data + (int64_t)unit * blocks * GROUP * bytes;
        __m512i scaled_codes[GROUP], tables[GROUP];
        for (int g = 0; g < GROUP; g++) scaled_codes[g] = tables[g] = _mm512_setzero_si512();
        for (int64_t kb = 0; kb < blocks; kb++) {
            const __m512i a_low = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(a + kb * BLOCK)));
            const __m512i a_high = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(a + kb * BLOCK + 16)));
            for (int g = 0; g < GROUP; g++, group += bytes) {
                const __m512i codes = _mm512_loadu_si512(group);
                const __m512i c_low = _mm512_and_si512(codes, nibble);
                const __m512i c_high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
                /* lo * sum(a * c), lo per column */
                __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), a_low, c_low);
                t = _mm512_dpbusd_epi32(t, a_high, c_high);
                int32_t lo4, base4;
                memcpy(&lo4, group + bytes - 4, 4);
                memcpy(&base4, group + bytes - 8, 4);
                const __m512i lo = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(lo4), spread));
                scaled_codes[g] = _mm512_add_epi32(scaled_codes[g], _mm512_mullo_epi32(t, lo));
                /* sum(a * (base + p[c])): each column's 16-entry table in its 128-bit lane */
#ifdef __AVX512BITALG__
                const __m512i p = bytes == STEPS ? p_of_steps(group + 64) : p_of_nibbles(group + 64);
#else
                const __m512i p = p_of_nibbles(group + 64);
#endif
                const __m512i table = _mm512_add_epi8(p, _mm512_shuffle_epi8(_mm512_set1_epi32(base4), lane_byte));
                tables[g] = _mm512_dpbusd_epi32(tables[g], a_low, _mm512_shuffle_epi8(table, c_low));
                tables[g] = _mm512_dpbusd_epi32(tables[g], a_high, _mm512_shuffle_epi8(table, c_high));
            }
        }
        int32_t lanes[GROUP][16];
        for (int g = 0; g < GROUP; g++) _mm512_storeu_si512(lanes[g], _mm512_add_epi32(scaled_codes[g], tables[g]));
        for (int c = 0; c < UNIT; c++) {
            const int g = c / GROUP, j = c % GROUP;
            const int64_t col = (int64_t)unit * UNIT + c;
            int32_t sum = lanes[g][4 * j] + lanes[g][4 * j + 1] + lanes[g][4 * j + 2] + lanes[g][4 * j + 3];
            sum -= w->zero_point * kn->colsum[col];
            w->y[row * n + col] = scaled(sum, w->a_scale, w->b_scale[col]);
        }
    }
}

static void steps_unit(void *data, size_t unit) { packed_rows(data, unit, STEPS); }
static void nibbles_unit(void *data, size_t unit) { packed_rows(data, unit, NIBBLES); }

/* Columns [16 unit, 16 unit + 16) of every row, from b as it is. */
static void direct_unit(void *data, size_t unit) {
    const Work *w = data;
    const int64_t k = w->kn->k, n = w->kn->n, first = (int64_t)unit * UNIT;
    const int64_t last = first + UNIT < n ? first + UNIT : n;
    for (int64_t row = 0; row < w->rows; row++) {
        int32_t sum[UNIT] = {0};
        for (int64_t i = 0; i < k; i++) {
            const int x = w->a[row * k + i] - w->zero_point;
            for (int64_t col = first; col < last; col++) sum[col - first] += x * w->b[i * n + col];
        }
        for (int64_t col = first; col < last; col++)
            w->y[row * n + col] = scaled(sum[col - first], w->a_scale, w->b_scale[col]);
    }
}

/* At API version 13 a kernel cannot return an error: on inputs it cannot take it fills
   y with NaN, which the engine refuses to sample from (decoder.py). */
static void compute(void *kernel, void *context) {
    Kernel *kn = kernel;
    const void *in[INPUTS];
    int64_t a_dims[MAX_RANK], b_dims[MAX_RANK], dims[MAX_RANK];
    size_t a_rank = 0, b_rank = 0, n_scale = 0;
    for (int i = 0; i < INPUTS; i++) in[i] = input_of(context, i);
    for (int i = 0; i < INPUTS; i++)
        if (!in[i]) return;
    if (shape_of(in[INPUT_A], a_dims, &a_rank) || a_rank < 1 || shape_of(in[INPUT_B], b_dims, &b_rank)) return;
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < a_rank; i++) rows *= a_dims[i];
    const int64_t k = a_dims[a_rank - 1], n = b_rank == 2 ? b_dims[1] : 0;
    memcpy(dims, a_dims, sizeof(int64_t) * a_rank);
    dims[a_rank - 1] = n;
    void *out = output_of(context, 0, dims, a_rank);
    float *y = out ? data_of(out) : 0;
    if (!y) return;
    const uint8_t *a = data_of(in[INPUT_A]), *zp = data_of(in[INPUT_A_ZERO_POINT]);
    const int8_t *b = data_of(in[INPUT_B]);
    const float *a_scale = data_of(in[INPUT_A_SCALE]), *b_scale = data_of(in[INPUT_B_SCALE]);
    int64_t scale_dims[MAX_RANK];
    int ok = a && b && zp && a_scale && b_scale && b_rank == 2 && b_dims[0] == k && n > 0 &&
             !shape_of(in[INPUT_B_SCALE], scale_dims, &n_scale) && n_scale == 1 && scale_dims[0] == n;
    if (!ok) {
        for (int64_t i = 0; i < rows * n; i++) y[i] = __builtin_nanf("");
        return;
    }
    pthread_mutex_lock(&kn->lock);
    if (kn->source != b || kn->k != k || kn->n != n) {   /* first call (or another b): repack */
        free(kn->data);
        free(kn->colsum);
        kn->data = 0;
        kn->colsum = 0;
        kn->source = b;
        kn->k = k;
        kn->n = n;
        kn->form = pack(kn, b, context);
    }
    pthread_mutex_unlock(&kn->lock);
    Work w = {kn, a, b, b_scale, *a_scale, y, rows, *zp};
    run_units(context, kn->form == STEPS ? steps_unit : kn->form == NIBBLES ? nibbles_unit : direct_unit,
              (size_t)((n + UNIT - 1) / UNIT), &w);
}

/* The form the kernel reads b [k, n] in: the bytes of a group of its packed form (STEPS,
   NIBBLES), or DIRECT (0), as `pack` would choose. The engine rewrites only products
   with a packed form: the direct one is slower than onnxruntime's. */
static int all_blocks_fit(const int8_t *b, int64_t k, int64_t n, int steps) {
    for (int64_t kb = 0; kb < k / BLOCK; kb++)
        for (int64_t col = 0; col < n; col++) {
            int8_t column[BLOCK];
            uint8_t codes[BLOCK], p[16], lo;
            int8_t base;
            for (int i = 0; i < BLOCK; i++) column[i] = b[(kb * BLOCK + i) * n + col];
            if (!pack_block(column, steps, codes, p, &base, &lo)) return 0;
        }
    return 1;
}

__attribute__((visibility("default"))) int llm_nibble_form(const int8_t *b, int64_t k, int64_t n) {
    if (k % BLOCK || n % UNIT || k < BLOCK) return DIRECT;
#ifdef __AVX512BITALG__
    if (all_blocks_fit(b, k, n, 1)) return STEPS;
#endif
    return all_blocks_fit(b, k, n, 0) ? NIBBLES : DIRECT;
}

static void *create_kernel(const OpTable *op, const void *a, const void *info) {
    (void)op; (void)a; (void)info;
    Kernel *kn = calloc(1, sizeof(Kernel));
    if (kn) pthread_mutex_init(&kn->lock, 0);
    return kn;
}
static void destroy(void *kernel) {
    Kernel *kn = kernel;
    if (!kn) return;
    pthread_mutex_destroy(&kn->lock);
    free(kn->data);
    free(kn->colsum);
    free(kn);
}
static const char *name(const OpTable *op) { (void)op; return "NibbleMatMul"; }
static int input_type(const OpTable *op, size_t i) {
    (void)op;
    return i == INPUT_A || i == INPUT_A_ZERO_POINT ? ELEM_UINT8 : i == INPUT_B ? ELEM_INT8 : ELEM_FLOAT;
}
static size_t input_count(const OpTable *op) { (void)op; return INPUTS; }
static int output_type(const OpTable *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t output_count(const OpTable *op) { (void)op; return 1; }

static OpTable op = {API_VERSION, create_kernel, name, op_on_cpu, input_type, input_count, output_type,
                     output_count, compute, destroy, op_required, op_required, op_default_memory};
OpTable *const nibble_matmul_op = &op;
#else
OpTable *const nibble_matmul_op = 0;   /* no AVX-512 VNNI here: the op is not registered */
__attribute__((visibility("default"))) int llm_nibble_form(const int8_t *b, int64_t k, int64_t n) {
    (void)b; (void)k; (void)n;
    return 0;
}
#endif
