/* Fake-quantization loops for QAT on the CPU (rlq/quant/native.py compiles and loads this file): fixed grids
   (EMA activation ranges), max-scaled and QuEST (RMS-scaled, trust-masked) weights, LSQ forward and backward,
   min/max, STE masks.

   Each function does in one or two passes what several torch ops do (and costs one ctypes call instead of
   several dispatches, which is what QAT costs on the small networks of RL). They compute exactly what the
   torch path computes: IEEE float32 division by the scale (never a multiplication by its inverse), round
   half to even, clamping that keeps NaN, NaN-propagating max. Built with -O3 -march=native
   -ffp-contract=off -fno-fast-math for the CPU it runs on (native.py keys the build on the CPU's flags), so
   the simple loops below vectorize to what that CPU has.

   Rounding: values are clamped to [lo - 1, hi + 1] before rounding (|v| < 2^22 then), so the
   "add and subtract 1.5 * 2^23" rounding is exact round-half-to-even and vectorizes; clamping first does not
   change the result: round(clamp(v, lo-1, hi+1)) lies outside [lo, hi] exactly when round(v) does, and equals
   round(v) inside; the result takes v's sign (copysign), so that values in (-0.5, 0) give -0.0 as torch.round
   does (outputs are equal bit for bit, signed zeros included). Sums (LSQ step gradients) run in a fixed order (16 partial sums; torch's reductions use
   another order: the results agree to float rounding).
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

#define RLQ_FQ_ABI 5
static const float MAGIC = 12582912.0f; /* 1.5 * 2^23 */

int rlq_fq_abi(void) { return RLQ_FQ_ABI; }

static inline float clampf_keepnan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* round half to even of |v| < 2^22 with v's sign (as rint: round(-0.2) is -0.0; the magic-number addition alone
   would give +0.0); NaN stays NaN */
static inline float round_small(float v) { return copysignf((v + MAGIC) - MAGIC, v); }

/* round half to even of a clamped value */
static inline float round_clamped(float v, float l1, float h1) { return round_small(clampf_keepnan(v, l1, h1)); }

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* float -> int32 with the same order (-0 sorts just below +0; NaN beyond +-inf): integer min/max vectorize */
static inline int32_t f2key(float f) { int32_t i = (int32_t)f2u(f); return i ^ ((i >> 31) & 0x7fffffff); }
static inline float key2f(int32_t k) { return u2f((uint32_t)(k ^ ((k >> 31) & 0x7fffffff))); }

/* min and max of x (NaN for both if any element is NaN, as torch.aminmax) into out[0], out[1]. */
void rlq_minmax(const float *x, int64_t n, float *out) {
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int64_t i = 0; i < n; i++) {
        int32_t k = f2key(x[i]);
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
    }
    float a = key2f(lo), b = key2f(hi);
    int nan = a != a || b != b;
    out[0] = nan ? NAN : a;
    out[1] = nan ? NAN : b;
}

/* max |row| (NaN if any NaN: |x| as bits orders like the unsigned integers, NaNs above +inf) */
static inline float absmax_row(const float *row, int64_t k) {
    uint32_t m = 0;
    for (int64_t j = 0; j < k; j++) {
        uint32_t b = f2u(row[j]) & 0x7fffffffu;
        m = b > m ? b : m;
    }
    return u2f(m);
}

typedef float v16sf __attribute__((vector_size(64)));

/* Fixed grid: out = clamp(round(x / s), lo, hi) * s; mask (if not NULL) = round(x / s) in [lo, hi].
   clamp = 0: the caller knows nothing can leave the grid (no clamp, values as torch's round(x/s)*s). */
void rlq_fq_grid(const float *x, int64_t n, float s, float lo, float hi, int clamp, float *out,
                        uint8_t *mask) {
    const float l1 = lo - 1.0f, h1 = hi + 1.0f;
    if (mask) {
        for (int64_t i = 0; i < n; i++) {
            float q = round_clamped(x[i] / s, l1, h1);
            float c = clampf_keepnan(q, lo, hi);
            mask[i] = c == q;
            out[i] = c * s;
        }
    } else if (clamp) {
        for (int64_t i = 0; i < n; i++) out[i] = clampf_keepnan(round_clamped(x[i] / s, l1, h1), lo, hi) * s;
    } else { /* (the caller proved |x / s| stays within the grid's half steps: the clamp below is a no-op) */
        for (int64_t i = 0; i < n; i++) out[i] = round_clamped(x[i] / s, l1, h1) * s;
    }
}

/* Per-row symmetric max-scaled weights: scale[c] = max(max_k |w[c,k]| / qmax, eps),
   out[c,k] = round(w[c,k] / scale[c]) * scale[c] (never clipped: |w / scale| <= qmax). */
void rlq_fq_weight_max(const float *w, int64_t rows, int64_t k, float qmax, float eps, float *out,
                              float *scale) {
    for (int64_t c = 0; c < rows; c++) {
        const float *row = w + c * k;
        float s = absmax_row(row, k) / qmax;
        s = s < eps ? eps : s; /* (NaN stays NaN, as torch's clamp_min) */
        scale[c] = s;
        float *o = out + c * k;
        const float l1 = -qmax - 1.0f, h1 = qmax + 1.0f;
        for (int64_t j = 0; j < k; j++) o[j] = round_clamped(row[j] / s, l1, h1) * s;
    }
}

/* LSQ forward on rows of k elements with one step per row (rows = 1: one step for the tensor):
   s = max(|step[c]|, eps); out = round(clamp(x / s, lo, hi)) * s. Nothing else is stored: the backward
   recomputes x / s (same values) instead of keeping two more tensors of x's size alive until then. */
void rlq_fq_lsq(const float *x, int64_t rows, int64_t k, const float *step, float eps, float lo, float hi, float *out) {
    for (int64_t c = 0; c < rows; c++) {
        float s = fabsf(step[c]);
        s = s < eps ? eps : s;
        const float *xr = x + c * k;
        float *o = out + c * k;
        for (int64_t j = 0; j < k; j++) o[j] = round_small(clampf_keepnan(xr[j] / s, lo, hi)) * s;
    }
}

typedef int32_t v16si __attribute__((vector_size(64)));
static inline v16sf vsel(v16si m, v16sf a, v16sf b) { return (v16sf)(((v16si)a & m) | ((v16si)b & ~m)); }

/* LSQ backward, from the forward's input x: with v = x / s, inside = lo <= v <= hi, q = round(clamp(v)),
   d out / d s = inside ? q - v : q:
   g_step[c] = sgn(step[c]) * (|step[c]| >= eps) * grad_scale * sum_k g[c,k] * (d out / d s)[c,k]
   (the chain through s = max(|step|, eps), as autograd's abs and clamp_min backward), and g = g * inside
   in place (as a product). The sum runs in a fixed order (16 partial sums, then those in order, then the tail). */
void rlq_lsq_bwd(float *g, const float *x, int64_t rows, int64_t k, const float *step, float eps, float lo, float hi,
                 float grad_scale, float *g_step) {
    for (int64_t c = 0; c < rows; c++) {
        float s = fabsf(step[c]);
        s = s < eps ? eps : s;
        float *gr = g + c * k;
        const float *xr = x + c * k;
        const v16sf vlo = lo + (v16sf){0}, vhi = hi + (v16sf){0}, vmagic = MAGIC + (v16sf){0}, zero = {0}, one = 1.0f + (v16sf){0};
        v16sf acc = {0};
        int64_t j = 0;
        for (; j + 16 <= k; j += 16) {
            v16sf xv, gv;
            memcpy(&xv, xr + j, 64);
            memcpy(&gv, gr + j, 64);
            v16sf v = xv / s;
            v16sf vc = vsel(v < vlo, vlo, vsel(v > vhi, vhi, v));
            v16sf q = (vc + vmagic) - vmagic;
            v16si in = vc == v;
            acc += gv * vsel(in, q - v, q);
            gv = gv * vsel(in, one, zero); /* (a product, as torch's mul_: -g * 0 is -0.0, NaN stays) */
            memcpy(gr + j, &gv, 64);
        }
        float r = 0.0f;
        for (int l = 0; l < 16; l++) r += acc[l];
        for (; j < k; j++) {
            float v = xr[j] / s;
            float vc = clampf_keepnan(v, lo, hi);
            float q = round_small(vc);
            int in = vc == v;
            r += gr[j] * (in ? q - v : q);
            gr[j] *= in ? 1.0f : 0.0f;
        }
        float a = fabsf(step[c]);
        float sgn = step[c] > 0.0f ? 1.0f : (step[c] < 0.0f ? -1.0f : 0.0f);
        g_step[c] = a >= eps ? r * grad_scale * sgn : 0.0f;
    }
}

/* The gradient at a ReLU's output h that the next layer fake-quantized on a fixed grid (rlq_fq_grid with the
   same s, lo, hi), in place over g, the gradient of the quantized h: with mask (the clipped STE) g * inside
   (inside = round(h / s) in [lo, hi], the forward's mask, as a product), then the ReLU's backward
   (torch's threshold_backward on its output: h <= 0 ? 0 : g). Without mask: the ReLU's backward alone. */
void rlq_relu_grid_bwd(float *g, const float *h, int64_t n, float s, float lo, float hi, int mask) {
    const float l1 = lo - 1.0f, h1 = hi + 1.0f;
    if (mask) {
        for (int64_t i = 0; i < n; i++) {
            float q = round_clamped(h[i] / s, l1, h1);
            float c = clampf_keepnan(q, lo, hi);
            float gi = g[i] * (c == q ? 1.0f : 0.0f);
            g[i] = h[i] <= 0.0f ? 0.0f : gi;
        }
    } else {
        for (int64_t i = 0; i < n; i++) g[i] = h[i] <= 0.0f ? 0.0f : g[i];
    }
}

/* g *= mask, in place (a product, as torch's mul_: -g * 0 is -0.0, NaN * 0 is NaN). */
void rlq_mask_mul(float *g, const uint8_t *mask, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] *= (float)mask[i];
}

/* QuEST's per-row scale: scale[c] = max(alpha * sqrt(mean_k w[c,k]^2) / qmax, eps). The sum of squares runs
   in a fixed order (16 partial sums, then those in order, then the tail): torch's mean adds in another
   order, so the scales agree with the torch ops to float rounding (not bit for bit). */
void rlq_quest_scale(const float *w, int64_t rows, int64_t k, float alpha, float qmax, float eps, float *scale) {
    for (int64_t c = 0; c < rows; c++) {
        const float *row = w + c * k;
        v16sf acc = {0};
        int64_t j = 0;
        for (; j + 16 <= k; j += 16) {
            v16sf xv;
            memcpy(&xv, row + j, 64);
            acc += xv * xv;
        }
        float r = 0.0f;
        for (int l = 0; l < 16; l++) r += acc[l];
        for (; j < k; j++) r += row[j] * row[j];
        float s = alpha * sqrtf(r / (float)k) / qmax;
        scale[c] = s < eps ? eps : s;
    }
}

/* Fixed per-row grid with QuEST's trust mask (the torch ops of rlq.quant.functions.trust_fwd with zero point
   0): q = clamp(round(w / s) + 0, lo, hi) (the + 0 turns -0.0 into +0.0, as there), out = q * s,
   mask = |out - w| <= trust[c], with s = scale[c]. */
void rlq_fq_trust(const float *w, int64_t rows, int64_t k, const float *scale, const float *trust, float lo, float hi,
                  float *out, uint8_t *mask) {
    const float l1 = lo - 1.0f, h1 = hi + 1.0f;
    for (int64_t c = 0; c < rows; c++) {
        const float s = scale[c], t = trust[c];
        const float *row = w + c * k;
        float *o = out + c * k;
        uint8_t *m = mask + c * k;
        for (int64_t j = 0; j < k; j++) {
            float q = clampf_keepnan(round_clamped(row[j] / s, l1, h1) + 0.0f, lo, hi);
            float v = q * s;
            o[j] = v;
            m[j] = fabsf(v - row[j]) <= t;
        }
    }
}
