/* The fused training step of an MLP Q-ensemble in bf16 (rlq/nets/native_ensemble.py loads it).
 *
 * One call does, for every member of an N-member ReLU MLP ensemble (stacked fp32 weights, layer l:
 * W (n, out, in), b (n, out)), the whole of a Q-regression update except the optimizer step: the forward on
 * the batch, the Huber loss against given targets at the taken actions, the backward into the fp32 gradient
 * buffers, and the per-member gradient-norm clip. A second entry point is the forward alone, for a subset of
 * members (the target's and Double DQN's forwards).
 *
 * Numerics (the contract of agent.amp=bf16): every product reads bf16 operands (weights, activations and
 * gradients rounded to nearest-even from fp32, subnormals flushed to zero) and accumulates in fp32; biases,
 * Q-values, losses, bias gradients and norms are fp32 (norms accumulate in double). Weight gradients are the
 * fp32 sums of bf16 products (not rounded to bf16). Members are processed one after the other, so a member's
 * weights and activations stay in the core's L2 cache for its whole forward and backward.
 *
 * Products: C (M x N, fp32) = A (M x K) . B (K x N), both in bf16 and read in pairs along K. A is given as
 * 32-bit words (one k pair each) at word m * sm + p * sp, so rows (sm = K/2, sp = 1) and interleaved row
 * pairs (sm = 1, sp = row length) both serve without a copy; B is packed "VNNI" style, [K/2][NP][2] with NP =
 * N rounded up to 16 and zero padding. isa 1 runs the products with AVX512-BF16 (vdpbf16ps) and converts with
 * vcvtneps2bf16; isa 0 is portable C computing exactly what those instructions compute: per output, over the
 * k pairs in order, acc += a[2p+1] * b[2p+1], then acc += a[2p] * b[2p], each sum rounded to fp32 and results
 * below FLT_MIN flushed to zero. The two isas give the same bits, and everything else is the same C for both;
 * tests/test_native_ensemble.py checks it.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif

#define ABI 2
#define MR 8 /* rows of a product tile */

typedef uint16_t bf16;

int rlq_ens_abi(void) { return ABI; }
int rlq_ens_has_bf16(void) { return HAVE_BF16; }

static inline int64_t pairs(int64_t k) { return (k + 1) / 2; }
static inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

/* fp32 -> bf16 as vcvtneps2bf16: round to nearest even, NaN -> quiet NaN, subnormal inputs -> signed zero. */
static inline bf16 to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    if ((u & 0x7f800000u) == 0) return (bf16)((u >> 16) & 0x8000);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
static inline float from_bf16(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float ftz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }

/* ---- conversions --------------------------------------------------------------------------------- */

/* dst[k] = bf16(src[k]) for k < n, zero for n <= k < n_pad. */
static void cvt_row(int isa, const float *src, int64_t n, bf16 *dst, int64_t n_pad) {
    int64_t k = 0;
#if HAVE_BF16
    if (isa == 1) {
        for (; k + 16 <= n; k += 16)
            _mm256_storeu_si256((__m256i *)(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
    }
#endif
    (void)isa;
    for (; k < n; k++) dst[k] = to_bf16(src[k]);
    for (; k < n_pad; k++) dst[k] = 0;
}

/* The conversion every operand goes through, for tests: dst[k] = bf16(src[k]). */
void rlq_ens_to_bf16(int isa, const float *src, int64_t n, bf16 *dst) { cvt_row(isa, src, n, dst, n); }

/* bf16 rows of src (M x N, row stride ld) in pairs: dst[p][n][j] = src[(2p + j) * ld + n], [pairs(M)][pad16(N)][2],
 * zero outside M rows and N columns. Every operand is converted to bf16 once (cvt_row); its interleaved layouts are
 * built from those rows. */
static void interleave_rows(const bf16 *src, int64_t M, int64_t N, int64_t ld, bf16 *dst) {
    int64_t NP = pad16(N);
    for (int64_t p = 0; p < pairs(M); p++) {
        const bf16 *r0 = src + 2 * p * ld, *r1 = r0 + ld;
        bf16 *d = dst + p * NP * 2;
        int64_t n0 = 0;
#if HAVE_BF16 /* (data movement only: the same bits as the loops below) */
        const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                             22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        for (; n0 + 16 <= N; n0 += 16) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(r0 + n0));
            __m256i b = 2 * p + 1 < M ? _mm256_loadu_si256((const __m256i *)(r1 + n0)) : _mm256_setzero_si256();
            __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            _mm512_storeu_si512((void *)(d + 2 * n0), _mm512_permutexvar_epi16(idx, ab));
        }
#endif
        if (2 * p + 1 < M) {
            for (int64_t n = n0; n < N; n++) {
                d[2 * n] = r0[n];
                d[2 * n + 1] = r1[n];
            }
        } else {
            for (int64_t n = n0; n < N; n++) {
                d[2 * n] = r0[n];
                d[2 * n + 1] = 0;
            }
        }
        for (int64_t n = 2 * N; n < 2 * NP; n++) d[n] = 0;
    }
}

/* dst[p * MP + m] = src[m * ld + p] for 32-bit words, m < M (zero up to MP = pad16(M)), p < P; in 16 x 16
 * blocks, so both sides stay in L1. */
static void transpose_words(const uint32_t *src, int64_t M, int64_t P, int64_t ld, uint32_t *dst) {
    int64_t MP = pad16(M);
    for (int64_t m0 = 0; m0 < MP; m0 += 16)
        for (int64_t p0 = 0; p0 < P; p0 += 16) {
            int64_t pe = p0 + 16 < P ? p0 + 16 : P;
            for (int64_t m = m0; m < m0 + 16; m++)
                for (int64_t p = p0; p < pe; p++) dst[p * MP + m] = m < M ? src[m * ld + p] : 0;
        }
}

/* ---- products ------------------------------------------------------------------------------------ */

static void gemm_scalar(int64_t M, int64_t N, int64_t K2, const uint32_t *A, int64_t sm, int64_t sp,
                        const bf16 *Bv, int64_t NP, float *C, int64_t ldc) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int64_t p = 0; p < K2; p++) {
                uint32_t a = A[m * sm + p * sp];
                const bf16 *b = Bv + (p * NP + n) * 2;
                acc = ftz(acc + from_bf16((bf16)(a >> 16)) * from_bf16(b[1]));
                acc = ftz(acc + from_bf16((bf16)(a & 0xffff)) * from_bf16(b[0]));
            }
            C[m * ldc + n] = acc;
        }
    }
}

#if HAVE_BF16
/* One tile: ROWS rows x NB*16 columns from column n0; columns >= N are not stored. */
static inline __attribute__((always_inline)) void tile(const int ROWS, const int NB, int64_t n0, int64_t N,
                                                       int64_t K2, const uint32_t *A, int64_t sm, int64_t sp,
                                                       const bf16 *Bv, int64_t NP, float *C, int64_t ldc) {
    __m512 acc[MR][2];
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < NB; j++) acc[r][j] = _mm512_setzero_ps();
    const bf16 *b = Bv + n0 * 2;
    for (int64_t p = 0; p < K2; p++, b += NP * 2) {
        __m512bh bv[2];
        for (int j = 0; j < NB; j++) bv[j] = (__m512bh)_mm512_loadu_si512((const void *)(b + j * 32));
        const uint32_t *a = A + p * sp;
        for (int r = 0; r < ROWS; r++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * sm]);
            for (int j = 0; j < NB; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
        }
    }
    for (int j = 0; j < NB; j++) {
        int64_t left = N - (n0 + 16 * j);
        __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        for (int r = 0; r < ROWS; r++) _mm512_mask_storeu_ps(C + r * ldc + n0 + 16 * j, mask, acc[r][j]);
    }
}

#define TILE(R, NB) tile(R, NB, n0, N, K2, a, sm, sp, Bv, NP, c, ldc)
#define ROWS_CASES(NB)                                                                                         \
    switch (rows) {                                                                                            \
    case 8: TILE(8, NB); break;                                                                                \
    case 7: TILE(7, NB); break;                                                                                \
    case 6: TILE(6, NB); break;                                                                                \
    case 5: TILE(5, NB); break;                                                                                \
    case 4: TILE(4, NB); break;                                                                                \
    case 3: TILE(3, NB); break;                                                                                \
    case 2: TILE(2, NB); break;                                                                                \
    default: TILE(1, NB); break;                                                                               \
    }

static void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t *A, int64_t sm, int64_t sp, const bf16 *Bv,
                      int64_t NP, float *C, int64_t ldc) {
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int rows = (int)(M - m0 < MR ? M - m0 : MR);
            const uint32_t *a = A + m0 * sm;
            float *c = C + m0 * ldc;
            if (N - n0 > 16) {
                ROWS_CASES(2)
            } else {
                ROWS_CASES(1)
            }
        }
    }
}
#endif

static void gemm(int isa, int64_t M, int64_t N, int64_t K2, const bf16 *A, int64_t sm, int64_t sp, const bf16 *Bv,
                 int64_t NP, float *C, int64_t ldc) {
    const uint32_t *a = (const uint32_t *)A;
#if HAVE_BF16
    if (isa == 1) {
        gemm_bf16(M, N, K2, a, sm, sp, Bv, NP, C, ldc);
        return;
    }
#endif
    (void)isa;
    gemm_scalar(M, N, K2, a, sm, sp, Bv, NP, C, ldc);
}

/* sum of squares in double, in 8 lanes (a vectorizable reduction; the lanes are added at the end) */
static double sumsq(const float *x, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t e = 0;
    for (; e + 8 <= n; e += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)x[e + j] * (double)x[e + j];
    for (int j = 0; e < n; e++, j++) acc[j] += (double)x[e] * (double)x[e];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* ---- layouts ------------------------------------------------------------------------------------- *
 * Per layer l (din -> dout), for the member being processed (P(x) = pairs(x), bf16 unless said):
 *   wr [dout][2 P(din)]          the weight's rows: A of the forward product
 *   wb [P(dout)][pad16(din)][2]  weight rows 2p and 2p+1 interleaved: B of dL/dx (step, l > 0)
 *   xv [P(din)][pad16(B)][2]     the layer input x (B x din) in feature pairs: B of the forward product
 *   xb [P(B)][pad16(din)][2]     x in batch pairs: B of the weight gradient (step)
 * The forward computes the layer's output transposed, h^T = W . x^T (dout x B): relu(h^T + b) in bf16 rows
 * gives the next layer's xv by interleaving rows 2p, 2p+1 and its xb by a transpose of 32-bit words. The
 * backward holds g = dL/d(layer output) (B x dout, fp32) and, in bf16, g's rows (A of dL/dx = g . W) and g's
 * interleaved row pairs (A of dW = g^T . x, read with sm = 1); dL/dx goes through the ReLU mask of x (x > 0). */

typedef struct {
    int64_t din, dout;
    bf16 *wr, *wb, *xv, *xb;
} layer_t;

typedef struct {
    int isa;
    layer_t *layers;
    float *h;   /* fp32 h^T of a layer [max width][B], or dL/dx [B][max width] */
    float *g;   /* fp32 dL/d(output) [B][max width] */
    bf16 *rows; /* bf16 rows: relu(h^T) [max width + 1][2 P(B)] or g's rows [B][2 P(max width)] */
    bf16 *gi;   /* g's interleaved row pairs [P(B)][pad16(max width)][2] */
} work_t;

static uint8_t *carve(uint8_t **cur, int64_t bytes) {
    uint8_t *p = *cur;
    *cur += (bytes + 63) / 64 * 64;
    return p;
}

/* Lays the workspace out from base (or, with base == NULL, measures it: returns the bytes needed). */
static int64_t layout(int L, const int64_t *dims, int64_t B, int step, uint8_t *base, work_t *w, layer_t *layers) {
    uint8_t *cur = base ? base : (uint8_t *)64; /* (a fake aligned base when measuring) */
    uint8_t *start = cur;
    int64_t wmax = 0, BP = 2 * pairs(B);
    for (int l = 0; l <= L; l++) wmax = dims[l] > wmax ? dims[l] : wmax;
    wmax = pad16(wmax);
    for (int l = 0; l < L; l++) {
        layer_t t = {dims[l], dims[l + 1], 0, 0, 0, 0};
        t.wr = (bf16 *)carve(&cur, t.dout * 2 * pairs(t.din) * 2);
        if (step && l > 0) t.wb = (bf16 *)carve(&cur, pairs(t.dout) * pad16(t.din) * 2 * 2);
        t.xv = (bf16 *)carve(&cur, pairs(t.din) * pad16(B) * 2 * 2);
        if (step) t.xb = (bf16 *)carve(&cur, pairs(B) * pad16(t.din) * 2 * 2);
        if (layers) layers[l] = t;
    }
    float *h = (float *)carve(&cur, pad16(B) * wmax * 4);
    float *g = (float *)carve(&cur, pad16(B) * wmax * 4);
    int64_t rows_elems = (wmax + 1) * BP > B * (wmax + 2) ? (wmax + 1) * BP : B * (wmax + 2);
    bf16 *rows = (bf16 *)carve(&cur, rows_elems * 2);
    bf16 *gi = (bf16 *)carve(&cur, pairs(B) * wmax * 2 * 2);
    if (w) *w = (work_t){0, layers, h, g, rows, gi};
    return (int64_t)(cur - start);
}

int64_t rlq_ens_work_bytes(int L, const int64_t *dims, int64_t B, int step) {
    return layout(L, dims, B, step, NULL, NULL, NULL);
}

/* The next layer's operands from relu(h^T + bias) (d x B): xv by interleaving rows, xb by a transpose. */
static void next_input(const float *hT, const float *bias, int64_t B, int64_t d, work_t *w, layer_t *next,
                       int step) {
    int64_t BP = 2 * pairs(B);
    bf16 *r = w->rows; /* [d][BP] */
    float *v = w->g;   /* (the fp32 relu output row by row; g is free during the forward) */
    for (int64_t o = 0; o < d; o++) {
        const float *src = hT + o * B;
        float bo = bias[o];
        for (int64_t b = 0; b < B; b++) {
            float x = src[b] + bo;
            v[o * B + b] = x > 0.0f ? x : 0.0f;
        }
    }
    for (int64_t o = 0; o < d; o++) cvt_row(w->isa, v + o * B, B, r + o * BP, BP);
    interleave_rows(r, d, B, BP, next->xv);
    if (step) transpose_words((const uint32_t *)r, d, BP / 2, BP / 2, (uint32_t *)next->xb);
}

static void first_input(const float *x, int64_t B, work_t *w, layer_t *first, int step) {
    int64_t d = first->din, ld = 2 * pairs(d);
    for (int64_t b = 0; b < B; b++) cvt_row(w->isa, x + b * d, d, w->rows + b * ld, ld); /* bf16 rows, B x d */
    transpose_words((const uint32_t *)w->rows, B, ld / 2, ld / 2, (uint32_t *)first->xv);
    if (step) interleave_rows(w->rows, B, d, ld, first->xb);
}

/* Member i's forward into out (B x dims[L], fp32). */
static void member_forward(int L, int64_t B, float *const *W, float *const *bias, int64_t i, work_t *w, int step,
                           float *out) {
    for (int l = 0; l < L; l++) {
        layer_t *t = &w->layers[l];
        const float *wi = W[l] + i * t->dout * t->din, *bi = bias[l] + i * t->dout;
        int64_t ld = 2 * pairs(t->din);
        for (int64_t o = 0; o < t->dout; o++) cvt_row(w->isa, wi + o * t->din, t->din, t->wr + o * ld, ld);
        if (step && l > 0) interleave_rows(t->wr, t->dout, t->din, ld, t->wb);
        gemm(w->isa, t->dout, B, pairs(t->din), t->wr, ld / 2, 1, t->xv, pad16(B), w->h, B);
        if (l < L - 1) {
            next_input(w->h, bi, B, t->dout, w, &w->layers[l + 1], step);
        } else {
            for (int64_t b = 0; b < B; b++)
                for (int64_t o = 0; o < t->dout; o++) out[b * t->dout + o] = w->h[o * B + b] + bi[o];
        }
    }
}

/* Forward of k of the n members (members: their indices, or NULL for 0..k-1): x (B x dims[0]) -> out (k, B,
 * dims[L]). Returns 0, or -1 for a bad shape or member index. */
int rlq_ens_forward(int isa, int n, int k, const int64_t *members, int L, const int64_t *dims, float *const *W,
                    float *const *bias, int64_t B, const float *x, float *out, uint8_t *work) {
    layer_t layers[64];
    work_t w;
    if (L < 1 || L > 64 || B < 1) return -1;
    for (int j = 0; members && j < k; j++)
        if (members[j] < 0 || members[j] >= n) return -1;
    layout(L, dims, B, 0, work, &w, layers);
    w.isa = isa;
    first_input(x, B, &w, &layers[0], 0);
    for (int j = 0; j < k; j++)
        member_forward(L, B, W, bias, members ? members[j] : j, &w, 0, out + (int64_t)j * B * dims[L]);
    return 0;
}

/* The training step (file comment). Per member i: q_out[i, b] = Q_i(obs_b, action_b);
 * loss_out[i] = mean_b wts_b * Huber(q - y_b); the gradient of sum_i loss_i is written (not added) into gW /
 * gB; norm_out[i] = member i's gradient norm before clipping; when max_norm > 0 and finite, member i's
 * gradient is scaled by min(1, max_norm / (norm + 1e-6)). Returns 0, or -1 for a bad shape or action. */
int rlq_ens_step(int isa, int n, int L, const int64_t *dims, float *const *W, float *const *bias, float *const *gW,
                 float *const *gB, int64_t B, const float *obs, const int64_t *action, const float *y,
                 const float *wts, float max_norm, float *q_out, float *loss_out, float *norm_out, uint8_t *work) {
    layer_t layers[64];
    work_t w;
    if (L < 1 || L > 64 || B < 1) return -1;
    int64_t A = dims[L];
    for (int64_t b = 0; b < B; b++)
        if (action[b] < 0 || action[b] >= A) return -1;
    layout(L, dims, B, 1, work, &w, layers);
    w.isa = isa;
    first_input(obs, B, &w, &layers[0], 1);
    for (int64_t i = 0; i < n; i++) {
        float *g = w.g; /* Q (B x A), then dL/dQ in place, row by row */
        member_forward(L, B, W, bias, i, &w, 1, g);
        double loss = 0.0;
        for (int64_t b = 0; b < B; b++) {
            float q = g[b * A + action[b]];
            float d = q - y[b], ad = fabsf(d);
            loss += (double)(wts[b] * (ad < 1.0f ? 0.5f * d * d : ad - 0.5f));
            q_out[i * B + b] = q;
            for (int64_t a = 0; a < A; a++) g[b * A + a] = 0.0f;
            g[b * A + action[b]] = wts[b] * (d > 1.0f ? 1.0f : d < -1.0f ? -1.0f : d) / (float)B;
        }
        loss_out[i] = (float)(loss / (double)B);
        double sq = 0.0;
        for (int l = L - 1; l >= 0; l--) {
            layer_t *t = &layers[l];
            int64_t din = t->din, dout = t->dout, ldr = 2 * pairs(dout), NPo = pad16(dout);
            float *gw = gW[l] + i * dout * din, *gb = gB[l] + i * dout;
            for (int64_t o = 0; o < dout; o++) gb[o] = 0.0f;
            for (int64_t b = 0; b < B; b++)
                for (int64_t o = 0; o < dout; o++) gb[o] += g[b * dout + o];
            sq += sumsq(gb, dout);
            for (int64_t b = 0; b < B; b++) cvt_row(isa, g + b * dout, dout, w.rows + b * ldr, ldr);
            interleave_rows(w.rows, B, dout, ldr, w.gi); /* word (o, p) at p * NPo + o */
            gemm(isa, dout, din, pairs(B), w.gi, 1, NPo, t->xb, pad16(din), gw, din);
            sq += sumsq(gw, dout * din);
            if (l == 0) break;
            gemm(isa, B, din, pairs(dout), w.rows, ldr / 2, 1, t->wb, pad16(din), w.h, din); /* dL/dx = g . W */
            int64_t NP = pad16(din);
            for (int64_t p = 0; p < pairs(B); p++) { /* through the ReLU below: x > 0, read in xb's batch pairs */
                const bf16 *xp = t->xb + p * NP * 2;
                for (int j = 0; j < 2 && 2 * p + j < B; j++) {
                    int64_t b = 2 * p + j;
                    for (int64_t k = 0; k < din; k++) {
                        bf16 x = xp[2 * k + j];
                        g[b * din + k] = (x != 0 && !(x & 0x8000)) ? w.h[b * din + k] : 0.0f;
                    }
                }
            }
        }
        float norm = (float)sqrt(sq);
        norm_out[i] = norm;
        if (max_norm > 0.0f && isfinite(max_norm) && isfinite(norm)) {
            float factor = max_norm / (norm + 1e-6f);
            if (factor < 1.0f) {
                for (int l = 0; l < L; l++) {
                    int64_t din = layers[l].din, dout = layers[l].dout;
                    float *gw = gW[l] + i * dout * din, *gb = gB[l] + i * dout;
                    for (int64_t e = 0; e < dout * din; e++) gw[e] *= factor;
                    for (int64_t o = 0; o < dout; o++) gb[o] *= factor;
                }
            }
        }
    }
    return 0;
}
