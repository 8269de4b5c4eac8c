/* One-pass forward of per-tensor fake quantization, for onnxq.recon.native.
 *
 * Computes, element by element, exactly the float32 operations of onnxq.recon.fake_quant's torch path,
 * in the same order, so the results are bit-identical to it (tests/recon/test_fake_quant_native.py):
 *
 *   clip (a ReLU6 before the quantizer; lo_c, hi_c):  m = (lo_c < x < hi_c);  x = min(max(x, lo_c), hi_c) + 0
 *   v = x / s;  t = min(max(v, lo), hi);  c = round_half_even(t);  o = c * s
 *   keep (QDrop; 0/1):  o = |k| < 0.5 ? o + k * (x - o) : x + (k - 1) * (x - o)      (torch.lerp)
 *   inside = (t == v);  local = c - v * inside;  keep:  local = local + (-local) * k;  inside = max(inside, k)
 *   clip:  inside = inside * m                      (the clip's gradient mask, as torch's hardtanh backward)
 *
 * The clip's "+ 0" turns -0 into +0, so that the result does not depend on how a max of two zeros picks.
 * The keep mask comes as floats (one per element) or packed bits (element i is bit i % 8, least
 * significant first, of byte i / 8: onnxq.recon.drop_mask's layout, 32 times less memory to read).
 * The torch path makes about ten full-size passes over memory (one per operator); this makes one.
 * Build with -ffp-contract=off (no fused multiply-adds, as the torch path's separate operators) and
 * -fno-trapping-math (so that the loops vectorize; no code here reads the floating-point flags).
 * inside and local may be NULL (no gradient needs them); keep and bits may be NULL (no QDrop).
 */
#include <math.h>
#include <stdint.h>

enum { KEEP_NONE = 0, KEEP_FLOAT = 1, KEEP_BITS = 2 };

/* One element; inlined with constant flags below, so the compiler emits a branch-free vector loop for
 * each case. */
static inline __attribute__((always_inline)) void fake_quant_one(
    float xi, float k, float s, float lo, float hi, float clo, float chi, float *restrict out,
    float *restrict inside, float *restrict local, int64_t i, int has_keep, int has_inside, int has_local,
    int has_clip) {
    float m = 1.0f;
    if (has_clip) {
        m = (xi > clo && xi < chi) ? 1.0f : 0.0f;
        float y = xi < clo ? clo : xi;
        y = y > chi ? chi : y;
        xi = y + 0.0f;
    }
    const float v = xi / s;
    float t = v < lo ? lo : v;
    t = t > hi ? hi : t;
    const float c = nearbyintf(t);
    float o = c * s;
    float in = t == v ? 1.0f : 0.0f;
    float loc = c - v * in;
    if (has_keep) {
        const float d = xi - o;
        o = fabsf(k) < 0.5f ? o + k * d : xi + (k - 1.0f) * d;
        loc = loc + (-1.0f * loc) * k;
        in = in < k ? k : in;
    }
    if (has_clip) in = in * m;
    out[i] = o;
    if (has_inside) inside[i] = in;
    if (has_local) local[i] = loc;
}

static inline __attribute__((always_inline)) void fake_quant_loop(
    const float *restrict x, const float *restrict keep, const uint8_t *restrict bits, int64_t n, float s,
    float lo, float hi, float clo, float chi, float *restrict out, float *restrict inside, float *restrict local,
    int keep_kind, int has_inside, int has_local, int has_clip) {
    if (keep_kind == KEEP_BITS) {
        const int64_t whole = n / 8;
        for (int64_t j = 0; j < whole; ++j) {
            const unsigned b = bits[j];
            for (int e = 0; e < 8; ++e) {
                const int64_t i = 8 * j + e;
                fake_quant_one(x[i], (float)((b >> e) & 1u), s, lo, hi, clo, chi, out, inside, local, i, 1,
                               has_inside, has_local, has_clip);
            }
        }
        for (int64_t i = 8 * whole; i < n; ++i)
            fake_quant_one(x[i], (float)((bits[i / 8] >> (i % 8)) & 1u), s, lo, hi, clo, chi, out, inside, local,
                           i, 1, has_inside, has_local, has_clip);
        return;
    }
    for (int64_t i = 0; i < n; ++i)
        fake_quant_one(x[i], keep_kind == KEEP_FLOAT ? keep[i] : 0.0f, s, lo, hi, clo, chi, out, inside, local, i,
                       keep_kind == KEEP_FLOAT, has_inside, has_local, has_clip);
}

/* bits, when given, start at element 0 of x: chunks of one tensor start at multiples of 8 elements.
 * has_clip: clip x to [clo, chi] first (see the top). */
void onnxq_fake_quant_forward(const float *restrict x, const float *restrict keep, const uint8_t *restrict bits,
                              int64_t n, float s, float lo, float hi, int has_clip, float clo, float chi,
                              float *restrict out, float *restrict inside, float *restrict local) {
    const int k = bits != 0 ? KEEP_BITS : keep != 0 ? KEEP_FLOAT : KEEP_NONE, a = inside != 0, b = local != 0;
    const int c = has_clip != 0;
#define CASE(K, A, B, C) if (k == K && a == A && b == B && c == C) { \
        fake_quant_loop(x, keep, bits, n, s, lo, hi, clo, chi, out, inside, local, K, A, B, C); return; }
#define CASES(K, C) CASE(K, 0, 0, C) CASE(K, 0, 1, C) CASE(K, 1, 0, C) CASE(K, 1, 1, C)
    CASES(0, 0) CASES(1, 0) CASES(2, 0) CASES(0, 1) CASES(1, 1) CASES(2, 1)
#undef CASES
#undef CASE
}

/* The same for rows [r0, r1) of a channels-last (N, H, W, C) tensor x whose output goes into the interior
 * of a zero-padded (N, H + pt + pb, W + pl + pr, C) tensor (the padding of the convolution that reads it;
 * the caller zeroes the border): row r = n * h + y of row_len = W * C elements starts at
 * out + n * plane + y * out_row + lead (plane, out_row: the padded strides of n and y; lead = pt * out_row +
 * pl * C). inside and local stay unpadded. row_len is a multiple of 8 when bits are given. */
void onnxq_fake_quant_padded(const float *restrict x, const float *restrict keep, const uint8_t *restrict bits,
                             int64_t r0, int64_t r1, int64_t row_len, int64_t h, int64_t plane, int64_t out_row,
                             int64_t lead, float s, float lo, float hi, int has_clip, float clo, float chi,
                             float *restrict out, float *restrict inside, float *restrict local) {
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * row_len;
        onnxq_fake_quant_forward(x + at, keep ? keep + at : 0, bits ? bits + at / 8 : 0, row_len, s, lo, hi, has_clip,
                                 clo, chi, out + (r / h) * plane + (r % h) * out_row + lead,
                                 inside ? inside + at : 0, local ? local + at : 0);
    }
}
