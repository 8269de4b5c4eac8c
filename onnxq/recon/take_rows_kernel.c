/* Mini-batch assembly for onnxq.recon.native: rows of cached tensors gathered and cast to float32 in one
 * pass, optionally mixed with a second cache by packed bits (QDrop's block input).
 *
 *   out[r] = float32(q[idx[r]])                                      (take)
 *   out[r][e] = bit(r * row + e) ? float32(fp[idx[r]][e]) : float32(q[idx[r]][e])   (mix)
 *
 * A row is one sample: ``row`` elements contiguous in memory (row-major or channels-last caches); a
 * source is float16 (``*_half`` != 0) or float32. Bit i is bit i % 8, least significant first, of byte
 * i / 8 (onnxq.recon.drop_mask's layout). A cast from float16 is exact and the mix a selection, so the
 * result is the same whichever path computes it (the torch path: index, cast, torch.where).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define ONNXQ_VECTOR 1
#endif

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) {  /* zero or subnormal: man * 2^-24, exact in float32 */
        f = (float)man * 5.9604644775390625e-08f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {  /* inf or nan */
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load1(const void *src, int half, int64_t i) {
    return half ? half_to_float(((const uint16_t *)src)[i]) : ((const float *)src)[i];
}

static inline unsigned bit_at(const uint8_t *bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1u; }

#ifdef ONNXQ_VECTOR
static inline __m256 load8(const void *src, int half, int64_t i) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)))
                : _mm256_loadu_ps((const float *)src + i);
}

/* The 8 bits from bit i on, as an all-ones / all-zeros lane each. */
static inline __m256 bits8(const uint8_t *bits, int64_t i) {
    const unsigned lo = bits[i >> 3], hi = (i & 7) ? bits[(i >> 3) + 1] : 0u;
    const unsigned m = ((lo | (hi << 8)) >> (i & 7)) & 0xffu;
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32((int)m), lanes);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lanes));
}
#endif

/* Rows [first, last) of the batch. */
void onnxq_take_rows(const void *q, int q_half, const void *fp, int fp_half, const uint8_t *bits,
                     const int64_t *idx, int64_t first, int64_t last, int64_t row, float *out) {
    for (int64_t r = first; r < last; ++r) {
        const int64_t src = idx[r] * row, dst = r * row;
        int64_t e = 0;
#ifdef ONNXQ_VECTOR
        for (; e + 8 <= row; e += 8) {
            __m256 v = load8(q, q_half, src + e);
            if (fp) v = _mm256_blendv_ps(v, load8(fp, fp_half, src + e), bits8(bits, dst + e));
            _mm256_storeu_ps(out + dst + e, v);
        }
#endif
        for (; e < row; ++e)
            out[dst + e] = (fp && bit_at(bits, dst + e)) ? load1(fp, fp_half, src + e) : load1(q, q_half, src + e);
    }
}
