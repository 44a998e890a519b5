/*
 * Fused CPU kernels of the models (float32), compiled on first use by accel/build.py.
 *
 * Each kernel is the elementwise chain between two matrix products, done in one pass over
 * memory: the GRU cell of one time step (forward and backward). The products themselves stay in
 * torch. The formulas are those of the torch path they replace (accel/gru.py); tests compare
 * both against float64.
 *
 * Loops are written so that gcc vectorises them (-O3 -march=native): no branches in the inner
 * loops, and exp computed by a polynomial (below) instead of libm's scalar expf.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) to about 2 ulp for x in [-87, 88]; inputs are clamped to that range (the callers only
 * need values in [-87, 0] or saturating ones). Range reduction x = n ln2 + r with |r| <= ln2 / 2,
 * a degree-6 polynomial for exp(r), then 2^n put into the exponent bits. */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : x;                       /* selects, not fminf/fmaxf: they vectorise */
    x = x > 88.0f ? 88.0f : x;
    const float shifter = 12582912.0f;                 /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693145751953125f;              /* ln2 split in two for an exact product */
    r = r - n * 1.428606765330187045e-6f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* tanh: an odd polynomial near 0 (where 1 - 2/(e^2x + 1) would cancel), the exp form elsewhere. */
static inline float tanh_poly(float x) {
    float a = fabsf(x);
    float e = exp_poly(-2.0f * a);
    float far = (1.0f - e) / (1.0f + e);
    float z = x * x;
    float near = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                   + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * a + a;
    float t = a < 0.625f ? near : far;
    return copysignf(t, x);
}

/* Non-temporal ("streaming") stores for what a step writes but only the backward, or the products
 * after the whole recurrence, read again: they skip the read-for-ownership of the destination and
 * do not evict the step's working set (gates, state, W_hh) from the caches. Rows are written
 * through a CHUNK-float buffer in L1. Where the vector width or the alignment does not fit, the
 * kernels store normally. */
#define CHUNK 256
#if defined(__AVX512F__)
#include <immintrin.h>
#define STREAM_WIDTH 16
static inline void stream(float *restrict dst, const float *restrict src, int64_t m) {
    for (int64_t j = 0; j < m; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
}
static inline void stream_fence(void) { _mm_sfence(); }
#elif defined(__AVX__)
#include <immintrin.h>
#define STREAM_WIDTH 8
static inline void stream(float *restrict dst, const float *restrict src, int64_t m) {
    for (int64_t j = 0; j < m; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
}
static inline void stream_fence(void) { _mm_sfence(); }
#else
#define STREAM_WIDTH 0
static inline void stream(float *restrict dst, const float *restrict src, int64_t m) {
    memcpy(dst, src, (size_t)m * sizeof(float));
}
static inline void stream_fence(void) {}
#endif

/* Whether rows of H floats starting at p can be streamed: vector-aligned rows of whole vectors. */
static inline int streamable(const float *p, int64_t H) {
#if STREAM_WIDTH > 0
    return H % STREAM_WIDTH == 0 && ((uintptr_t)p % (STREAM_WIDTH * sizeof(float))) == 0;
#else
    (void)p, (void)H;
    return 0;
#endif
}

/* ---- GRU cell (gate order r, z, n as nn.GRU) --------------------------------------------------
 * gi: (n, 3H) input gates W_ih x + b_ih; gh: (n, 3H) hidden gates W_hh h + b_hh;
 * h_prev: (n, H) (zeros at the first step). Writes h (n, H) and, if r_s is not NULL, what the
 * backward needs: r, z, the candidate and W_hn h + b_hn, each (n, H).
 *   r = s(gi_r + gh_r), z = s(gi_z + gh_z), cand = tanh(gi_n + r * gh_n), h = cand + z (h_prev - cand)
 */
void aoq_gru_cell_forward(const float *restrict gi, int64_t gi_stride, const float *restrict gh,
                          const float *restrict h_prev, float *restrict h, float *restrict r_s,
                          float *restrict z_s, float *restrict cand_s, float *restrict ghn_s,
                          int64_t n, int64_t H) {
    for (int64_t b = 0; b < n; b++) {
        const float *restrict gir = gi + b * gi_stride, *restrict ghr = gh + b * 3 * H;
        int64_t o = b * H;
        if (r_s && streamable(r_s, H) && streamable(z_s, H) && streamable(cand_s, H) && streamable(ghn_s, H)) {
            for (int64_t j0 = 0; j0 < H; j0 += CHUNK) {
                int64_t m = H - j0 < CHUNK ? H - j0 : CHUNK;
                float lr[CHUNK], lz[CHUNK], lc[CHUNK];
                for (int64_t j = 0; j < m; j++) {
                    float r = sigmoid(gir[j0 + j] + ghr[j0 + j]);
                    float z = sigmoid(gir[H + j0 + j] + ghr[H + j0 + j]);
                    float c = tanh_poly(gir[2 * H + j0 + j] + r * ghr[2 * H + j0 + j]);
                    h[o + j0 + j] = c + z * (h_prev[o + j0 + j] - c);
                    lr[j] = r; lz[j] = z; lc[j] = c;
                }
                stream(r_s + o + j0, lr, m);
                stream(z_s + o + j0, lz, m);
                stream(cand_s + o + j0, lc, m);
                stream(ghn_s + o + j0, ghr + 2 * H + j0, m);
            }
        } else if (r_s) {
            for (int64_t j = 0; j < H; j++) {
                float r = sigmoid(gir[j] + ghr[j]);
                float z = sigmoid(gir[H + j] + ghr[H + j]);
                float c = tanh_poly(gir[2 * H + j] + r * ghr[2 * H + j]);
                h[o + j] = c + z * (h_prev[o + j] - c);
                r_s[o + j] = r;
                z_s[o + j] = z;
                cand_s[o + j] = c;
                ghn_s[o + j] = ghr[2 * H + j];
            }
        } else {
            for (int64_t j = 0; j < H; j++) {
                float r = sigmoid(gir[j] + ghr[j]);
                float z = sigmoid(gir[H + j] + ghr[H + j]);
                float c = tanh_poly(gir[2 * H + j] + r * ghr[2 * H + j]);
                h[o + j] = c + z * (h_prev[o + j] - c);
            }
        }
    }
    stream_fence();
}

/* Backward of one step. d = dh + grad_out (each (n, H)); writes grad_gi (n, 3H), grad_gh (n, 3H)
 * (equal to grad_gi in the r and z thirds) and dz = d * z (n, H), the part of dh_prev that does
 * not go through W_hh (the caller adds grad_gh @ W_hh). */
void aoq_gru_cell_backward(const float *restrict dh, const float *restrict grad_out,
                           const float *restrict r_s, const float *restrict z_s,
                           const float *restrict cand_s, const float *restrict ghn_s,
                           const float *restrict h_prev, float *restrict grad_gi,
                           float *restrict grad_gh, float *restrict dz, int64_t n, int64_t H) {
    if (streamable(grad_gi, H)) {
        for (int64_t b = 0; b < n; b++) {
            int64_t o = b * H, g = b * 3 * H;
            for (int64_t j0 = 0; j0 < H; j0 += CHUNK) {
                int64_t m = H - j0 < CHUNK ? H - j0 : CHUNK;
                float lr[CHUNK], lz[CHUNK], ln[CHUNK];
                for (int64_t jj = 0; jj < m; jj++) {
                    int64_t j = j0 + jj;
                    float d = dh[o + j] + grad_out[o + j];
                    float r = r_s[o + j], z = z_s[o + j], c = cand_s[o + j];
                    float d_cand = d * (1.0f - z) * (1.0f - c * c);
                    float g_r = d_cand * ghn_s[o + j] * r * (1.0f - r);
                    float g_z = d * (h_prev[o + j] - c) * z * (1.0f - z);
                    lr[jj] = g_r; lz[jj] = g_z; ln[jj] = d_cand;
                    grad_gh[g + j] = g_r;
                    grad_gh[g + H + j] = g_z;
                    grad_gh[g + 2 * H + j] = d_cand * r;
                    dz[o + j] = d * z;
                }
                stream(grad_gi + g + j0, lr, m);
                stream(grad_gi + g + H + j0, lz, m);
                stream(grad_gi + g + 2 * H + j0, ln, m);
            }
        }
        stream_fence();
        return;
    }
    for (int64_t b = 0; b < n; b++) {
        int64_t o = b * H, g = b * 3 * H;
        for (int64_t j = 0; j < H; j++) {
            float d = dh[o + j] + grad_out[o + j];
            float r = r_s[o + j], z = z_s[o + j], c = cand_s[o + j];
            float d_cand = d * (1.0f - z) * (1.0f - c * c);
            float g_r = d_cand * ghn_s[o + j] * r * (1.0f - r);
            float g_z = d * (h_prev[o + j] - c) * z * (1.0f - z);
            grad_gi[g + j] = g_r;
            grad_gi[g + H + j] = g_z;
            grad_gi[g + 2 * H + j] = d_cand;
            grad_gh[g + j] = g_r;
            grad_gh[g + H + j] = g_z;
            grad_gh[g + 2 * H + j] = d_cand * r;
            dz[o + j] = d * z;
        }
    }
}
