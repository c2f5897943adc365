/* rlq deployment kernels: one call runs a whole low-bit policy network (rlq/deploy/FORMAT.md) for a batch.
 *
 * Built by rlq/deploy/cpu.py with `cc -O3 -shared -fPIC -ffp-contract=off -fno-fast-math`; the SIMD paths
 * use per-function target attributes, so one build runs on any x86-64 CPU and the path is picked at run
 * time (rlq_cpu_features). Python turns a validated policy file into a *plan*: op records (int64[REC]) that
 * point into four buffers it owns (arena: activations and scratch; wbuf: repacked weights and lookup
 * tables; fbuf: float32 parameters; ibuf: int32 row sums and index maps). rlq_init checks every offset and
 * size of the plan against the buffer lengths once; rlq_run checks the per-call sizes. No op reads or
 * writes outside its buffers.
 *
 * Bit-exactness with the numpy reference (rlq/deploy/reference.py):
 *  - integer dot products are exact: int32 sums (wrapping arithmetic whose true result is bounded by the
 *    file validation, K * (2^in_bits - 1) * max|w| < 2^31); on AVX2, vpmaddubsw is only used when the plan
 *    proves no int16 saturation (L steps of |pair sum| <= 2 * qmax * max|w|, L * that <= 32767), else both
 *    operands are widened to int16 and multiplied with vpmaddwd (exact);
 *  - the float epilogue is FORMAT.md's order of single float32 operations: float32(acc) * out_scale, + bias,
 *    relu, and the next layer's quantization rint(y / s) + z, clamp (no FMA: -ffp-contract=off and separate
 *    mul/add intrinsics; rint is round-half-even: _mm256_round_ps(NEAREST) or rne() below);
 *  - rlq_exp / rlq_tanh / heads are the same float32 operation sequences as the reference.
 */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define RLQ_ABI 3
#define REC 64

/* ---- op codes and record fields (mirrored in cpu.py) ------------------------------------------------ */
enum { OP_CONVERT = 1, OP_GEMM = 2, OP_DUELING = 3, OP_C51 = 4, OP_TANH = 5, OP_OUTPUT = 6 };
enum { SRC_OBS_U8 = 0, SRC_OBS_F32 = 1, SRC_ARENA_F32 = 2 };
enum { DST_F32 = 0, DST_U8 = 1, DST_S16 = 2 };
enum { K_SCALAR = 0, K_WIDE = 1, K_UBS8 = 2, K_UBS4 = 3, K_VNNI8 = 4, K_VNNI4 = 5, K_WIDE_MM = 6, K_UBS_MM = 7 };
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };

/* OP_CONVERT */
#define C_SRC_KIND 1
#define C_SRC_OFF 2
#define C_SRC_STRIDE 3
#define C_SRC_COUNT 4
#define C_COUNT 5
#define C_MAP 6
#define C_DST_KIND 7
#define C_DST_OFF 8
#define C_DST_STRIDE 9
#define C_DIVIDE 10
#define C_SCALE 11
#define C_ZP 12
#define C_QMAX 13
#define C_LUT 14
#define C_AFFINE 15
/* OP_GEMM */
#define G_KIND 1
#define G_IS_CONV 2
#define G_N 3
#define G_K 4
#define G_KP 5
#define G_NP 6
#define G_IN_OFF 7
#define G_IN_STRIDE 8
#define G_IN_ELEM 9
#define G_W_OFF 10
#define G_W_BYTES 11
#define G_OS_OFF 12
#define G_BIAS_OFF 13
#define G_ROWSUM_OFF 14
#define G_ZP 15
#define G_RELU 16
#define G_L 17
#define G_FOUT_OFF 18
#define G_FOUT_STRIDE 19
#define G_QOUT_OFF 20
#define G_QOUT_STRIDE 21
#define G_QOUT_KIND 22
#define G_Q_SCALE 23
#define G_Q_ZP 24
#define G_Q_QMAX 25
#define G_C 26
#define G_H 27
#define G_W 28
#define G_KH 29
#define G_KW 30
#define G_SH 31
#define G_SW 32
#define G_PH 33
#define G_PW 34
#define G_OH 35
#define G_OW 36
#define G_PADVAL 37
#define G_COL_OFF 38
#define G_COL_BYTES 39
#define G_ACC_OFF 40
#define G_IN_NCHW 41
/* OP_DUELING */
#define D_V_OFF 1
#define D_V_STRIDE 2
#define D_ADV_OFF 3
#define D_ADV_STRIDE 4
#define D_A 5
#define D_OUT_OFF 6
#define D_OUT_STRIDE 7
/* OP_C51 */
#define Q_DUELING 1
#define Q_IN0_OFF 2
#define Q_IN0_STRIDE 3
#define Q_IN1_OFF 4
#define Q_IN1_STRIDE 5
#define Q_ACTIONS 6
#define Q_ATOMS 7
#define Q_SUPPORT_OFF 8
#define Q_OUT_OFF 9
#define Q_OUT_STRIDE 10
#define Q_SCRATCH_OFF 11
/* OP_TANH */
#define T_IN_OFF 1
#define T_IN_STRIDE 2
#define T_A 3
#define T_LOW_OFF 4
#define T_HIGH_OFF 5
#define T_OUT_OFF 6
#define T_OUT_STRIDE 7
/* OP_OUTPUT */
#define O_SRC_OFF 1
#define O_SRC_STRIDE 2
#define O_A 3
/* header (the `meta` array of rlq_init) */
#define H_ABI 0
#define H_ISA 1
#define H_CHUNK 2
#define H_OBS_BYTES 3
#define H_OBS_U8 4
#define H_N_OUT 5
#define H_ARGMAX 6
#define H_LEN 7

/* ---- error codes ------------------------------------------------------------------------------------ */
enum {
    E_OK = 0, E_CTX = -1, E_ABI = -2, E_ISA = -3, E_HEADER = -4, E_OPCODE = -5, E_RANGE = -6,
    E_SHAPE = -7, E_KIND = -8, E_MAP = -9, E_ALIGN = -10, E_BATCH = -11, E_OBS_LEN = -12, E_OUT_LEN = -13,
    E_NO_OUTPUT = -14,
};

const char* rlq_strerror(int code) {
    switch (code) {
    case E_OK: return "ok";
    case E_CTX: return "invalid or uninitialized kernel context";
    case E_ABI: return "plan ABI version does not match the compiled kernel";
    case E_ISA: return "the plan's instruction set is not supported by this CPU";
    case E_HEADER: return "invalid plan header";
    case E_OPCODE: return "unknown op in plan";
    case E_RANGE: return "a plan offset or size lies outside its buffer";
    case E_SHAPE: return "inconsistent sizes in a plan op";
    case E_KIND: return "a plan op uses a kernel kind the plan's instruction set cannot run";
    case E_MAP: return "an index map entry is out of range";
    case E_ALIGN: return "a plan offset is misaligned for its element type";
    case E_BATCH: return "negative batch size";
    case E_OBS_LEN: return "observation buffer size does not match batch * observation size";
    case E_OUT_LEN: return "output buffer too small for the batch";
    case E_NO_OUTPUT: return "plan has no final output op";
    default: return "unknown error";
    }
}

int rlq_abi_version(void) { return RLQ_ABI; }

/* bit 0: AVX2 + FMA; bit 1: AVX-512 F/BW/VNNI (or its emulation in test builds) */
int rlq_cpu_features(void) {
    int f = 0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= 1;
#if defined(RLQ_VNNI_EMULATE)
    if (f & 1) f |= 2;
#else
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        f |= 2;
#endif
    return f;
}

int rlq_vnni_emulated(void) {
#if defined(RLQ_VNNI_EMULATE)
    return 1;
#else
    return 0;
#endif
}

/* ---- context ---------------------------------------------------------------------------------------- */
#define CTX_MAGIC 0x726c7170u
typedef struct {
    uint32_t magic;
    int32_t isa;
    const int64_t* ops;
    int64_t n_ops;
    uint8_t* arena;
    int64_t arena_len;
    const uint8_t* wbuf;
    int64_t wlen;
    const float* fbuf;
    int64_t flen;
    const int32_t* ibuf;
    int64_t ilen;
    int64_t chunk, obs_bytes, n_out;
    int32_t obs_u8, argmax;
    const uint8_t* stage_in;
    float* stage_out;
    int64_t* stage_act;
} rlq_ctx;

int64_t rlq_ctx_size(void) { return (int64_t)sizeof(rlq_ctx); }

static inline float f_of(int64_t bits) {
    uint32_t u = (uint32_t)bits;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- scalar float helpers (the reference's float32 operation sequences) ----------------------------- */
/* round half to even for every float (|x| >= 2^23 and NaN are already integral / returned as is) */
static inline float rne(float x) {
    float a = __builtin_fabsf(x);
    if (!(a < 8388608.0f)) return x;
    float r = (a + 8388608.0f) - 8388608.0f; /* two float32 roundings (no fast-math): ties to even */
    return __builtin_signbit(x) ? -r : r;
}

static inline float quant1(float x, float scale, float zp, float qmax) {
    float q = rne(x / scale) + zp;
    q = q > 0.0f ? q : 0.0f; /* NaN -> 0 */
    q = q < qmax ? q : qmax;
    return q;
}

static float rlq_expf(float x) {
    if (x != x) return x;
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = rne(x * 1.44269504f);
    float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = (p * (r * r) + r) + 1.0f;
    uint32_t sb = (uint32_t)((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &sb, 4);
    return y * s;
}

static float rlq_tanhf(float x) {
    float a = x < 0.0f ? -x : x;
    if (a > 9.0f) return x > 0.0f ? 1.0f : -1.0f;
    float e = rlq_expf(2.0f * x);
    return (e - 1.0f) / (e + 1.0f);
}

/* exported for tests: elementwise rlq_exp / rlq_tanh of n floats */
void rlq_exp_array(const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = rlq_expf(x[i]);
}
void rlq_tanh_array(const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = rlq_tanhf(x[i]);
}

/* ---- GEMM arguments and epilogues -------------------------------------------------------------------- */
typedef struct {
    int64_t M, N, NP, K, KP, lda; /* lda: elements between rows of A */
    const void* A;
    const uint8_t* W;
    const float* os;
    const float* bias;
    const int32_t* rowsum; /* NULL when zp == 0 or not needed */
    int32_t zp, relu, L;
    float* fout;
    int64_t fstride; /* floats between output rows */
    uint8_t* qout;
    int64_t qstride; /* elements between output rows */
    int32_t qkind, qzpi;
    float qscale, qzp, qmax;
    int32_t* acc; /* NP int32: one row of accumulators (row-dot kernels: dot products first, then the epilogue) */
} gemm_t;

/* one output element: acc -> float (+ codes) */
static inline void epi1(const gemm_t* g, int64_t m, int64_t n, int32_t acc) {
    float y = (float)acc * g->os[n];
    y = y + g->bias[n];
    if (g->relu) y = y > 0.0f ? y : 0.0f;
    if (g->fout) g->fout[m * g->fstride + n] = y;
    if (g->qout) {
        float q = quant1(y, g->qscale, g->qzp, g->qmax);
        int32_t qi = (int32_t)q;
        if (g->qkind == DST_U8)
            g->qout[m * g->qstride + n] = (uint8_t)qi;
        else
            ((int16_t*)g->qout)[m * g->qstride + n] = (int16_t)(qi - g->qzpi);
    }
}

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* eight output channels n0..n0+7 of row m (nv of them valid); os/bias are padded to NP */
AVX2_INLINE void epi8(const gemm_t* g, int64_t m, int64_t n0, int64_t nv, __m256i acc) {
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(g->os + n0));
    y = _mm256_add_ps(y, _mm256_loadu_ps(g->bias + n0));
    if (g->relu) y = _mm256_max_ps(y, _mm256_setzero_ps()); /* max(y, +0): -0 and NaN -> +0 */
    if (g->fout) {
        float* d = g->fout + m * g->fstride + n0;
        if (nv == 8) {
            _mm256_storeu_ps(d, y);
        } else {
            float t[8];
            _mm256_storeu_ps(t, y);
            memcpy(d, t, (size_t)nv * 4);
        }
    }
    if (g->qout) {
        __m256 q = _mm256_div_ps(y, _mm256_set1_ps(g->qscale));
        q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_add_ps(q, _mm256_set1_ps(g->qzp));
        q = _mm256_max_ps(q, _mm256_setzero_ps()); /* second operand on NaN: NaN -> 0 */
        q = _mm256_min_ps(q, _mm256_set1_ps(g->qmax));
        __m256i qi = _mm256_cvtps_epi32(q); /* integral values in [0, 255]: exact */
        if (g->qkind == DST_S16) qi = _mm256_sub_epi32(qi, _mm256_set1_epi32(g->qzpi));
        __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
        if (g->qkind == DST_U8) {
            uint8_t* d = g->qout + m * g->qstride + n0;
            __m128i b8 = _mm_packus_epi16(w16, w16);
            if (nv == 8) {
                _mm_storel_epi64((__m128i*)d, b8);
            } else {
                uint8_t t[16];
                _mm_storeu_si128((__m128i*)t, b8);
                memcpy(d, t, (size_t)nv);
            }
        } else {
            int16_t* d = (int16_t*)g->qout + m * g->qstride + n0;
            if (nv == 8) {
                _mm_storeu_si128((__m128i*)d, w16);
            } else {
                int16_t t[8];
                _mm_storeu_si128((__m128i*)t, w16);
                memcpy(d, t, (size_t)nv * 2);
            }
        }
    }
}

/* ---- scalar GEMM: A u8 codes (M x lda), W int8 rows (NP x KP) --------------------------------------- */
static void gemm_scalar(const gemm_t* g) {
    const uint8_t* A = (const uint8_t*)g->A;
    for (int64_t m = 0; m < g->M; m++) {
        const uint8_t* a = A + m * g->lda;
        for (int64_t n = 0; n < g->N; n++) {
            const int8_t* w = (const int8_t*)g->W + n * g->KP;
            uint32_t acc = 0; /* wrapping: the true sum fits int32 (validated) */
            for (int64_t k = 0; k < g->K; k++) acc += (uint32_t)(((int32_t)a[k] - g->zp) * (int32_t)w[k]);
            epi1(g, m, n, (int32_t)acc);
        }
    }
}

/* ---- AVX2 ---------------------------------------------------------------------------------------------- */
/* eight int32x8 accumulators -> one vector of their eight horizontal sums */
AVX2_INLINE __m256i hsum8(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i a4, __m256i a5, __m256i a6,
                          __m256i a7) {
    __m256i t0 = _mm256_hadd_epi32(a0, a1), t1 = _mm256_hadd_epi32(a2, a3);
    __m256i t2 = _mm256_hadd_epi32(a4, a5), t3 = _mm256_hadd_epi32(a6, a7);
    __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* four int32x8 accumulators -> their four horizontal sums */
AVX2_INLINE __m128i hsum4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

AVX2_INLINE __m256i correct8(const gemm_t* g, int64_t n0, __m256i acc) {
    if (g->rowsum)
        acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(g->zp),
                                                       _mm256_loadu_si256((const __m256i*)(g->rowsum + n0))));
    return acc;
}

/* the epilogue of one output row from the accumulator buffer (a streaming loop the CPU pipelines well) */
AVX2_INLINE void epi_row(const gemm_t* g, int64_t m) {
    for (int64_t n0 = 0; n0 < g->N; n0 += 8) {
        int64_t nv = g->N - n0 < 8 ? g->N - n0 : 8;
        epi8(g, m, n0, nv, correct8(g, n0, _mm256_loadu_si256((const __m256i*)(g->acc + n0))));
    }
}

/* A: int16 (q - z) rows; W: int8 rows (NP x KP, KP % 16 == 0), sign-extended on the fly; vpmaddwd is exact */
AVX2 static void gemm_wide(const gemm_t* g) {
    const int16_t* A = (const int16_t*)g->A;
    const int64_t KP = g->KP;
    for (int64_t m = 0; m < g->M; m++) {
        const int16_t* a = A + m * g->lda;
        for (int64_t n0 = 0; n0 < g->N; n0 += 8) {
            const int8_t* w = (const int8_t*)g->W + n0 * KP;
            __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (int64_t k = 0; k < KP; k += 16) {
                __m256i av = _mm256_loadu_si256((const __m256i*)(a + k));
#define WROW(r, c) \
    c = _mm256_add_epi32(c, _mm256_madd_epi16(av, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + (r) * KP + k)))))
                WROW(0, c0); WROW(1, c1); WROW(2, c2); WROW(3, c3);
                WROW(4, c4); WROW(5, c5); WROW(6, c6); WROW(7, c7);
#undef WROW
            }
            _mm256_storeu_si256((__m256i*)(g->acc + n0), hsum8(c0, c1, c2, c3, c4, c5, c6, c7));
        }
        epi_row(g, m); /* no zero-point correction: A is already q - z */
    }
}

/* A: u8 codes; W: int8 rows (KP % 32 == 0); vpmaddubsw pair sums accumulated L times in int16 (the plan
 * proves L * 2 * qmax * max|w| <= 32767), then widened with vpmaddwd(., 1); zero point via row sums */
AVX2_INLINE __m128i dot4_ubs8(const uint8_t* a, const int8_t* w, int64_t KP, int64_t L) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < KP;) {
        int64_t kend = k + 32 * L < KP ? k + 32 * L : KP;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (; k < kend; k += 32) {
            __m256i av = _mm256_loadu_si256((const __m256i*)(a + k));
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(av, _mm256_loadu_si256((const __m256i*)(w + k))));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(av, _mm256_loadu_si256((const __m256i*)(w + KP + k))));
            s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(av, _mm256_loadu_si256((const __m256i*)(w + 2 * KP + k))));
            s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(av, _mm256_loadu_si256((const __m256i*)(w + 3 * KP + k))));
        }
        c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(s0, ones));
        c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(s1, ones));
        c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(s2, ones));
        c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(s3, ones));
    }
    return hsum4(c0, c1, c2, c3);
}

AVX2 static void gemm_ubs8(const gemm_t* g) {
    const uint8_t* A = (const uint8_t*)g->A;
    for (int64_t m = 0; m < g->M; m++) {
        const uint8_t* a = A + m * g->lda;
        for (int64_t n0 = 0; n0 < g->N; n0 += 8) {
            const int8_t* w = (const int8_t*)g->W + n0 * g->KP;
            __m128i lo = dot4_ubs8(a, w, g->KP, g->L);
            __m128i hi = dot4_ubs8(a, w + 4 * g->KP, g->KP, g->L);
            _mm256_storeu_si256((__m256i*)(g->acc + n0), _mm256_set_m128i(hi, lo));
        }
        epi_row(g, m);
    }
}

/* A: u8 codes; W: int4 rows of 32-byte blocks (KP % 64 == 0): byte i of block j holds w[64j + i] + 8 in its
 * low nibble and w[64j + 32 + i] + 8 in its high nibble. Two vpmaddubsw per block (L counts them). */
AVX2_INLINE __m128i dot4_ubs4(const uint8_t* a, const uint8_t* w, int64_t KP, int64_t L) {
    const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    const int64_t RB = KP / 2; /* bytes per row */
    const int64_t step = 64 * (L / 2);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < KP;) {
        int64_t kend = k + step < KP ? k + step : KP;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (; k < kend; k += 64) {
            __m256i alo = _mm256_loadu_si256((const __m256i*)(a + k));
            __m256i ahi = _mm256_loadu_si256((const __m256i*)(a + k + 32));
#define W4(r, s)                                                                                          \
    do {                                                                                                  \
        __m256i b = _mm256_loadu_si256((const __m256i*)(w + (r) * RB + k / 2));                           \
        __m256i wl = _mm256_sub_epi8(_mm256_and_si256(b, mask), eight);                                   \
        __m256i wh = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask), eight);             \
        s = _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(alo, wl), _mm256_maddubs_epi16(ahi, wh))); \
    } while (0)
            W4(0, s0); W4(1, s1); W4(2, s2); W4(3, s3);
#undef W4
        }
        c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(s0, ones));
        c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(s1, ones));
        c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(s2, ones));
        c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(s3, ones));
    }
    return hsum4(c0, c1, c2, c3);
}

AVX2 static void gemm_ubs4(const gemm_t* g) {
    const uint8_t* A = (const uint8_t*)g->A;
    const int64_t RB = g->KP / 2;
    for (int64_t m = 0; m < g->M; m++) {
        const uint8_t* a = A + m * g->lda;
        for (int64_t n0 = 0; n0 < g->N; n0 += 8) {
            const uint8_t* w = g->W + n0 * RB;
            __m128i lo = dot4_ubs4(a, w, g->KP, g->L);
            __m128i hi = dot4_ubs4(a, w + 4 * RB, g->KP, g->L);
            _mm256_storeu_si256((__m256i*)(g->acc + n0), _mm256_set_m128i(hi, lo));
        }
        epi_row(g, m);
    }
}

/* Register-blocked GEMM tiles for convolutions (many rows of A share the weights).
 * K_WIDE_MM: A int16 (q - z) rows (KP % 16 == 0); W int16 in [NP/8][KP/2][8][2] blocks: one vector holds eight
 * channels x two consecutive k; a broadcast pair of A times it is one exact vpmaddwd. Tile: MR rows x 16 ch. */
AVX2_INLINE void tile_wide(const gemm_t* g, int64_t m0, int64_t n0, const int MR, const int NB) {
    const int64_t K2 = g->KP / 2, lda = g->lda;
    const int16_t* A = (const int16_t*)g->A + m0 * lda;
    const int16_t* W0 = (const int16_t*)g->W + (n0 / 8) * K2 * 16;
    const int16_t* W1 = W0 + K2 * 16;
    __m256i c[4][2];
    for (int r = 0; r < 4; r++) c[r][0] = c[r][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K2; k++) {
        __m256i w0 = _mm256_loadu_si256((const __m256i*)(W0 + 16 * k));
        __m256i w1 = NB > 1 ? _mm256_loadu_si256((const __m256i*)(W1 + 16 * k)) : w0;
        for (int r = 0; r < MR; r++) {
            int32_t pair;
            memcpy(&pair, A + r * lda + 2 * k, 4);
            __m256i a = _mm256_set1_epi32(pair);
            c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(a, w0));
            if (NB > 1) c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(a, w1));
        }
    }
    for (int r = 0; r < MR; r++) {
        int64_t nv = g->N - n0 < 8 ? g->N - n0 : 8;
        epi8(g, m0 + r, n0, nv, c[r][0]);
        if (NB > 1) epi8(g, m0 + r, n0 + 8, g->N - n0 - 8 < 8 ? g->N - n0 - 8 : 8, c[r][1]);
    }
}

AVX2 static void gemm_wide_mm(const gemm_t* g) {
    for (int64_t n0 = 0; n0 < g->N; n0 += 16) {
        int two = n0 + 8 < g->N;
        int64_t m0 = 0;
        for (; m0 + 4 <= g->M; m0 += 4) {
            if (two) tile_wide(g, m0, n0, 4, 2); else tile_wide(g, m0, n0, 4, 1);
        }
        for (; m0 < g->M; m0++) {
            if (two) tile_wide(g, m0, n0, 1, 2); else tile_wide(g, m0, n0, 1, 1);
        }
    }
}

/* K_UBS_MM: A u8 codes (KP % 32 == 0); W int8 in [NP/8][KP/4][8][4] blocks (eight channels x four k); vpmaddubsw of
 * a broadcast quadruple of A, int16 sums over L steps (proved not to saturate), widened by vpmaddwd(., 1).
 * Tile: MR rows x 8 channels. */
AVX2_INLINE void tile_ubs(const gemm_t* g, int64_t m0, int64_t n0, const int MR) {
    const int64_t K4 = g->KP / 4, lda = g->lda, L = g->L;
    const uint8_t* A = (const uint8_t*)g->A + m0 * lda;
    const int8_t* W = (const int8_t*)g->W + (n0 / 8) * K4 * 32;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c[6];
    for (int r = 0; r < 6; r++) c[r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K4;) {
        int64_t kend = k + L < K4 ? k + L : K4;
        __m256i s[6];
        for (int r = 0; r < 6; r++) s[r] = _mm256_setzero_si256();
        for (; k < kend; k++) {
            __m256i w = _mm256_loadu_si256((const __m256i*)(W + 32 * k));
            for (int r = 0; r < MR; r++) {
                int32_t quad;
                memcpy(&quad, A + r * lda + 4 * k, 4);
                s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(_mm256_set1_epi32(quad), w));
            }
        }
        for (int r = 0; r < MR; r++) c[r] = _mm256_add_epi32(c[r], _mm256_madd_epi16(s[r], ones));
    }
    int64_t nv = g->N - n0 < 8 ? g->N - n0 : 8;
    for (int r = 0; r < MR; r++) epi8(g, m0 + r, n0, nv, correct8(g, n0, c[r]));
}

AVX2 static void gemm_ubs_mm(const gemm_t* g) {
    for (int64_t n0 = 0; n0 < g->N; n0 += 8) {
        int64_t m0 = 0;
        for (; m0 + 6 <= g->M; m0 += 6) tile_ubs(g, m0, n0, 6);
        for (; m0 < g->M; m0++) tile_ubs(g, m0, n0, 1);
    }
}

/* ---- AVX-512 VNNI (vpdpbusd: u8 x s8, four products into int32, no saturation) ---------------------------
 * Kept deliberately simple: one 512-bit accumulator per output row. Test builds define RLQ_VNNI_EMULATE to
 * run the same code with a portable emulation of the five vector operations it uses. */
#if defined(RLQ_VNNI_EMULATE)
#define VNNI AVX2
#define VNNI_INLINE AVX2_INLINE
typedef struct { uint8_t b[64]; } v512;
typedef struct { int32_t v[16]; } v512i;
static inline v512 v_load(const void* p) { v512 r; memcpy(r.b, p, 64); return r; }
static inline v512i v_zero(void) { v512i r; memset(&r, 0, sizeof r); return r; }
static inline v512 v_nib_lo(v512 x) {
    for (int i = 0; i < 64; i++) x.b[i] = (uint8_t)((x.b[i] & 0x0F) - 8);
    return x;
}
static inline v512 v_nib_hi(v512 x) {
    for (int i = 0; i < 64; i++) x.b[i] = (uint8_t)((x.b[i] >> 4) - 8);
    return x;
}
static inline v512i v_dpbusd(v512i acc, v512 a, v512 b) {
    for (int i = 0; i < 16; i++) {
        uint32_t s = (uint32_t)acc.v[i];
        for (int j = 0; j < 4; j++) s += (uint32_t)((int32_t)a.b[4 * i + j] * (int32_t)(int8_t)b.b[4 * i + j]);
        acc.v[i] = (int32_t)s;
    }
    return acc;
}
static inline int32_t v_reduce(v512i x) {
    uint32_t s = 0;
    for (int i = 0; i < 16; i++) s += (uint32_t)x.v[i];
    return (int32_t)s;
}
#else
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
#define VNNI_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vnni,avx2,fma")))
typedef __m512i v512;
typedef __m512i v512i;
VNNI_INLINE v512 v_load(const void* p) { return _mm512_loadu_si512(p); }
VNNI_INLINE v512i v_zero(void) { return _mm512_setzero_si512(); }
VNNI_INLINE v512 v_nib_lo(v512 x) {
    return _mm512_sub_epi8(_mm512_and_si512(x, _mm512_set1_epi8(0x0F)), _mm512_set1_epi8(8));
}
VNNI_INLINE v512 v_nib_hi(v512 x) {
    return _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(x, 4), _mm512_set1_epi8(0x0F)), _mm512_set1_epi8(8));
}
VNNI_INLINE v512i v_dpbusd(v512i acc, v512 a, v512 b) { return _mm512_dpbusd_epi32(acc, a, b); }
VNNI_INLINE int32_t v_reduce(v512i x) { return _mm512_reduce_add_epi32(x); }
#endif

/* A: u8 codes; W: int8 rows (KP % 64 == 0) */
VNNI static void gemm_vnni8(const gemm_t* g) {
    const uint8_t* A = (const uint8_t*)g->A;
    for (int64_t m = 0; m < g->M; m++) {
        const uint8_t* a = A + m * g->lda;
        for (int64_t n = 0; n < g->N; n++) {
            const int8_t* w = (const int8_t*)g->W + n * g->KP;
            v512i acc = v_zero();
            for (int64_t k = 0; k < g->KP; k += 64) acc = v_dpbusd(acc, v_load(a + k), v_load(w + k));
            g->acc[n] = v_reduce(acc);
        }
        epi_row(g, m);
    }
}

/* A: u8 codes; W: int4 rows of 64-byte blocks (KP % 128 == 0): byte i of block j holds w[128j + i] + 8 in its
 * low nibble and w[128j + 64 + i] + 8 in its high nibble */
VNNI static void gemm_vnni4(const gemm_t* g) {
    const uint8_t* A = (const uint8_t*)g->A;
    const int64_t RB = g->KP / 2;
    for (int64_t m = 0; m < g->M; m++) {
        const uint8_t* a = A + m * g->lda;
        for (int64_t n = 0; n < g->N; n++) {
            const uint8_t* w = g->W + n * RB;
            v512i acc = v_zero();
            for (int64_t k = 0; k < g->KP; k += 128) {
                v512 b = v_load(w + k / 2);
                acc = v_dpbusd(acc, v_load(a + k), v_nib_lo(b));
                acc = v_dpbusd(acc, v_load(a + k + 64), v_nib_hi(b));
            }
            g->acc[n] = v_reduce(acc);
        }
        epi_row(g, m);
    }
}

static void gemm_dispatch(const gemm_t* g, int64_t kind) {
    switch (kind) {
    case K_SCALAR: gemm_scalar(g); break;
    case K_WIDE: gemm_wide(g); break;
    case K_UBS8: gemm_ubs8(g); break;
    case K_UBS4: gemm_ubs4(g); break;
    case K_VNNI8: gemm_vnni8(g); break;
    case K_VNNI4: gemm_vnni4(g); break;
    case K_WIDE_MM: gemm_wide_mm(g); break;
    case K_UBS_MM: gemm_ubs_mm(g); break;
    default: break; /* rejected by rlq_init */
    }
}

/* ---- im2col: codes (elem bytes each) -> rows (OH*OW) x KP --------------------------------------------------
 * NHWC input: K in (i, j, c) order, each kernel row one contiguous run of KW*C elements;
 * NCHW input (the observation): K in (c, i, j) order, runs of KW elements. Padding: the zero point's code. */
static inline void copy_bytes(uint8_t* d, const uint8_t* s, int64_t n) {
    switch (n) { /* the common run lengths as fixed-size (inlined) copies */
    case 8: memcpy(d, s, 8); return;
    case 16: memcpy(d, s, 16); return;
    case 32: memcpy(d, s, 32); return;
    case 64: memcpy(d, s, 64); return;
    default: break;
    }
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) memcpy(d + i, s + i, 32);
    for (; i + 8 <= n; i += 8) memcpy(d + i, s + i, 8);
    for (; i < n; i++) d[i] = s[i];
}

static void fill(uint8_t* d, int64_t n, int64_t elem, int64_t val) {
    if (elem == 1) {
        memset(d, (int)val, (size_t)n);
    } else {
        int16_t v = (int16_t)val;
        for (int64_t i = 0; i < n; i++) memcpy(d + 2 * i, &v, 2);
    }
}

/* one run of KW pixels (pixb bytes each) of input row ih starting at column iw0, with padding outside [0, W) */
static inline void copy_run(uint8_t* d, const uint8_t* row, int64_t iw0, int64_t KW, int64_t W, int64_t pixb,
                            int64_t E, int64_t pad) {
    if (iw0 >= 0 && iw0 + KW <= W) {
        copy_bytes(d, row + iw0 * pixb, KW * pixb);
        return;
    }
    for (int64_t j = 0; j < KW; j++) {
        int64_t iw = iw0 + j;
        if (iw < 0 || iw >= W)
            fill(d + j * pixb, pixb / E, E, pad);
        else
            copy_bytes(d + j * pixb, row + iw * pixb, pixb);
    }
}

static void im2col(const int64_t* op, const uint8_t* in, uint8_t* col) {
    const int64_t C = op[G_C], H = op[G_H], W = op[G_W], KH = op[G_KH], KW = op[G_KW], SH = op[G_SH],
                  SW = op[G_SW], PH = op[G_PH], PW = op[G_PW], OH = op[G_OH], OW = op[G_OW], KP = op[G_KP],
                  E = op[G_IN_ELEM], pad = op[G_PADVAL];
    const int nchw = op[G_IN_NCHW] != 0;
    for (int64_t oh = 0; oh < OH; oh++) {
        for (int64_t ow = 0; ow < OW; ow++) {
            uint8_t* d = col + (oh * OW + ow) * KP * E;
            const int64_t iw0 = ow * SW - PW, ih0 = oh * SH - PH;
            if (ih0 >= 0 && ih0 + KH <= H && iw0 >= 0 && iw0 + KW <= W) { /* interior: plain runs */
                if (nchw) {
                    const int64_t run = KW * E;
                    for (int64_t c = 0; c < C; c++) {
                        const uint8_t* s = in + ((c * H + ih0) * W + iw0) * E;
                        for (int64_t i = 0; i < KH; i++, d += run, s += W * E) copy_bytes(d, s, run);
                    }
                } else {
                    const int64_t run = KW * C * E;
                    const uint8_t* s = in + (ih0 * W + iw0) * C * E;
                    for (int64_t i = 0; i < KH; i++, d += run, s += W * C * E) copy_bytes(d, s, run);
                }
                continue;
            }
            if (nchw) {
                for (int64_t c = 0; c < C; c++) {
                    for (int64_t i = 0; i < KH; i++, d += KW * E) {
                        int64_t ih = oh * SH - PH + i;
                        if (ih < 0 || ih >= H)
                            fill(d, KW, E, pad);
                        else
                            copy_run(d, in + ((c * H + ih) * W) * E, iw0, KW, W, E, E, pad);
                    }
                }
            } else {
                for (int64_t i = 0; i < KH; i++, d += KW * C * E) {
                    int64_t ih = oh * SH - PH + i;
                    if (ih < 0 || ih >= H)
                        fill(d, KW * C, E, pad);
                    else
                        copy_run(d, in + ih * W * C * E, iw0, KW, W, C * E, E, pad);
                }
            }
        }
    }
}

/* ---- ops ---------------------------------------------------------------------------------------------- */
/* float32 -> codes, contiguous, eight at a time (the same float32 operations as quant1) */
AVX2 static void quant_f32_avx2(const float* src, uint8_t* dst, int64_t n, int divide, float div, float scale,
                                float zp, float qmax, int32_t zpi, int s16) {
    const __m256 vdiv = _mm256_set1_ps(div), vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zp),
                 vq = _mm256_set1_ps(qmax), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        if (divide) x = _mm256_div_ps(x, vdiv);
        __m256 q = _mm256_round_ps(_mm256_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), zero), vq);
        __m256i qi = _mm256_cvtps_epi32(q);
        if (s16) qi = _mm256_sub_epi32(qi, _mm256_set1_epi32(zpi));
        __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
        if (s16)
            _mm_storeu_si128((__m128i*)(dst + 2 * i), w16);
        else
            _mm_storel_epi64((__m128i*)(dst + i), _mm_packus_epi16(w16, w16));
    }
    for (; i < n; i++) {
        float x = divide ? src[i] / div : src[i];
        int32_t q = (int32_t)quant1(x, scale, zp, qmax);
        if (s16)
            ((int16_t*)dst)[i] = (int16_t)(q - zpi);
        else
            dst[i] = (uint8_t)q;
    }
}

static void op_convert(const rlq_ctx* c, const int64_t* op, const uint8_t* obs, int64_t nb) {
    const int64_t kind = op[C_SRC_KIND], count = op[C_COUNT], dk = op[C_DST_KIND];
    const int32_t* map = op[C_MAP] >= 0 ? c->ibuf + op[C_MAP] : NULL;
    const float div = f_of(op[C_DIVIDE]), scale = f_of(op[C_SCALE]), zp = (float)op[C_ZP], qmax = (float)op[C_QMAX];
    const int32_t zpi = (int32_t)op[C_ZP];
    for (int64_t s = 0; s < nb; s++) {
        const uint8_t* src = kind == SRC_ARENA_F32 ? c->arena + op[C_SRC_OFF] + s * op[C_SRC_STRIDE]
                                                   : obs + s * op[C_SRC_STRIDE];
        uint8_t* dst = c->arena + op[C_DST_OFF] + s * op[C_DST_STRIDE];
        if (kind == SRC_OBS_U8 && !map && op[C_AFFINE] && dk != DST_F32) { /* the code is the byte (- zp) */
            if (dk == DST_U8)
                memcpy(dst, src, (size_t)count);
            else
                for (int64_t i = 0; i < count; i++) ((int16_t*)dst)[i] = (int16_t)((int32_t)src[i] - zpi);
        } else if (kind != SRC_OBS_U8 && !map && dk != DST_F32 && c->isa != ISA_SCALAR) {
            quant_f32_avx2((const float*)src, dst, count, kind == SRC_OBS_F32, div, scale, zp, qmax, zpi, dk == DST_S16);
        } else if (kind == SRC_OBS_U8) {
            const uint8_t* lut = c->wbuf + op[C_LUT];
            if (dk == DST_F32) {
                const float* lf = (const float*)lut;
                for (int64_t i = 0; i < count; i++) ((float*)dst)[i] = lf[src[map ? map[i] : i]];
            } else if (dk == DST_U8) {
                for (int64_t i = 0; i < count; i++) dst[i] = lut[src[map ? map[i] : i]];
            } else {
                const int16_t* l16 = (const int16_t*)lut;
                for (int64_t i = 0; i < count; i++) ((int16_t*)dst)[i] = l16[src[map ? map[i] : i]];
            }
        } else {
            const float* sf = (const float*)src;
            for (int64_t i = 0; i < count; i++) {
                float x = sf[map ? map[i] : i];
                if (kind == SRC_OBS_F32) x = x / div;
                if (dk == DST_F32) {
                    ((float*)dst)[i] = x;
                } else {
                    int32_t q = (int32_t)quant1(x, scale, zp, qmax);
                    if (dk == DST_U8)
                        dst[i] = (uint8_t)q;
                    else
                        ((int16_t*)dst)[i] = (int16_t)(q - zpi);
                }
            }
        }
    }
}

static void op_gemm(const rlq_ctx* c, const int64_t* op, int64_t nb) {
    gemm_t g;
    g.N = op[G_N];
    g.NP = op[G_NP];
    g.K = op[G_K];
    g.KP = op[G_KP];
    g.W = c->wbuf + op[G_W_OFF];
    g.os = c->fbuf + op[G_OS_OFF];
    g.bias = c->fbuf + op[G_BIAS_OFF];
    g.rowsum = op[G_ROWSUM_OFF] >= 0 && op[G_ZP] != 0 ? c->ibuf + op[G_ROWSUM_OFF] : NULL;
    g.zp = (int32_t)op[G_ZP];
    g.relu = (int32_t)op[G_RELU];
    g.L = (int32_t)op[G_L];
    g.qkind = (int32_t)op[G_QOUT_KIND];
    g.qscale = f_of(op[G_Q_SCALE]);
    g.qzpi = (int32_t)op[G_Q_ZP];
    g.qzp = (float)op[G_Q_ZP];
    g.qmax = (float)op[G_Q_QMAX];
    g.acc = op[G_ACC_OFF] >= 0 ? (int32_t*)(c->arena + op[G_ACC_OFF]) : NULL;
    const int64_t qe = g.qkind == DST_S16 ? 2 : 1;
    if (!op[G_IS_CONV]) {
        g.M = nb;
        g.A = c->arena + op[G_IN_OFF];
        g.lda = op[G_IN_STRIDE] / op[G_IN_ELEM];
        g.fout = op[G_FOUT_OFF] >= 0 ? (float*)(c->arena + op[G_FOUT_OFF]) : NULL;
        g.fstride = op[G_FOUT_STRIDE] / 4;
        g.qout = op[G_QOUT_OFF] >= 0 ? c->arena + op[G_QOUT_OFF] : NULL;
        g.qstride = op[G_QOUT_STRIDE] / qe;
        gemm_dispatch(&g, op[G_KIND]);
        return;
    }
    uint8_t* col = c->arena + op[G_COL_OFF];
    g.M = op[G_OH] * op[G_OW];
    g.A = col;
    g.lda = op[G_KP];
    g.fstride = g.N;
    g.qstride = g.N;
    for (int64_t s = 0; s < nb; s++) {
        im2col(op, c->arena + op[G_IN_OFF] + s * op[G_IN_STRIDE], col);
        g.fout = op[G_FOUT_OFF] >= 0 ? (float*)(c->arena + op[G_FOUT_OFF] + s * op[G_FOUT_STRIDE]) : NULL;
        g.qout = op[G_QOUT_OFF] >= 0 ? c->arena + op[G_QOUT_OFF] + s * op[G_QOUT_STRIDE] : NULL;
        gemm_dispatch(&g, op[G_KIND]);
    }
}

static void op_dueling(const rlq_ctx* c, const int64_t* op, int64_t nb) {
    const int64_t A = op[D_A];
    for (int64_t s = 0; s < nb; s++) {
        const float* v = (const float*)(c->arena + op[D_V_OFF] + s * op[D_V_STRIDE]);
        const float* adv = (const float*)(c->arena + op[D_ADV_OFF] + s * op[D_ADV_STRIDE]);
        float* out = (float*)(c->arena + op[D_OUT_OFF] + s * op[D_OUT_STRIDE]);
        float sum = adv[0];
        for (int64_t a = 1; a < A; a++) sum = sum + adv[a];
        float mean = sum / (float)A;
        float v0 = v[0];
        for (int64_t a = 0; a < A; a++) out[a] = (v0 + adv[a]) - mean;
    }
}

static void op_c51(const rlq_ctx* c, const int64_t* op, int64_t nb) {
    const int64_t A = op[Q_ACTIONS], Z = op[Q_ATOMS];
    const float* support = c->fbuf + op[Q_SUPPORT_OFF];
    float* l = (float*)(c->arena + op[Q_SCRATCH_OFF]);
    float* mean = l + Z;
    for (int64_t s = 0; s < nb; s++) {
        const float* in0 = (const float*)(c->arena + op[Q_IN0_OFF] + s * op[Q_IN0_STRIDE]);
        const float* adv = (const float*)(c->arena + op[Q_IN1_OFF] + s * op[Q_IN1_STRIDE]);
        float* out = (float*)(c->arena + op[Q_OUT_OFF] + s * op[Q_OUT_STRIDE]);
        if (op[Q_DUELING]) {
            for (int64_t i = 0; i < Z; i++) {
                float t = adv[i];
                for (int64_t a = 1; a < A; a++) t = t + adv[a * Z + i];
                mean[i] = t / (float)A;
            }
        }
        for (int64_t a = 0; a < A; a++) {
            for (int64_t i = 0; i < Z; i++)
                l[i] = op[Q_DUELING] ? (in0[i] + adv[a * Z + i]) - mean[i] : in0[a * Z + i];
            float m = l[0]; /* numpy's max: NaN if any element is NaN */
            for (int64_t i = 1; i < Z && m == m; i++)
                if (l[i] > m || l[i] != l[i]) m = l[i];
            for (int64_t i = 0; i < Z; i++) l[i] = rlq_expf(l[i] - m);
            float S = l[0];
            for (int64_t i = 1; i < Z; i++) S = S + l[i];
            float q = (l[0] / S) * support[0];
            for (int64_t i = 1; i < Z; i++) q = q + (l[i] / S) * support[i];
            out[a] = q;
        }
    }
}

static void op_tanh(const rlq_ctx* c, const int64_t* op, int64_t nb) {
    const int64_t A = op[T_A];
    const float* low = c->fbuf + op[T_LOW_OFF];
    const float* high = c->fbuf + op[T_HIGH_OFF];
    for (int64_t s = 0; s < nb; s++) {
        const float* in = (const float*)(c->arena + op[T_IN_OFF] + s * op[T_IN_STRIDE]);
        float* out = (float*)(c->arena + op[T_OUT_OFF] + s * op[T_OUT_STRIDE]);
        for (int64_t a = 0; a < A; a++) {
            float t = rlq_tanhf(in[a]);
            out[a] = low[a] + ((t + 1.0f) * 0.5f) * (high[a] - low[a]);
        }
    }
}

static void op_output(const rlq_ctx* c, const int64_t* op, int64_t nb, float* out, int64_t* act) {
    const int64_t A = op[O_A];
    for (int64_t s = 0; s < nb; s++) {
        const float* q = (const float*)(c->arena + op[O_SRC_OFF] + s * op[O_SRC_STRIDE]);
        if (out) memcpy(out + s * A, q, (size_t)A * 4);
        if (act) {
            /* numpy's argmax: the first NaN if there is one, else the first index of the maximum */
            float m = q[0];
            int nan = 0;
            for (int64_t a = 0; a < A; a++) {
                nan |= q[a] != q[a];
                m = q[a] > m ? q[a] : m;
            }
            int64_t best = 0;
            if (nan) {
                while (q[best] == q[best]) best++;
            } else {
                while (q[best] != m) best++;
            }
            act[s] = best;
        }
    }
}

/* ---- plan validation ---------------------------------------------------------------------------------- */
#define LIM ((int64_t)1 << 40)
static int ok_num(int64_t v, int64_t lo) { return v >= lo && v < LIM; }

/* a per-sample region [off + s*stride, + need) for s < chunk lies in [0, len) */
static int region_ok(int64_t off, int64_t stride, int64_t need, int64_t chunk, int64_t len) {
    if (!ok_num(off, 0) || !ok_num(stride, 0) || !ok_num(need, 0)) return 0;
    if (chunk > 1 && stride < need) return 0;
    int64_t end = off + (chunk - 1) * stride + need;
    return end <= len;
}

static int check_op(const rlq_ctx* c, const int64_t* op, int64_t* out_seen) {
    const int64_t ch = c->chunk;
    switch (op[0]) {
    case OP_CONVERT: {
        int64_t kind = op[C_SRC_KIND], dk = op[C_DST_KIND], count = op[C_COUNT], sc = op[C_SRC_COUNT];
        if (kind < 0 || kind > 2 || dk < 0 || dk > 2 || !ok_num(count, 0) || !ok_num(sc, 1)) return E_SHAPE;
        int64_t se = kind == SRC_OBS_U8 ? 1 : 4;
        if (kind != SRC_ARENA_F32) {
            if ((kind == SRC_OBS_U8) != (c->obs_u8 != 0) || op[C_SRC_STRIDE] != c->obs_bytes || sc * se != c->obs_bytes)
                return E_SHAPE;
        } else {
            if (op[C_SRC_OFF] % 4 || op[C_SRC_STRIDE] % 4) return E_ALIGN;
            if (!region_ok(op[C_SRC_OFF], op[C_SRC_STRIDE], sc * 4, ch, c->arena_len)) return E_RANGE;
        }
        int64_t de = dk == DST_F32 ? 4 : dk == DST_S16 ? 2 : 1;
        if (op[C_DST_OFF] % de || op[C_DST_STRIDE] % de) return E_ALIGN;
        if (!region_ok(op[C_DST_OFF], op[C_DST_STRIDE], count * de, ch, c->arena_len)) return E_RANGE;
        if (op[C_MAP] >= 0) {
            if (!region_ok(op[C_MAP], 0, count, 1, c->ilen)) return E_RANGE;
            for (int64_t i = 0; i < count; i++)
                if (c->ibuf[op[C_MAP] + i] < 0 || c->ibuf[op[C_MAP] + i] >= sc) return E_MAP;
        } else if (count > sc) {
            return E_SHAPE;
        }
        if (dk != DST_F32 && (op[C_QMAX] < 1 || op[C_QMAX] > 255 || op[C_ZP] < 0 || op[C_ZP] > op[C_QMAX]))
            return E_SHAPE;
        if (kind == SRC_OBS_U8) {
            int64_t le = dk == DST_F32 ? 4 : de;
            if (op[C_LUT] % le) return E_ALIGN;
            if (!region_ok(op[C_LUT], 0, 256 * le, 1, c->wlen)) return E_RANGE;
            if (op[C_AFFINE] && dk != DST_F32) { /* the plan claims code(o) = o - zp: verify it */
                for (int o = 0; o < 256; o++) {
                    int32_t v = dk == DST_U8 ? c->wbuf[op[C_LUT] + o] : ((const int16_t*)(c->wbuf + op[C_LUT]))[o];
                    if (v != (dk == DST_U8 ? o : o - (int32_t)op[C_ZP])) return E_SHAPE;
                }
            }
        }
        return E_OK;
    }
    case OP_GEMM: {
        int64_t kind = op[G_KIND], N = op[G_N], K = op[G_K], KP = op[G_KP], NP = op[G_NP], E = op[G_IN_ELEM];
        if (!ok_num(N, 1) || !ok_num(K, 1) || !ok_num(KP, 1) || NP != (N + 7) / 8 * 8 || KP < K) return E_SHAPE;
        int64_t blk = 1, wbytes = NP * KP, need_e = 1;
        switch (kind) {
        case K_SCALAR: blk = 1; break;
        case K_WIDE: blk = 16; need_e = 2; break;
        case K_UBS8: blk = 32; break;
        case K_UBS4: blk = 64; wbytes = NP * KP / 2; break;
        case K_VNNI8: blk = 64; break;
        case K_VNNI4: blk = 128; wbytes = NP * KP / 2; break;
        case K_WIDE_MM: blk = 2; need_e = 2; wbytes = NP * KP * 2; break;
        case K_UBS_MM: blk = 4; break;
        default: return E_KIND;
        }
        if (kind == K_WIDE || kind == K_UBS8 || kind == K_UBS4 || kind == K_WIDE_MM || kind == K_UBS_MM) {
            if (c->isa != ISA_AVX2) return E_KIND;
        } else if (kind == K_VNNI8 || kind == K_VNNI4) {
            if (c->isa != ISA_AVX512VNNI) return E_KIND;
        }
        if (kind == K_SCALAR ? KP != K : KP % blk) return E_SHAPE;
        if (E != need_e) return E_SHAPE;
        if ((kind == K_UBS8 || kind == K_UBS4 || kind == K_UBS_MM) && (op[G_L] < 2 || op[G_L] > 65536)) return E_SHAPE;
        if (op[G_W_BYTES] != wbytes || !region_ok(op[G_W_OFF], 0, wbytes, 1, c->wlen)) return E_RANGE;
        if (!region_ok(op[G_OS_OFF], 0, NP, 1, c->flen) || !region_ok(op[G_BIAS_OFF], 0, NP, 1, c->flen)) return E_RANGE;
        if (op[G_ZP] < 0 || op[G_ZP] > 255) return E_SHAPE;
        if (kind != K_SCALAR && kind != K_WIDE && kind != K_WIDE_MM && op[G_ZP] != 0) {
            if (op[G_ROWSUM_OFF] < 0) return E_SHAPE;
            if (!region_ok(op[G_ROWSUM_OFF], 0, NP, 1, c->ilen)) return E_RANGE;
        }
        if (op[G_FOUT_OFF] < 0 && op[G_QOUT_OFF] < 0) return E_SHAPE;
        if (kind != K_SCALAR && kind != K_WIDE_MM && kind != K_UBS_MM) { /* row-dot kernels: accumulator row */
            if (op[G_ACC_OFF] % 32) return E_ALIGN;
            if (!region_ok(op[G_ACC_OFF], 0, NP * 4, 1, c->arena_len)) return E_RANGE;
        }
        int64_t qk = op[G_QOUT_KIND], qe = qk == DST_S16 ? 2 : 1;
        if (op[G_QOUT_OFF] >= 0) {
            if (qk != DST_U8 && qk != DST_S16) return E_SHAPE;
            if (op[G_Q_QMAX] < 1 || op[G_Q_QMAX] > 255 || op[G_Q_ZP] < 0 || op[G_Q_ZP] > op[G_Q_QMAX]) return E_SHAPE;
            if (op[G_QOUT_OFF] % qe || op[G_QOUT_STRIDE] % qe) return E_ALIGN;
        }
        if (op[G_FOUT_OFF] >= 0 && (op[G_FOUT_OFF] % 4 || op[G_FOUT_STRIDE] % 4)) return E_ALIGN;
        if (op[G_IN_OFF] % E || op[G_IN_STRIDE] % E) return E_ALIGN;
        int64_t rows = 1; /* output rows per sample */
        if (!op[G_IS_CONV]) {
            if (!region_ok(op[G_IN_OFF], op[G_IN_STRIDE], KP * E, ch, c->arena_len)) return E_RANGE;
            if (op[G_IN_STRIDE] < KP * E) return E_SHAPE; /* rows of A are KP long */
        } else {
            int64_t C = op[G_C], H = op[G_H], W = op[G_W], KH = op[G_KH], KW = op[G_KW], SH = op[G_SH],
                    SW = op[G_SW], PH = op[G_PH], PW = op[G_PW], OH = op[G_OH], OW = op[G_OW];
            if (!ok_num(C, 1) || !ok_num(H, 1) || !ok_num(W, 1) || !ok_num(KH, 1) || !ok_num(KW, 1) ||
                !ok_num(SH, 1) || !ok_num(SW, 1) || !ok_num(PH, 0) || !ok_num(PW, 0) || !ok_num(OH, 1) ||
                !ok_num(OW, 1))
                return E_SHAPE;
            if (C * KH * KW != K || OH != (H + 2 * PH - KH) / SH + 1 || OW != (W + 2 * PW - KW) / SW + 1 ||
                H + 2 * PH < KH || W + 2 * PW < KW)
                return E_SHAPE;
            if ((E == 1 && (op[G_PADVAL] < 0 || op[G_PADVAL] > 255)) || (E == 2 && op[G_PADVAL] != 0)) return E_SHAPE;
            if (!region_ok(op[G_IN_OFF], op[G_IN_STRIDE], H * W * C * E, ch, c->arena_len)) return E_RANGE;
            if (op[G_COL_BYTES] < OH * OW * KP * E || !region_ok(op[G_COL_OFF], 0, op[G_COL_BYTES], 1, c->arena_len))
                return E_RANGE;
            rows = OH * OW;
        }
        if (op[G_FOUT_OFF] >= 0 && !region_ok(op[G_FOUT_OFF], op[G_FOUT_STRIDE], rows * N * 4, ch, c->arena_len))
            return E_RANGE;
        if (op[G_QOUT_OFF] >= 0 && !region_ok(op[G_QOUT_OFF], op[G_QOUT_STRIDE], rows * N * qe, ch, c->arena_len))
            return E_RANGE;
        return E_OK;
    }
    case OP_DUELING: {
        int64_t A = op[D_A];
        if (!ok_num(A, 1)) return E_SHAPE;
        if (op[D_V_OFF] % 4 || op[D_V_STRIDE] % 4 || op[D_ADV_OFF] % 4 || op[D_ADV_STRIDE] % 4 || op[D_OUT_OFF] % 4 ||
            op[D_OUT_STRIDE] % 4)
            return E_ALIGN;
        if (!region_ok(op[D_V_OFF], op[D_V_STRIDE], 4, ch, c->arena_len) ||
            !region_ok(op[D_ADV_OFF], op[D_ADV_STRIDE], A * 4, ch, c->arena_len) ||
            !region_ok(op[D_OUT_OFF], op[D_OUT_STRIDE], A * 4, ch, c->arena_len))
            return E_RANGE;
        return E_OK;
    }
    case OP_C51: {
        int64_t A = op[Q_ACTIONS], Z = op[Q_ATOMS];
        if (!ok_num(A, 1) || !ok_num(Z, 1) || A > (1 << 24) || Z > (1 << 24)) return E_SHAPE;
        int64_t d = op[Q_DUELING] != 0;
        if (op[Q_IN0_OFF] % 4 || op[Q_IN0_STRIDE] % 4 || op[Q_OUT_OFF] % 4 || op[Q_OUT_STRIDE] % 4 ||
            op[Q_SCRATCH_OFF] % 4 || (d && (op[Q_IN1_OFF] % 4 || op[Q_IN1_STRIDE] % 4)))
            return E_ALIGN;
        if (!region_ok(op[Q_IN0_OFF], op[Q_IN0_STRIDE], (d ? Z : A * Z) * 4, ch, c->arena_len) ||
            (d && !region_ok(op[Q_IN1_OFF], op[Q_IN1_STRIDE], A * Z * 4, ch, c->arena_len)) ||
            !region_ok(op[Q_OUT_OFF], op[Q_OUT_STRIDE], A * 4, ch, c->arena_len) ||
            !region_ok(op[Q_SCRATCH_OFF], 0, 2 * Z * 4, 1, c->arena_len) ||
            !region_ok(op[Q_SUPPORT_OFF], 0, Z, 1, c->flen))
            return E_RANGE;
        return E_OK;
    }
    case OP_TANH: {
        int64_t A = op[T_A];
        if (!ok_num(A, 1)) return E_SHAPE;
        if (op[T_IN_OFF] % 4 || op[T_IN_STRIDE] % 4 || op[T_OUT_OFF] % 4 || op[T_OUT_STRIDE] % 4) return E_ALIGN;
        if (!region_ok(op[T_IN_OFF], op[T_IN_STRIDE], A * 4, ch, c->arena_len) ||
            !region_ok(op[T_OUT_OFF], op[T_OUT_STRIDE], A * 4, ch, c->arena_len) ||
            !region_ok(op[T_LOW_OFF], 0, A, 1, c->flen) || !region_ok(op[T_HIGH_OFF], 0, A, 1, c->flen))
            return E_RANGE;
        return E_OK;
    }
    case OP_OUTPUT: {
        if (op[O_A] != c->n_out) return E_SHAPE;
        if (op[O_SRC_OFF] % 4 || op[O_SRC_STRIDE] % 4) return E_ALIGN;
        if (!region_ok(op[O_SRC_OFF], op[O_SRC_STRIDE], op[O_A] * 4, ch, c->arena_len)) return E_RANGE;
        *out_seen += 1;
        return E_OK;
    }
    default: return E_OPCODE;
    }
}

/* Fill `ctx` (ctx_len bytes of caller memory, rlq_ctx_size()) after checking the whole plan. The buffers must
 * stay alive and unchanged while the context is used. stage_*: a one-observation input (obs size bytes) and
 * outputs (n_out floats, 1 int64) for rlq_run_staged. Returns 0 or a negative error code (rlq_strerror). */
int rlq_init(void* ctx, int64_t ctx_len, const int64_t* meta, int64_t meta_len, const int64_t* ops, int64_t ops_len,
             uint8_t* arena, int64_t arena_len, const uint8_t* wbuf, int64_t wlen, const float* fbuf, int64_t flen,
             const int32_t* ibuf, int64_t ilen, const uint8_t* stage_in, int64_t stage_in_len, float* stage_out,
             int64_t stage_out_len, int64_t* stage_act, int64_t stage_act_len) {
    if (!ctx || ctx_len < (int64_t)sizeof(rlq_ctx)) return E_CTX;
    rlq_ctx* c = (rlq_ctx*)ctx;
    memset(c, 0, sizeof *c);
    if (!meta || meta_len < H_LEN) return E_HEADER;
    if (meta[H_ABI] != RLQ_ABI) return E_ABI;
    int feats = rlq_cpu_features();
    int64_t isa = meta[H_ISA];
    if (isa < ISA_SCALAR || isa > ISA_AVX512VNNI) return E_HEADER;
    if ((isa == ISA_AVX2 && !(feats & 1)) || (isa == ISA_AVX512VNNI && !(feats & 2))) return E_ISA;
    if (!ops || ops_len <= 0 || ops_len % REC || !arena || !wbuf || !fbuf || !ibuf) return E_HEADER;
    if (!ok_num(arena_len, 0) || !ok_num(wlen, 0) || !ok_num(flen, 0) || !ok_num(ilen, 0)) return E_RANGE;
    c->isa = (int32_t)isa;
    c->ops = ops;
    c->n_ops = ops_len / REC;
    c->arena = arena;
    c->arena_len = arena_len;
    c->wbuf = wbuf;
    c->wlen = wlen;
    c->fbuf = fbuf;
    c->flen = flen;
    c->ibuf = ibuf;
    c->ilen = ilen;
    c->chunk = meta[H_CHUNK];
    c->obs_bytes = meta[H_OBS_BYTES];
    c->obs_u8 = meta[H_OBS_U8] != 0;
    c->n_out = meta[H_N_OUT];
    c->argmax = meta[H_ARGMAX] != 0;
    if (!ok_num(c->chunk, 1) || c->chunk > 4096 || !ok_num(c->obs_bytes, 1) || !ok_num(c->n_out, 1)) return E_HEADER;
    if (!c->obs_u8 && c->obs_bytes % 4) return E_HEADER;
    int64_t outs = 0;
    for (int64_t i = 0; i < c->n_ops; i++) {
        int r = check_op(c, ops + i * REC, &outs);
        if (r != E_OK) return r;
    }
    if (outs != 1 || ops[(c->n_ops - 1) * REC] != OP_OUTPUT) return E_NO_OUTPUT;
    if (!stage_in || stage_in_len != c->obs_bytes || !stage_out || stage_out_len < c->n_out || !stage_act ||
        stage_act_len < 1)
        return E_OUT_LEN;
    c->stage_in = stage_in;
    c->stage_out = stage_out;
    c->stage_act = stage_act;
    c->magic = CTX_MAGIC;
    return E_OK;
}

#if defined(RLQ_PROFILE)
/* development builds: cycles spent per op index (rlq_profile reads them) */
static uint64_t prof_cycles[256];
int64_t rlq_profile(uint64_t* out, int64_t n) {
    int64_t k = n < 256 ? n : 256;
    memcpy(out, prof_cycles, (size_t)k * 8);
    memset(prof_cycles, 0, sizeof prof_cycles);
    return k;
}
#define PROF_START uint64_t t0_ = __rdtsc();
#define PROF_END(i) if ((i) < 256) prof_cycles[i] += __rdtsc() - t0_;
#else
#define PROF_START
#define PROF_END(i)
#endif

static void run_chunk(const rlq_ctx* c, const uint8_t* obs, int64_t nb, float* out, int64_t* act) {
    for (int64_t i = 0; i < c->n_ops; i++) {
        PROF_START
        const int64_t* op = c->ops + i * REC;
        switch (op[0]) {
        case OP_CONVERT: op_convert(c, op, obs, nb); break;
        case OP_GEMM: op_gemm(c, op, nb); break;
        case OP_DUELING: op_dueling(c, op, nb); break;
        case OP_C51: op_c51(c, op, nb); break;
        case OP_TANH: op_tanh(c, op, nb); break;
        case OP_OUTPUT: op_output(c, op, nb, out, act); break;
        default: break;
        }
        PROF_END(i)
    }
}

/* Run the network on `batch` observations (obs_len bytes = batch * observation bytes). `out` (out_len floats,
 * batch * n_out needed) receives q_values / action_mean, `act` (act_len, batch needed; argmax plans only, may
 * be NULL) the greedy actions. Either output may be NULL. Returns 0 or a negative error code. */
int rlq_run(const void* ctx, const void* obs, int64_t obs_len, int64_t batch, float* out, int64_t out_len,
            int64_t* act, int64_t act_len) {
    const rlq_ctx* c = (const rlq_ctx*)ctx;
    if (!c || c->magic != CTX_MAGIC) return E_CTX;
    if (batch < 0 || batch >= LIM) return E_BATCH;
    if (batch == 0) return E_OK;
    if (!obs || obs_len / batch != c->obs_bytes || obs_len % batch) return E_OBS_LEN;
    if (out && out_len / batch < c->n_out) return E_OUT_LEN;
    if (act && (!c->argmax || act_len < batch)) return E_OUT_LEN;
    const uint8_t* o = (const uint8_t*)obs;
    for (int64_t b0 = 0; b0 < batch; b0 += c->chunk) {
        int64_t nb = batch - b0 < c->chunk ? batch - b0 : c->chunk;
        run_chunk(c, o + b0 * c->obs_bytes, nb, out ? out + b0 * c->n_out : NULL, act ? act + b0 : NULL);
    }
    return E_OK;
}

/* One observation from the staging input to the staging outputs (the low-overhead single-observation call). */
int rlq_run_staged(const void* ctx) {
    const rlq_ctx* c = (const rlq_ctx*)ctx;
    if (!c || c->magic != CTX_MAGIC) return E_CTX;
    run_chunk(c, c->stage_in, 1, c->stage_out, c->argmax ? c->stage_act : NULL);
    return E_OK;
}

/* Benchmarking: `n` back-to-back single-observation runs (no Python in the loop). */
int rlq_run_staged_repeat(const void* ctx, int64_t n) {
    const rlq_ctx* c = (const rlq_ctx*)ctx;
    if (!c || c->magic != CTX_MAGIC) return E_CTX;
    for (int64_t i = 0; i < n; i++) run_chunk(c, c->stage_in, 1, c->stage_out, c->argmax ? c->stage_act : NULL);
    return E_OK;
}
