/* One-pass forward of per-tensor fake quantization, for onnxq.recon.native.
 *
 * Computes, element by element, exactly the float32 operations of onnxq.recon.fake_quant's torch path,
 * in the same order, so the results are bit-identical to it (tests/recon/test_fake_quant_native.py):
 *
 *   v = x / s;  t = min(max(v, lo), hi);  c = round_half_even(t);  o = c * s
 *   keep (QDrop; 0/1):  o = |k| < 0.5 ? o + k * (x - o) : x + (k - 1) * (x - o)      (torch.lerp)
 *   inside = (t == v);  local = c - v * inside;  keep:  local = local + (-local) * k;  inside = max(inside, k)
 *
 * The torch path makes about ten full-size passes over memory (one per operator); this makes one.
 * Build with -ffp-contract=off (no fused multiply-adds, as the torch path's separate operators) and
 * -fno-trapping-math (so that the loops vectorize; no code here reads the floating-point flags).
 * inside and local may be NULL (no gradient needs them); keep may be NULL (no QDrop).
 */
#include <math.h>
#include <stdint.h>

/* One loop body; called with constant flags below, so the compiler emits a branch-free vector loop for
 * each of the eight cases. */
static inline __attribute__((always_inline)) void fake_quant_loop(
    const float *restrict x, const float *restrict keep, int64_t n, float s, float lo, float hi,
    float *restrict out, float *restrict inside, float *restrict local, int has_keep, int has_inside,
    int has_local) {
    for (int64_t i = 0; i < n; ++i) {
        const float xi = x[i];
        const float v = xi / s;
        float t = v < lo ? lo : v;
        t = t > hi ? hi : t;
        const float c = nearbyintf(t);
        float o = c * s;
        float in = t == v ? 1.0f : 0.0f;
        float loc = c - v * in;
        if (has_keep) {
            const float k = keep[i];
            const float d = xi - o;
            o = fabsf(k) < 0.5f ? o + k * d : xi + (k - 1.0f) * d;
            loc = loc + (-1.0f * loc) * k;
            in = in < k ? k : in;
        }
        out[i] = o;
        if (has_inside) inside[i] = in;
        if (has_local) local[i] = loc;
    }
}

void onnxq_fake_quant_forward(const float *restrict x, const float *restrict keep, int64_t n, float s, float lo,
                              float hi, float *restrict out, float *restrict inside, float *restrict local) {
    const int k = keep != 0, a = inside != 0, b = local != 0;
#define CASE(K, A, B) if (k == K && a == A && b == B) { fake_quant_loop(x, keep, n, s, lo, hi, out, inside, local, K, A, B); return; }
    CASE(0, 0, 0) CASE(0, 0, 1) CASE(0, 1, 0) CASE(0, 1, 1)
    CASE(1, 0, 0) CASE(1, 0, 1) CASE(1, 1, 0) CASE(1, 1, 1)
#undef CASE
}
