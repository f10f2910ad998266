// Fused 4-bit AdamW step for one contiguous float32 tensor on the CPU.
//
// Built on first use by plasticity.optim._cpu (torch.utils.cpp_extension). Compiled
// without fast-math and with -ffp-contract=off: every operation rounds exactly as the
// pure-PyTorch path in plasticity.optim._numerics does, so both give identical bits.
//
// Both passes' vector loops (simd_block, simd_stats) are written once, in the operations of
// `Simd`: 16 lanes where the compiler targets AVX-512 (F, BW, DQ, VL), 8 lanes where it
// targets AVX2 and FMA but not AVX-512. They take rank-1 statistics over rows a multiple of
// W elements and update blocks a multiple of 16 elements; the scalar loops handle every
// other case. All give the same bits.
//
// Codes: two 4-bit codes per byte, element 2k in the low nibble of byte k, element
// 2k+1 in the high nibble. Second-moment modes: 0 = rank-1 (scale of (i, j) is
// min(row_scale[i], col_scale[j]) over a (rows x cols) view), 1 = block-wise (absmax of
// each block), 2 = factored (v = row_factor[i] * col_factor[batch(i) * cols + j]).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr double kSignedMapD[16] = {-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325,
                                    -0.0055, 0.0,     0.0055,  0.0325,  0.0775,  0.2125,
                                    0.4375,  0.6625,  0.8875,  1.0};

struct Maps {
  float signed_map[16];
  float signed_mid[15];
  float unsigned_map[16];
  Maps() {
    for (int k = 0; k < 16; ++k) {
      signed_map[k] = static_cast<float>(kSignedMapD[k]);
      unsigned_map[k] = static_cast<float>((k + 1) / 16.0);
    }
    for (int k = 0; k < 15; ++k) {
      signed_mid[k] = static_cast<float>((kSignedMapD[k] + kSignedMapD[k + 1]) * 0.5);
    }
  }
};
const Maps kMaps;

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// out[k] = table[idx[k]] * scale for a 16-entry table (a register permute, not a gather).
inline void lookup16(const uint8_t* idx, const float* table, float scale, float* out,
                     int64_t len) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 t = _mm512_loadu_ps(table);
  const __m512 s = _mm512_set1_ps(scale);
  for (; k + 16 <= len; k += 16) {
    const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k)));
    _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_permutexvar_ps(i, t), s));
  }
#elif defined(__AVX2__)
  const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i seven = _mm256_set1_epi32(7);
  for (; k + 8 <= len; k += 8) {
    const __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx + k)));
    const __m256 a = _mm256_permutevar8x32_ps(lo, i), b = _mm256_permutevar8x32_ps(hi, i);
    const __m256 sel = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, seven));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_blendv_ps(a, b, sel), s));
  }
#endif
  for (; k < len; ++k) out[k] = table[idx[k]] * scale;
}

// cm[k] = the number of the 15 sorted decision boundaries below M[k] * inv (the nearest
// code of the signed map), by a branchless binary search.
inline void quantize_signed(const float* M, float inv, const float* mid, uint8_t* out,
                            int64_t len) {
  int64_t k = 0;
#if defined(__AVX512F__)
  float padded[16];
  std::memcpy(padded, mid, 15 * sizeof(float));
  padded[15] = INFINITY;
  const __m512 tab = _mm512_loadu_ps(padded);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; k + 16 <= len; k += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(M + k), vinv);
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step >>= 1) {
      const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
      const __mmask16 gt = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(probe, tab), _CMP_GT_OQ);
      idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(step));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(idx));
  }
#elif defined(__AVX2__)
  // The code is the number of boundaries below x (they are sorted): 15 comparisons, each
  // -1 where true, subtracted. NaN compares false everywhere, as in the binary search.
  __m256 vmid[15];
  for (int b = 0; b < 15; ++b) vmid[b] = _mm256_set1_ps(mid[b]);
  const __m256 vinv = _mm256_set1_ps(inv);
  for (; k + 8 <= len; k += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(M + k), vinv);
    __m256i idx = _mm256_setzero_si256();
    for (int b = 0; b < 15; ++b) {
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(x, vmid[b], _CMP_GT_OQ)));
    }
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packus_epi16(w, w));
  }
#endif
  for (; k < len; ++k) {
    const float x = M[k] * inv;
    int idx = 0;
    for (int step = 8; step >= 1; step >>= 1) {
      if (x > mid[idx + step - 1]) idx += step;
    }
    out[k] = static_cast<uint8_t>(idx);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define PLASTICITY_AVX512 1
// 8 packed bytes -> the 16 codes they hold, in element order, in the low 4 bits of 32-bit
// lanes (the bits above are not cleared: only use the result as a permute index, which
// reads the low 4 bits).
inline __m512i unpack16(const uint8_t* p) {
#if defined(__AVX512VBMI__)
  // Every qword holds the 8 bytes; 32-bit lane 2q + h takes the 8 bits from bit 8q + 4h.
  uint64_t w;
  std::memcpy(&w, p, 8);
  const __m512i src = _mm512_set1_epi64(static_cast<long long>(w));
  const __m512i ctl = _mm512_set_epi64(0x3c00000038LL, 0x3400000030LL, 0x2c00000028LL,
                                       0x2400000020LL, 0x1c00000018LL, 0x1400000010LL,
                                       0x0c00000008LL, 0x0400000000LL);
  return _mm512_multishift_epi64_epi8(ctl, src);
#else
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // b0 b0 b1 b1 ...
  return _mm512_srlv_epi32(twice, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
#endif
}

// 16 codes (32-bit lanes, 0..15) -> 8 packed bytes (even element in the low nibble).
inline void pack16(__m512i c, uint8_t* p) {
  const __m512i pair = _mm512_or_si512(c, _mm512_srli_epi64(c, 28));  // odd lane -> bits 4..7
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm512_cvtepi64_epi8(pair));
}

// Nearest code of the zero-free linear map for x in [0, 1] (never above 1 by more than a
// rounding: every x is a value times the inverse of a maximum over it), as the scalar
// unsigned_code: ceil(16 x - 1/2) - 1 == ceil(16 x - 3/2) (16 x is exact, and so are both
// subtractions where the result can be above 0), clamped at 0.
inline __m512i unsigned_codes16(__m512 x) {
  const __m512 t = _mm512_fmsub_ps(x, _mm512_set1_ps(16.0f), _mm512_set1_ps(1.5f));
  return _mm512_max_epi32(_mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC),
                          _mm512_setzero_si512());
}

// Nearest code of the signed map: the number of the 15 decision boundaries below x, by a
// binary search. mids[k] is boundary k (mids[15] = infinity); shifted tables tK[i] =
// mids[i + K] save the index arithmetic of each probe.
struct SignedTables {
  __m512 t0, t1, t3, mid7;
  explicit SignedTables(const float* mid) {
    float padded[32];
    for (int k = 0; k < 32; ++k) padded[k] = k < 15 ? mid[k] : INFINITY;
    t0 = _mm512_loadu_ps(padded);
    t1 = _mm512_loadu_ps(padded + 1);
    t3 = _mm512_loadu_ps(padded + 3);
    mid7 = _mm512_set1_ps(mid[7]);
  }
};

inline __m512i signed_codes16(__m512 x, const SignedTables& t) {
  __m512i idx = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, t.mid7, _CMP_GT_OQ),
                                       _mm512_set1_epi32(8));                    // probe 7
  __mmask16 gt = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(idx, t.t3), _CMP_GT_OQ);  // idx + 3
  idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(4));
  gt = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(idx, t.t1), _CMP_GT_OQ);             // idx + 1
  idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(2));
  gt = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(idx, t.t0), _CMP_GT_OQ);             // idx
  return _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(1));
}

// The vector operations the passes are written in (simd_block, simd_stats), 16 lanes wide.
struct Simd {
  static constexpr int W = 16;
  // No `linear` (see the AVX2 Simd): a table lookup is one permute here, and was faster than
  // linear's conversion and multiply-add. Loops instantiate LIN only as Simd::kLinear.
  static constexpr bool kLinear = false;
  using F = __m512;
  using I = __m512i;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static I load_u32(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void store_u32(uint32_t* p, I x) { _mm512_storeu_si512(p, x); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F zero() { return _mm512_setzero_ps(); }
  static I zero_u32() { return _mm512_setzero_si512(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  // Running maxima of bit patterns (of x, or of |x|) as unsigned integers: the order of
  // non-negative floats.
  static I max_bits(I acc, F x) { return _mm512_max_epu32(acc, _mm512_castps_si512(x)); }
  static I max_abs_bits(I acc, F x) {
    return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  }
  static uint32_t reduce_max(I x) { return _mm512_reduce_max_epu32(x); }
  // A 16-entry map times a scale, and its values for the W codes packed at p.
  struct Table {
    __m512 t;
  };
  static Table table(const float* map, float s) {
    return {_mm512_mul_ps(_mm512_loadu_ps(map), _mm512_set1_ps(s))};
  }
  static F lookup(const uint8_t* p, const Table& t) { return _mm512_permutexvar_ps(unpack16(p), t.t); }
  static I unsigned_codes(F x) { return unsigned_codes16(x); }
  using SignedQ = SignedTables;
  static I signed_codes(F x, const SignedQ& q) { return signed_codes16(x, q); }
  // The codes of 16 elements (16 / W vectors) -> 8 packed bytes.
  static void pack(const I* c, uint8_t* p) { pack16(c[0], p); }
};

// Software prefetch distance of the update pass in elements, measured best on the full
// GPT-2-medium shapes.
constexpr int64_t kPrefetch = 512;
#elif defined(__AVX2__) && defined(__FMA__)
#define PLASTICITY_AVX2 1
// Simd's operations on 8 lanes, for CPUs with AVX2 but not AVX-512.

// Codes of 8 elements from 4 packed bytes: `idx` holds code & 7 in the low 3 bits of each
// 32-bit lane (what a permute reads), `top` the code's bit 3 in the sign bit (what a blend
// reads). Element k's code is bits 4k..4k+3 of the little-endian word.
struct Codes8 {
  __m256i idx, top;
};
inline Codes8 unpack8(const uint8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  const __m256i b = _mm256_set1_epi32(w);
  return {_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
          _mm256_sllv_epi32(b, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0))};
}

// table[code] for a 16-entry table held as two 8-entry halves.
inline __m256 lookup8(const Codes8& c, __m256 lo, __m256 hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c.idx), _mm256_permutevar8x32_ps(hi, c.idx),
                          _mm256_castsi256_ps(c.top));
}

// 16 codes (32-bit lanes 0..15: elements 0-7 in a, 8-15 in b) -> 8 packed bytes.
inline void pack16(__m256i a, __m256i b, uint8_t* p) {
  // The odd lane's code to bits 4..7 of the even lane: each 64-bit lane's low byte is a
  // packed byte; bytes 0 and 8 of each 128-bit half are gathered in order.
  const __m256i ya = _mm256_or_si256(a, _mm256_srli_epi64(a, 28));
  const __m256i yb = _mm256_or_si256(b, _mm256_srli_epi64(b, 28));
  const __m256i sa = _mm256_shuffle_epi8(
      ya, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                           -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  const __m256i sb = _mm256_shuffle_epi8(
      yb, _mm256_setr_epi8(-1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                           -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1));
  const __m256i s = _mm256_or_si256(sa, sb);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p),
                   _mm_or_si128(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
}

// As unsigned_codes16: ceil(16 x - 3/2) clamped at 0 (16 x is exact, so the fused
// multiply-subtract rounds once, as the scalar subtraction does).
inline __m256i unsigned_codes8(__m256 x) {
  const __m256 t = _mm256_fmsub_ps(x, _mm256_set1_ps(16.0f), _mm256_set1_ps(1.5f));
  return _mm256_max_epi32(
      _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC)),
      _mm256_setzero_si256());
}

// Nearest code of the signed map, in integer operations. The map is symmetric about 0 but
// for its top value 1, so are its boundaries: with P0 < ... < P7 the positive ones
// (mids[7..14]; mids[6 - k] == -Pk exactly), x > 0 has code 7 + #{Pk < x} and x < 0 has
// code 7 - #{k < 7: Pk <= |x|} (a tie goes to the lower code, as `x > boundary` decides).
// Non-negative floats order like their bit patterns, and |x| <= Pk is |x| + 1 ulp > Pk, so
// every comparison is an integer one. NaN gets code 0, as in the binary search.
struct SignedBounds {
  __m256i p[8];
  explicit SignedBounds(const float* mid) {
    for (int k = 0; k < 8; ++k) p[k] = _mm256_set1_epi32(static_cast<int>(bits(mid[7 + k])));
  }
};
inline __m256i signed_codes8(__m256 x, const SignedBounds& t) {
  const __m256i xi = _mm256_castps_si256(x);
  const __m256i neg = _mm256_srai_epi32(xi, 31);  // -1 where the sign bit is set
  const __m256i a = _mm256_sub_epi32(_mm256_and_si256(xi, _mm256_set1_epi32(0x7fffffff)), neg);
  // Minus the number of P0..P6 below a, summed as a tree (each mask is -1 where true).
  const __m256i c01 = _mm256_add_epi32(_mm256_cmpgt_epi32(a, t.p[0]), _mm256_cmpgt_epi32(a, t.p[1]));
  const __m256i c23 = _mm256_add_epi32(_mm256_cmpgt_epi32(a, t.p[2]), _mm256_cmpgt_epi32(a, t.p[3]));
  const __m256i c45 = _mm256_add_epi32(_mm256_cmpgt_epi32(a, t.p[4]), _mm256_cmpgt_epi32(a, t.p[5]));
  const __m256i c6 = _mm256_add_epi32(_mm256_cmpgt_epi32(a, t.p[6]),
                                      _mm256_andnot_si256(neg, _mm256_cmpgt_epi32(a, t.p[7])));
  const __m256i u = _mm256_add_epi32(_mm256_add_epi32(c01, c23), _mm256_add_epi32(c45, c6));
  // x > 0: 7 - u; x < 0: 7 + u; x == +0: u == 0. Then NaN -> 0.
  const __m256i code = _mm256_sub_epi32(_mm256_set1_epi32(7), _mm256_sign_epi32(u, xi));
  return _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)), code);
}

// Horizontal maximum of 8 unsigned 32-bit lanes.
inline uint32_t reduce_max_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// The linear map's value times a scale s for 8 codes, given s16 = s / 16 exactly:
// ((c + 1) / 16) * s rounds once, and so does the fused c * s16 + s16 (the same real
// number). An integer conversion and one multiply-add instead of a table lookup's two
// permutes and a blend (7% faster update pass: the permutes share two ports).
inline __m256 linear8(const uint8_t* p, __m256 s16) {
  int32_t w;
  std::memcpy(&w, p, 4);
  const __m256i c = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
      _mm256_set1_epi32(15));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), s16, s16);
}

// The vector operations the passes are written in (simd_block, simd_stats), 8 lanes wide;
// see the AVX-512 Simd.
struct Simd {
  static constexpr int W = 8;
  // linear8 beats the table's two permutes and blend: `linear` dequantizes the second
  // moment where its old scales divide by 16 exactly.
  static constexpr bool kLinear = true;
  using F = __m256;
  using I = __m256i;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static I load_u32(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_u32(uint32_t* p, I x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F zero() { return _mm256_setzero_ps(); }
  static I zero_u32() { return _mm256_setzero_si256(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static I max_bits(I acc, F x) { return _mm256_max_epu32(acc, _mm256_castps_si256(x)); }
  static I max_abs_bits(I acc, F x) {
    return _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff)));
  }
  static uint32_t reduce_max(I x) { return reduce_max_epu32(x); }
  struct Table {
    __m256 lo, hi;
  };
  static Table table(const float* map, float s) {
    const __m256 vs = _mm256_set1_ps(s);
    return {_mm256_mul_ps(_mm256_loadu_ps(map), vs), _mm256_mul_ps(_mm256_loadu_ps(map + 8), vs)};
  }
  static F lookup(const uint8_t* p, const Table& t) { return lookup8(unpack8(p), t.lo, t.hi); }
  static F linear(const uint8_t* p, F s16) { return linear8(p, s16); }
  static I unsigned_codes(F x) { return unsigned_codes8(x); }
  using SignedQ = SignedBounds;
  static I signed_codes(F x, const SignedQ& q) { return signed_codes8(x, q); }
  static void pack(const I* c, uint8_t* p) { pack16(c[0], c[1], p); }
};

constexpr int64_t kPrefetch = 512;
#endif

#if defined(PLASTICITY_AVX512) || defined(PLASTICITY_AVX2)
#define PLASTICITY_SIMD 1
#endif

// Whether s / 16 is exact (s is 0, or at least 2^-122 so that the quotient is a normal
// float; NaN is not): the condition for linear8.
inline bool sixteenth_exact(float s) { return s == 0.0f || s >= 0x1p-122f; }

inline bool sixteenths_exact(const float* s, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= sixteenth_exact(s[i]);
  return ok;
}

// s[i] / 16 for each scale (exact where sixteenths_exact holds).
inline std::vector<float> sixteenths(const float* s, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = s[i] * 0.0625f;
  return out;
}

// 1 / s, or 0 for s == 0 (then every value it scales is 0 too). A scale below the smallest
// normal float is taken as that float, so the inverse, and every value times it, is finite.
inline float inv_or_zero(float s) {
  return s > 0.0f ? 1.0f / std::max(s, std::numeric_limits<float>::min()) : 0.0f;
}

inline float unsigned_code_arg(float x) { return x * 16.0f - 0.5f; }

// Nearest value of the zero-free linear map (k+1)/16 for x in [0, 1]; ties go down.
inline uint8_t unsigned_code(float x) {
  float c = std::ceil(unsigned_code_arg(x)) - 1.0f;
  c = c < 0.0f ? 0.0f : c;
  c = c > 15.0f ? 15.0f : c;
  return static_cast<uint8_t>(c);
}

inline uint8_t nibble(const uint8_t* codes, int64_t e) {
  return (codes[e >> 1] >> ((e & 1) << 2)) & 15;
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

void check_u8(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kUInt8 && t.is_contiguous(),
              name, " must be a contiguous uint8 CPU tensor");
}

// A step's scalars in float32, rounded once from the doubles the caller passes (as the
// PyTorch path's scalar operands are).
struct StepConstants {
  float decay, b1, omb1, b2, omb2, ibc2, eps, ss;
  StepConstants(double decay_, double beta1, double beta2, double inv_bc2_sqrt, double eps_,
                double step_size)
      : decay(static_cast<float>(decay_)), b1(static_cast<float>(beta1)),
        omb1(static_cast<float>(1.0 - beta1)), b2(static_cast<float>(beta2)),
        omb2(static_cast<float>(1.0 - beta2)), ibc2(static_cast<float>(inv_bc2_sqrt)),
        eps(static_cast<float>(eps_)), ss(static_cast<float>(step_size)) {}
  // The scalar update, in the PyTorch path's order of operations (simd_block and
  // simd_stats spell out the same operations W lanes at a time).
  float m_new(float m_old, float g) const { return m_old * b1 + g * omb1; }
  float v_new(float v_old, float g) const { return v_old * b2 + (g * g) * omb2; }
  float p_new(float p, float m, float v) const {
    const float den = std::sqrt(v) * ibc2 + eps;
    return p * decay - (m / den) * ss;
  }
};

// Fold one thread's column maxima (float bit patterns) into the result.
inline void merge_col_max(float* cm, const std::vector<uint32_t>& cmax) {
  for (size_t j = 0; j < cmax.size(); ++j) {
    float c;
    std::memcpy(&c, &cmax[j], sizeof(c));
    cm[j] = std::max(cm[j], c);
  }
}

// Block scales stored as float32 or bfloat16 (rounded to nearest even, as PyTorch's
// .to(torch.bfloat16)); put() returns the value stored, which is what the codes are
// quantized against.
struct Scales {
  float* f32 = nullptr;
  uint16_t* b16 = nullptr;
  explicit Scales(const torch::Tensor& t) {
    if (t.scalar_type() == torch::kBFloat16) {
      b16 = reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
    } else {
      f32 = t.data_ptr<float>();
    }
  }
  float get(int64_t b) const {
    if (f32) return f32[b];
    const uint32_t u = static_cast<uint32_t>(b16[b]) << 16;
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
  float put(int64_t b, float x) {
    if (f32) return f32[b] = x;
    const uint32_t u = bits(x);  // finite and >= 0 here
    b16[b] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return get(b);
  }
};

void check_scales(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16),
              name, " must be a contiguous float32 or bfloat16 CPU tensor");
}

#ifdef PLASTICITY_SIMD
// What every block of a fused_step needs (see fused_step for the meaning of each array).
struct SimdStep {
  float* P;
  const float* G;
  uint8_t* MC;
  Scales& MS;
  uint8_t* VC;
  Scales& VS;
  const float *RO, *CO, *RN, *CN, *IRN, *ICN;
  const float* CO16;  // CO / 16, for MODE 0 with LIN
  StepConstants c;
  int64_t cols, rows_per_batch, n, block;
  Simd::SignedQ sq;
};
struct SimdBlock {
  int64_t b, e0, len, i0, j0;
  float* M;  // per-thread scratch of block floats: the new first moment
  float* V;  // and, for MODE 1, the new second moment
};

// One block of fused_step in Simd's vectors: the scalar loops' operations W lanes at a
// time, 16 elements (8 code bytes) per iteration, with the second moment's rank-1 codes
// written as soon as they are computed. The second-moment mode and the first-step flag are
// fixed at compile time (the loop runs 13% faster without their tests). len is a multiple
// of 16; for MODE 0 and 2 the block lies inside one row. LIN: the old second moment's
// scales divide by 16 exactly, so Simd::linear dequantizes it (only where Simd has one;
// S is a template parameter so that the branch is not compiled elsewhere).
template <int MODE, bool FRESH, bool LIN, class S = Simd>
void simd_block(const SimdStep& a, const SimdBlock& k0) {
  using F = typename S::F;
  using I = typename S::I;
  constexpr int H = 16 / S::W;  // vectors per iteration
  const StepConstants& c = a.c;
  const int64_t b = k0.b, e0 = k0.e0, len = k0.len, i0 = k0.i0, j0 = k0.j0;
  const F vb1 = S::set1(c.b1), vomb1 = S::set1(c.omb1);
  const F vb2 = S::set1(c.b2), vomb2 = S::set1(c.omb2);
  const F vibc2 = S::set1(c.ibc2), veps = S::set1(c.eps);
  const F vss = S::set1(c.ss), vdecay = S::set1(c.decay);
  // The first moment's map times its block scale: table[c] * scale, as element-wise.
  const typename S::Table mtab = S::table(kMaps.signed_map, FRESH ? 0.0f : a.MS.get(b));
  const typename S::Table utab = S::table(kMaps.unsigned_map, 1.0f);
  const F vro = S::set1(FRESH || MODE != 0 ? 0.0f : a.RO[i0]);
  const F virn = S::set1(MODE == 0 ? a.IRN[i0] : 0.0f);
  const F vvs = S::set1(FRESH || MODE != 1 ? 0.0f : a.VS.get(b));
  const F vro16 = S::set1(FRESH || MODE != 0 ? 0.0f : a.RO[i0] * 0.0625f);
  const F vvs16 = S::set1(FRESH || MODE != 1 ? 0.0f : a.VS.get(b) * 0.0625f);
  const float* co16b = MODE == 0 && LIN ? a.CO16 + j0 : nullptr;
  const F vrn = S::set1(MODE == 2 ? a.RN[i0] : 0.0f);
  const float* cnb = MODE == 2 ? a.CN + (i0 / a.rows_per_batch) * a.cols + j0 : nullptr;
  const float* cob = MODE == 0 ? a.CO + j0 : nullptr;
  const float* icb = MODE == 0 ? a.ICN + j0 : nullptr;
  const uint8_t* mcb = a.MC + e0 / 2;
  uint8_t* vcb = MODE != 2 ? a.VC + e0 / 2 : nullptr;
  float* Pb = a.P + e0;
  const float* Gb = a.G + e0;
  float* M = k0.M;
  float* V = k0.V;
  I mmaxv = S::zero_u32(), vmaxv = S::zero_u32();
  {
    // The hardware prefetchers fall behind on this many streams: ask for the parameter,
    // gradient and codes kPrefetch elements ahead.
    const int64_t ahead = e0 + kPrefetch;
    if (ahead + a.block <= a.n) {
      for (int64_t k = 0; k < a.block; k += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(a.P + ahead + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(a.G + ahead + k), _MM_HINT_T0);
      }
      for (int64_t k = 0; k < a.block / 2; k += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(a.MC + ahead / 2 + k), _MM_HINT_T0);
        if (MODE != 2) _mm_prefetch(reinterpret_cast<const char*>(a.VC + ahead / 2 + k), _MM_HINT_T0);
      }
    }
  }
  for (int64_t k = 0; k < len; k += 16) {
    I vcode[H];
    for (int h = 0; h < H; ++h) {
      const int64_t kk = k + S::W * h;
      const F g = S::load(Gb + kk);
      const F mo = FRESH ? S::zero() : S::lookup(mcb + kk / 2, mtab);
      const F m = S::add(S::mul(mo, vb1), S::mul(g, vomb1));
      F v;
      if (MODE == 2) {
        v = S::mul(vrn, S::load(cnb + kk));
      } else {
        F vo = S::zero();
        if constexpr (!FRESH && LIN) {
          vo = S::linear(vcb + kk / 2, MODE == 0 ? S::min(vro16, S::load(co16b + kk)) : vvs16);
        } else if constexpr (!FRESH) {
          vo = S::mul(S::lookup(vcb + kk / 2, utab), MODE == 0 ? S::min(vro, S::load(cob + kk)) : vvs);
        }
        v = S::add(S::mul(vo, vb2), S::mul(S::mul(g, g), vomb2));
      }
      const F den = S::add(S::mul(S::sqrt(v), vibc2), veps);
      const F pd = S::mul(S::load(Pb + kk), vdecay);
      S::store(Pb + kk, S::sub(pd, S::mul(S::div(m, den), vss)));
      S::store(M + kk, m);
      mmaxv = S::max_abs_bits(mmaxv, m);
      if (MODE == 0) {
        vcode[h] = S::unsigned_codes(S::mul(v, S::max(virn, S::load(icb + kk))));
      } else if (MODE == 1) {
        S::store(V + kk, v);
        vmaxv = S::max_bits(vmaxv, v);
      }
    }
    if (MODE == 0) S::pack(vcode, vcb + k / 2);  // all of the iteration's codes read first
  }
  const uint32_t mbits = S::reduce_max(mmaxv);
  float mscale;
  std::memcpy(&mscale, &mbits, sizeof(mscale));
  mscale = a.MS.put(b, std::max(mscale, 1e-12f));
  const F vinv = S::set1(1.0f / mscale);
  uint8_t* mcw = a.MC + e0 / 2;
  const typename S::SignedQ sq = a.sq;
  for (int64_t k = 0; k < len; k += 16) {
    I code[H];
    for (int h = 0; h < H; ++h) code[h] = S::signed_codes(S::mul(S::load(M + k + S::W * h), vinv), sq);
    S::pack(code, mcw + k / 2);
  }
  if (MODE == 1) {
    const uint32_t vbits = S::reduce_max(vmaxv);
    float vs;
    std::memcpy(&vs, &vbits, sizeof(vs));
    const F ivs = S::set1(inv_or_zero(a.VS.put(b, vs)));
    for (int64_t k = 0; k < len; k += 16) {
      I code[H];
      for (int h = 0; h < H; ++h) code[h] = S::unsigned_codes(S::mul(S::load(V + k + S::W * h), ivs));
      S::pack(code, vcb + k / 2);
    }
  }
}
#endif

}  // namespace

// True when every element of `t` is finite.
bool all_finite(torch::Tensor t) {
  check_f32(t, "tensor");
  const uint32_t* x = reinterpret_cast<const uint32_t*>(t.data_ptr<float>());
  const int64_t n = t.numel();
  uint32_t bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    bad |= static_cast<uint32_t>((x[e] & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

#ifdef PLASTICITY_SIMD
// What rank1_stats's vector loop reads and writes (rs and cs: the old scales, or their
// sixteenths for LIN).
struct SimdStats {
  const float* g;
  const uint8_t* vc;
  const float *rs, *cs;
  float* rm;
  int64_t rows, cols;
  float b2, omb2;
};

// This thread's share of rank1_stats (called inside the parallel region): the scalar
// loop's operations W lanes at a time, row maxima into rm, column maxima into cmax; returns
// 1 if a new second moment is not finite. Groups of kRows rows, so that each column-maximum
// vector is loaded and stored once per group. cols is a multiple of W.
template <bool FRESH, bool LIN, class S = Simd>
uint32_t simd_stats(const SimdStats& s, uint32_t* cmax) {
  using F = typename S::F;
  using I = typename S::I;
  constexpr int64_t kRows = 4;
  const int64_t rows = s.rows, cols = s.cols;
  const float* g = s.g;
  const uint8_t* vc = s.vc;
  const int64_t groups = (rows + kRows - 1) / kRows;
  const F vb2 = S::set1(s.b2), vomb2 = S::set1(s.omb2);
  const typename S::Table utab = S::table(kMaps.unsigned_map, 1.0f);
  uint32_t bad = 0;
#pragma omp for schedule(static) nowait
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t i0 = q * kRows;
    const int64_t nr = std::min(kRows, rows - i0);
    F vri[kRows];
    I rmaxv[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      vri[r] = S::set1(FRESH || r >= nr ? 0.0f : s.rs[i0 + r]);
      rmaxv[r] = S::zero_u32();
    }
    for (int64_t j = 0; j < cols; j += S::W) {
      const F csj = FRESH ? S::zero() : S::load(s.cs + j);
      uint32_t* cmj = cmax + j;
      I cmv = S::load_u32(cmj);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t e = (i0 + r) * cols + j;
        // The next group's rows, at the same column (18% faster on a 50257 x 1024 tensor
        // than a fixed distance ahead, which falls inside this group's rows).
        if ((j & 15) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(g + e + kRows * cols), _MM_HINT_T0);
        }
        if ((j & 127) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(vc + (e + kRows * cols) / 2), _MM_HINT_T0);
        }
        const F gj = S::load(g + e);
        F vo = S::zero();
        if constexpr (!FRESH && LIN) {
          vo = S::linear(vc + e / 2, S::min(vri[r], csj));
        } else if constexpr (!FRESH) {
          vo = S::mul(S::lookup(vc + e / 2, utab), S::min(vri[r], csj));
        }
        const F vn = S::add(S::mul(vo, vb2), S::mul(S::mul(gj, gj), vomb2));
        rmaxv[r] = S::max_bits(rmaxv[r], vn);
        cmv = S::max_bits(cmv, vn);
      }
      S::store_u32(cmj, cmv);
    }
    for (int64_t r = 0; r < nr; ++r) {
      const uint32_t rmax = S::reduce_max(rmaxv[r]);
      // The new second moment is >= +0 or NaN (either sign) or +inf: as unsigned bit
      // patterns, NaN and +inf are exactly those >= +inf's, so the row's maximum tells.
      bad |= static_cast<uint32_t>(rmax >= 0x7f800000u);
      std::memcpy(s.rm + i0 + r, &rmax, sizeof(rmax));
    }
  }
  return bad;
}
#endif

// Pass 1 of a rank-1 step: the row and column maxima of the NEW second moment, without
// writing it, and whether it is finite. `grad` is viewed as (rows x cols).
std::vector<torch::Tensor> rank1_stats(torch::Tensor grad, torch::Tensor v_codes,
                                       torch::Tensor row_scale, torch::Tensor col_scale,
                                       int64_t cols, bool fresh, double beta2) {
  check_f32(grad, "grad");
  check_u8(v_codes, "v_codes");
  check_f32(row_scale, "row_scale");
  check_f32(col_scale, "col_scale");
  const int64_t n = grad.numel();
  const int64_t rows = n / cols;
  TORCH_CHECK(rows * cols == n, "rank1_stats: cols does not divide numel");
  const float b2 = static_cast<float>(beta2);
  const float omb2 = static_cast<float>(1.0 - beta2);
  const float* g = grad.data_ptr<float>();
  const uint8_t* vc = v_codes.data_ptr<uint8_t>();
  const float* rs = row_scale.data_ptr<float>();
  const float* cs = col_scale.data_ptr<float>();
  auto row_max = torch::empty({rows}, grad.options());
  auto col_max = torch::zeros({cols}, grad.options());
  float* rm = row_max.data_ptr<float>();
  float* cm = col_max.data_ptr<float>();
  uint32_t bad = 0;
#ifdef PLASTICITY_SIMD
  if (cols % Simd::W == 0) {
    // Vectorized (simd_stats); with Simd::linear where it pays and the old scales allow
    // (both scale vectors then hold sixteenths).
    const bool lin = Simd::kLinear && !fresh && sixteenths_exact(rs, rows) && sixteenths_exact(cs, cols);
    const std::vector<float> rs16 = lin ? sixteenths(rs, rows) : std::vector<float>();
    const std::vector<float> cs16 = lin ? sixteenths(cs, cols) : std::vector<float>();
    const SimdStats st{g, vc, lin ? rs16.data() : rs, lin ? cs16.data() : cs, rm, rows, cols, b2, omb2};
#pragma omp parallel reduction(| : bad)
    {
      std::vector<uint32_t> cmax(cols, 0u);
      if (fresh) bad |= simd_stats<true, false>(st, cmax.data());
      else if (lin) bad |= simd_stats<false, Simd::kLinear>(st, cmax.data());
      else bad |= simd_stats<false, false>(st, cmax.data());
#pragma omp critical
      merge_col_max(cm, cmax);
    }
    auto finite = torch::full({1}, bad == 0 ? 1 : 0, torch::dtype(torch::kInt32));
    return {row_max, col_max, finite};
  }
#endif
#pragma omp parallel reduction(| : bad)
  {
    // Non-negative floats order like their bit patterns: integer maxima vectorize.
    std::vector<uint32_t> cmax(cols, 0u);
    std::vector<float> vnew(cols);
    std::vector<uint8_t> cv(cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t e0 = i * cols;
      const float* gi = g + e0;
      if (fresh) {
        for (int64_t j = 0; j < cols; ++j) {
          const float gj = gi[j];
          vnew[j] = 0.0f * b2 + (gj * gj) * omb2;
        }
      } else {
        if ((e0 & 1) == 0) {
          const uint8_t* vb = vc + e0 / 2;
          const int64_t pairs = cols / 2;
          for (int64_t q = 0; q < pairs; ++q) {
            const uint8_t byte = vb[q];
            cv[2 * q] = byte & 15;
            cv[2 * q + 1] = byte >> 4;
          }
          if (cols & 1) cv[cols - 1] = vb[pairs] & 15;
        } else {
          for (int64_t j = 0; j < cols; ++j) cv[j] = nibble(vc, e0 + j);
        }
        const float ri = rs[i];
        for (int64_t j = 0; j < cols; ++j) {
          const float s = std::min(ri, cs[j]);
          const float vo = ((static_cast<float>(cv[j]) + 1.0f) * 0.0625f) * s;
          const float gj = gi[j];
          vnew[j] = vo * b2 + (gj * gj) * omb2;
        }
      }
      uint32_t rmax = 0u, rbad = 0u;
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t u = bits(vnew[j]);
        rbad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
        rmax = std::max(rmax, u);
        cmax[j] = std::max(cmax[j], u);
      }
      bad |= rbad;
      float r;
      std::memcpy(&r, &rmax, sizeof(r));
      rm[i] = r;
    }
#pragma omp critical
    merge_col_max(cm, cmax);
  }
  auto finite = torch::full({1}, bad == 0 ? 1 : 0, torch::dtype(torch::kInt32));
  return {row_max, col_max, finite};
}

// Pass 2: dequantize, update and requantize both moments, and update the parameter, one
// block of the first moment at a time. Scales of the second moment: mode 0 reads the old
// (row_old, col_old) and new (row_new, col_new) rank-1 scale vectors; mode 1 reads and
// rewrites v_scale per block; mode 2 takes v from (row_new, col_new) factors.
void fused_step(torch::Tensor param, torch::Tensor grad, torch::Tensor m_codes,
                torch::Tensor m_scale, torch::Tensor v_codes, torch::Tensor v_scale,
                torch::Tensor row_old, torch::Tensor col_old, torch::Tensor row_new,
                torch::Tensor col_new, int64_t mode, int64_t cols, int64_t rows_per_batch,
                bool fresh, double decay, double beta1, double beta2, double inv_bc2_sqrt,
                double eps, double step_size, int64_t block) {
  check_f32(param, "param");
  check_f32(grad, "grad");
  check_u8(m_codes, "m_codes");
  check_scales(m_scale, "m_scale");
  check_f32(row_new, "row_new");
  check_f32(col_new, "col_new");
  TORCH_CHECK(block > 0 && block % 2 == 0, "block must be even");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2");
  if (mode != 2) check_u8(v_codes, "v_codes");
  if (mode == 1) check_scales(v_scale, "v_scale");
  if (mode == 0) {
    check_f32(row_old, "row_old");
    check_f32(col_old, "col_old");
  }
  const int64_t n = param.numel();
  const int64_t nb = (n + block - 1) / block;
  const StepConstants c(decay, beta1, beta2, inv_bc2_sqrt, eps, step_size);
  float* P = param.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  uint8_t* MC = m_codes.data_ptr<uint8_t>();
  Scales MS(m_scale);
  uint8_t* VC = mode != 2 ? v_codes.data_ptr<uint8_t>() : nullptr;
  Scales VS(mode == 1 ? v_scale : m_scale);  // (unused unless mode 1)
  const float* RO = mode == 0 ? row_old.data_ptr<float>() : nullptr;
  const float* CO = mode == 0 ? col_old.data_ptr<float>() : nullptr;
  const float* RN = row_new.data_ptr<float>();
  const float* CN = col_new.data_ptr<float>();
  const float* smap = kMaps.signed_map;
  const float* smid = kMaps.signed_mid;
  // Inverse rank-1 scales: 1 / min(r, c) == max(1 / r, 1 / c) exactly (rounding is
  // monotone), so the quantizer multiplies by max(IRN[i], ICN[j]).
  std::vector<float> irn_v, icn_v;
  if (mode == 0) {
    irn_v.resize(row_new.numel());
    icn_v.resize(col_new.numel());
    for (size_t i = 0; i < irn_v.size(); ++i) irn_v[i] = inv_or_zero(RN[i]);
    for (size_t j = 0; j < icn_v.size(); ++j) icn_v[j] = inv_or_zero(CN[j]);
  }
  const float* IRN = irn_v.data();
  const float* ICN = icn_v.data();
#ifdef PLASTICITY_SIMD
  // Rank-1: Simd::linear for the whole tensor where it pays and every old scale divides by
  // 16 exactly.
  const bool lin0 = Simd::kLinear && mode == 0 && !fresh && sixteenths_exact(RO, row_old.numel()) &&
                    sixteenths_exact(CO, col_old.numel());
  const std::vector<float> co16_v = lin0 ? sixteenths(CO, col_old.numel()) : std::vector<float>();
  const SimdStep st{P, G, MC, MS, VC, VS, RO, CO, RN, CN, IRN, ICN, co16_v.data(), c, cols, rows_per_batch, n,
                    block, Simd::SignedQ(smid)};
#endif

#pragma omp parallel
  {
    std::vector<uint8_t> cm(block), cv(block);
    std::vector<float> mo(block), vo(block), so(block), sn(block), M(block), V(block);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t e0 = b * block;
      const int64_t len = std::min(block, n - e0);
      const int64_t nbytes = (len + 1) / 2;
      const uint8_t* mcb = MC + e0 / 2;
      const int64_t i0 = (mode == 1) ? 0 : e0 / cols, j0 = (mode == 1) ? 0 : e0 - i0 * cols;
      // Rank-1 block inside one row (the common case): one fused loop below.
      const bool fast = mode == 0 && j0 + len <= cols;
#ifdef PLASTICITY_SIMD
      if ((fast || mode == 1 || (mode == 2 && j0 + len <= cols)) && (len & 15) == 0) {
        const SimdBlock blk{b, e0, len, i0, j0, M.data(), V.data()};
        if (fresh) {
          if (mode == 0) simd_block<0, true, false>(st, blk);
          else if (mode == 1) simd_block<1, true, false>(st, blk);
          else simd_block<2, true, false>(st, blk);
        } else {
          if (mode == 0 && lin0) simd_block<0, false, Simd::kLinear>(st, blk);
          else if (mode == 0) simd_block<0, false, false>(st, blk);
          else if (mode == 1 && Simd::kLinear && sixteenth_exact(VS.get(b))) simd_block<1, false, Simd::kLinear>(st, blk);
          else if (mode == 1) simd_block<1, false, false>(st, blk);
          else simd_block<2, false, false>(st, blk);
        }
        continue;
      }
#endif
      // Scales of the second moment for this block (modes 0 and 2).
      if ((mode == 0 && !fast) || mode == 2) {
        if (j0 + len <= cols) {  // the block lies inside one row
          if (mode == 0) {
            const float ro = RO[i0], irn = IRN[i0];
            for (int64_t k = 0; k < len; ++k) {
              so[k] = std::min(ro, CO[j0 + k]);
              sn[k] = std::max(irn, ICN[j0 + k]);
            }
          } else {
            const float rn = RN[i0];
            const float* cb = CN + (i0 / rows_per_batch) * cols + j0;
            for (int64_t k = 0; k < len; ++k) V[k] = rn * cb[k];
          }
        } else {
          for (int64_t k = 0; k < len; ++k) {
            const int64_t i = (e0 + k) / cols, j = (e0 + k) - i * cols;
            if (mode == 0) {
              so[k] = std::min(RO[i], CO[j]);
              sn[k] = std::max(IRN[i], ICN[j]);
            } else {
              V[k] = RN[i] * CN[(i / rows_per_batch) * cols + j];
            }
          }
        }
      }
      // Old moments (exactly zero on the first step).
      if (fresh) {
        for (int64_t k = 0; k < len; ++k) {
          mo[k] = 0.0f;
          vo[k] = 0.0f;
        }
      } else if (fast) {
        for (int64_t q = 0; q < nbytes; ++q) {
          const uint8_t byte = mcb[q];
          cm[2 * q] = byte & 15;
          cm[2 * q + 1] = byte >> 4;
        }
        lookup16(cm.data(), smap, MS.get(b), mo.data(), len);
        const uint8_t* vcb = VC + e0 / 2;
        for (int64_t q = 0; q < nbytes; ++q) {
          const uint8_t byte = vcb[q];
          cv[2 * q] = byte & 15;
          cv[2 * q + 1] = byte >> 4;
        }
        for (int64_t k = 0; k < len; ++k) vo[k] = (static_cast<float>(cv[k]) + 1.0f) * 0.0625f;
      } else {
        for (int64_t q = 0; q < nbytes; ++q) {
          const uint8_t byte = mcb[q];
          cm[2 * q] = byte & 15;
          cm[2 * q + 1] = byte >> 4;
        }
        const float ms = MS.get(b);
        lookup16(cm.data(), smap, ms, mo.data(), len);
        if (mode != 2) {
          const uint8_t* vcb = VC + e0 / 2;
          for (int64_t q = 0; q < nbytes; ++q) {
            const uint8_t byte = vcb[q];
            cv[2 * q] = byte & 15;
            cv[2 * q + 1] = byte >> 4;
          }
          if (mode == 0) {
            for (int64_t k = 0; k < len; ++k) {
              vo[k] = ((static_cast<float>(cv[k]) + 1.0f) * 0.0625f) * so[k];
            }
          } else {
            const float vs = VS.get(b);
            for (int64_t k = 0; k < len; ++k) {
              vo[k] = ((static_cast<float>(cv[k]) + 1.0f) * 0.0625f) * vs;
            }
          }
        }
      }
      // The update.
      float* Pb = P + e0;
      const float* Gb = G + e0;
      uint32_t mmax = 0u, vmax = 0u;
      if (fast) {
        // Dequantize v, update, and quantize v with its (already known) new scale.
        const float ro = fresh ? 0.0f : RO[i0], irn = IRN[i0];
        const float* cob = CO + j0;
        const float* icb = ICN + j0;
        for (int64_t k = 0; k < len; ++k) {
          const float g = Gb[k];
          const float m = c.m_new(mo[k], g);
          const float vold = vo[k] * std::min(ro, cob[k]);  // vo: the map's value (0 if fresh)
          const float v = c.v_new(vold, g);
          Pb[k] = c.p_new(Pb[k], m, v);
          M[k] = m;
          mmax = std::max(mmax, bits(m) & 0x7fffffffu);
          V[k] = v * std::max(irn, icb[k]);  // quantized below (a float-only loop vectorizes)
        }
      } else if (mode == 2) {
        for (int64_t k = 0; k < len; ++k) {
          const float m = c.m_new(mo[k], Gb[k]);
          Pb[k] = c.p_new(Pb[k], m, V[k]);
          M[k] = m;
          mmax = std::max(mmax, bits(m) & 0x7fffffffu);
        }
      } else {
        for (int64_t k = 0; k < len; ++k) {
          const float g = Gb[k];
          const float m = c.m_new(mo[k], g);
          const float v = c.v_new(vo[k], g);
          Pb[k] = c.p_new(Pb[k], m, v);
          M[k] = m;
          V[k] = v;
          mmax = std::max(mmax, bits(m) & 0x7fffffffu);
          vmax = std::max(vmax, bits(v));
        }
      }
      // Requantize the first moment with a fresh block scale.
      float mscale;
      std::memcpy(&mscale, &mmax, sizeof(mscale));
      mscale = MS.put(b, std::max(mscale, 1e-12f));
      const float inv_ms = 1.0f / mscale;
      quantize_signed(M.data(), inv_ms, smid, cm.data(), len);
      if (len & 1) cm[len] = 0;
      uint8_t* mcw = MC + e0 / 2;
      for (int64_t q = 0; q < nbytes; ++q) mcw[q] = cm[2 * q] | (cm[2 * q + 1] << 4);
      if (mode == 2) continue;
      if (fast) {
        for (int64_t k = 0; k < len; ++k) cv[k] = unsigned_code(V[k]);
        if (len & 1) cv[len] = 0;
        uint8_t* vcw = VC + e0 / 2;
        for (int64_t q = 0; q < nbytes; ++q) vcw[q] = cv[2 * q] | (cv[2 * q + 1] << 4);
        continue;
      }
      // Requantize the second moment.
      if (mode == 1) {
        float vs;
        std::memcpy(&vs, &vmax, sizeof(vs));
        const float ivs = inv_or_zero(VS.put(b, vs));
        for (int64_t k = 0; k < len; ++k) sn[k] = ivs;
      }
      for (int64_t k = 0; k < len; ++k) {
        const float x = V[k] * sn[k];
        cv[k] = unsigned_code(x);
      }
      if (len & 1) cv[len] = 0;
      uint8_t* vcw = VC + e0 / 2;
      for (int64_t q = 0; q < nbytes; ++q) vcw[q] = cv[2 * q] | (cv[2 * q + 1] << 4);
    }
  }
}

// One AdamW step with fp32 moments (tensors too small to quantize), the same operations
// as plasticity.optim._numerics._update_fp32, in the same order.
void fp32_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg,
               torch::Tensor exp_avg_sq, double decay, double beta1, double beta2,
               double inv_bc2_sqrt, double eps, double step_size) {
  check_f32(param, "param");
  check_f32(grad, "grad");
  check_f32(exp_avg, "exp_avg");
  check_f32(exp_avg_sq, "exp_avg_sq");
  const int64_t n = param.numel();
  TORCH_CHECK(grad.numel() == n && exp_avg.numel() == n && exp_avg_sq.numel() == n,
              "fp32_step: sizes differ");
  const StepConstants c(decay, beta1, beta2, inv_bc2_sqrt, eps, step_size);
  float* P = param.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
#pragma omp parallel for schedule(static) if (n > (1 << 18))
  for (int64_t e = 0; e < n; ++e) {
    const float g = G[e];
    const float m = c.m_new(M[e], g);
    const float v = c.v_new(V[e], g);
    P[e] = c.p_new(P[e], m, v);
    M[e] = m;
    V[e] = v;
  }
}

// ------------------------------------------------------------------ many tensors per call
// The functions above for a list of tensors each (argument k of call i is element i of
// list k), one after another: a step makes one call from Python per pass instead of one per
// tensor, so the interpreter does not run between the kernels (it runs slowly there, with
// the caches full of the last tensor's data).

void check_counts(size_t n, std::initializer_list<size_t> sizes, const char* fn) {
  for (size_t s : sizes) TORCH_CHECK(s == n, fn, ": argument lists differ in length");
}

std::vector<bool> all_finite_many(const std::vector<torch::Tensor>& ts) {
  std::vector<bool> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = all_finite(ts[i]);
  return out;
}

// {row_max, col_max} of each tensor, and whether each is finite.
std::tuple<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<bool>> rank1_stats_many(
    const std::vector<torch::Tensor>& grad, const std::vector<torch::Tensor>& v_codes,
    const std::vector<torch::Tensor>& row_scale, const std::vector<torch::Tensor>& col_scale,
    const std::vector<int64_t>& cols, const std::vector<bool>& fresh, const std::vector<double>& beta2) {
  const size_t n = grad.size();
  check_counts(n, {v_codes.size(), row_scale.size(), col_scale.size(), cols.size(), fresh.size(),
                   beta2.size()}, "rank1_stats_many");
  std::vector<torch::Tensor> row_max(n), col_max(n);
  std::vector<bool> finite(n);
  for (size_t i = 0; i < n; ++i) {
    auto r = rank1_stats(grad[i], v_codes[i], row_scale[i], col_scale[i], cols[i], fresh[i], beta2[i]);
    row_max[i] = r[0];
    col_max[i] = r[1];
    finite[i] = r[2].item<int32_t>() != 0;
  }
  return {row_max, col_max, finite};
}

using Tensors = std::vector<torch::Tensor>;
using Ints = std::vector<int64_t>;
using Doubles = std::vector<double>;

void fused_step_many(const Tensors& param, const Tensors& grad, const Tensors& m_codes,
                     const Tensors& m_scale, const Tensors& v_codes, const Tensors& v_scale,
                     const Tensors& row_old, const Tensors& col_old, const Tensors& row_new,
                     const Tensors& col_new, const Ints& mode, const Ints& cols,
                     const Ints& rows_per_batch, const std::vector<bool>& fresh, const Doubles& decay,
                     const Doubles& beta1, const Doubles& beta2, const Doubles& inv_bc2_sqrt,
                     const Doubles& eps, const Doubles& step_size, const Ints& block) {
  const size_t n = param.size();
  check_counts(n, {grad.size(), m_codes.size(), m_scale.size(), v_codes.size(), v_scale.size(),
                   row_old.size(), col_old.size(), row_new.size(), col_new.size(), mode.size(),
                   cols.size(), rows_per_batch.size(), fresh.size(), decay.size(), beta1.size(),
                   beta2.size(), inv_bc2_sqrt.size(), eps.size(), step_size.size(), block.size()},
               "fused_step_many");
  for (size_t i = 0; i < n; ++i) {
    fused_step(param[i], grad[i], m_codes[i], m_scale[i], v_codes[i], v_scale[i], row_old[i],
               col_old[i], row_new[i], col_new[i], mode[i], cols[i], rows_per_batch[i], fresh[i],
               decay[i], beta1[i], beta2[i], inv_bc2_sqrt[i], eps[i], step_size[i], block[i]);
  }
}

void fp32_step_many(const Tensors& param, const Tensors& grad, const Tensors& exp_avg,
                    const Tensors& exp_avg_sq, const Doubles& decay, const Doubles& beta1,
                    const Doubles& beta2, const Doubles& inv_bc2_sqrt, const Doubles& eps,
                    const Doubles& step_size) {
  const size_t n = param.size();
  check_counts(n, {grad.size(), exp_avg.size(), exp_avg_sq.size(), decay.size(), beta1.size(),
                   beta2.size(), inv_bc2_sqrt.size(), eps.size(), step_size.size()},
               "fp32_step_many");
  for (size_t i = 0; i < n; ++i) {
    fp32_step(param[i], grad[i], exp_avg[i], exp_avg_sq[i], decay[i], beta1[i], beta2[i],
              inv_bc2_sqrt[i], eps[i], step_size[i]);
  }
}

// ------------------------------------------------------------------ factor statistics
// Sums of g^2 along each row and each column of every (rows x cols) slice, each as the
// pairwise tree that plasticity.optim._numerics._pair_sums spells out in PyTorch
// operations: adjacent pairs added, an odd last element carried up unchanged, until one
// value is left (the same as a perfect tree over the length rounded up to a power of two,
// padded with zeros, since every operand is >= +0). Same order, same bits.

// Gradients read this many elements ahead (a prefetch per 64-byte line).
constexpr int64_t kFactorPrefetch = 2048;

// out[j] = x[2j] + x[2j + 1] for j < n / 2, then x[n - 1] if n is odd: one level of the
// tree, in place allowed (out == x); returns the new length.
inline int64_t pair_level(const float* x, float* out, int64_t n) {
  const int64_t h = n / 2;
  int64_t j = 0;
#ifdef PLASTICITY_AVX2
  for (; j + 8 <= h; j += 8) {
    const __m256 a = _mm256_loadu_ps(x + 2 * j), b = _mm256_loadu_ps(x + 2 * j + 8);
    // hadd pairs within 128-bit halves: a0+a1 a2+a3 b0+b1 b2+b3 | a4+a5 a6+a7 b4+b5 b6+b7.
    const __m256 s = _mm256_hadd_ps(a, b);
    _mm256_storeu_ps(out + j, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xd8)));
  }
#elif defined(PLASTICITY_AVX512)
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (; j + 16 <= h; j += 16) {
    const __m512 a = _mm512_loadu_ps(x + 2 * j), b = _mm512_loadu_ps(x + 2 * j + 16);
    _mm512_storeu_ps(out + j, _mm512_add_ps(_mm512_permutex2var_ps(a, ev, b),
                                            _mm512_permutex2var_ps(a, od, b)));
  }
#endif
  for (; j < h; ++j) out[j] = x[2 * j] + x[2 * j + 1];
  if (n & 1) out[h] = x[n - 1];
  return h + (n & 1);
}

// a[j] += b[j]: a node of the column tree from its two children (a the earlier rows').
inline void add_into(float* a, const float* b, int64_t n) {
  int64_t j = 0;
#ifdef PLASTICITY_SIMD
  for (; j + Simd::W <= n; j += Simd::W) Simd::store(a + j, Simd::add(Simd::load(a + j), Simd::load(b + j)));
#endif
  for (; j < n; ++j) a[j] = a[j] + b[j];
}

// Rows [r0, r1) of one slice: their row sums into row_sum[r0..r1), and the root of their
// column tree (a subtree of the slice's when r0 is a multiple of a power of two >= r1 - r0)
// into root. A stack of partial column sums, one per level, as a binary counter.
void factor_rows(const float* g, int64_t r0, int64_t r1, int64_t cols, float* row_sum,
                 float* root) {
  std::vector<std::vector<float>> level;  // level[k]: the sum of 2^k rows, if filled
  std::vector<bool> filled;
  std::vector<float> carry(cols), half((cols + 1) / 2);
  for (int64_t i = r0; i < r1; ++i) {
    const float* gi = g + i * cols;
    int64_t j = 0;
#ifdef PLASTICITY_SIMD
    for (; j + 16 <= cols; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(gi + j + kFactorPrefetch), _MM_HINT_T0);
      for (int h = 0; h < 16; h += Simd::W) {
        const Simd::F x = Simd::load(gi + j + h);
        Simd::store(carry.data() + j + h, Simd::mul(x, x));
      }
    }
#endif
    for (; j < cols; ++j) carry[j] = gi[j] * gi[j];
    // The row's tree.
    if (cols == 1) {
      row_sum[i] = carry[0];
    } else {
      int64_t n = pair_level(carry.data(), half.data(), cols);
      while (n > 1) n = pair_level(half.data(), half.data(), n);
      row_sum[i] = half[0];
    }
    // The column tree: merge equal levels, earlier rows on the left.
    size_t k = 0;
    for (; k < filled.size() && filled[k]; ++k) {
      add_into(level[k].data(), carry.data(), cols);
      std::swap(level[k], carry);
      filled[k] = false;
    }
    if (k == filled.size()) {
      level.emplace_back();
      filled.push_back(false);
    }
    if (level[k].size() != static_cast<size_t>(cols)) level[k].resize(cols);
    std::swap(level[k], carry);
    filled[k] = true;
    if (carry.size() != static_cast<size_t>(cols)) carry.resize(cols);
  }
  // What is left, from the lowest level up: a missing right subtree is zeros.
  bool have = false;
  for (size_t k = 0; k < filled.size(); ++k) {
    if (!filled[k]) continue;
    if (!have) {
      std::copy(level[k].begin(), level[k].end(), root);
      have = true;
    } else {
      // root = level[k] + root: level[k] holds the earlier rows.
      add_into(level[k].data(), root, cols);
      std::copy(level[k].begin(), level[k].end(), root);
    }
  }
  if (!have) std::fill(root, root + cols, 0.0f);
}

// Row and column sums of g^2 over each of the batch = numel / (rows * cols) slices:
// {row_sum (batch x rows), col_sum (batch x cols)}. The rows of a slice are split into
// aligned power-of-two ranges (subtrees of the column tree) that the threads share, and
// the ranges' roots are then combined as the tree's top levels.
std::vector<torch::Tensor> factor_stats(torch::Tensor grad, int64_t rows, int64_t cols) {
  check_f32(grad, "grad");
  TORCH_CHECK(rows > 0 && cols > 0 && grad.numel() % (rows * cols) == 0,
              "factor_stats: rows * cols does not divide numel");
  const int64_t batch = grad.numel() / (rows * cols);
  auto row_sum = torch::empty({batch, rows}, grad.options());
  auto col_sum = torch::empty({batch, cols}, grad.options());
  const float* g = grad.data_ptr<float>();
  float* rs = row_sum.data_ptr<float>();
  float* cs = col_sum.data_ptr<float>();
  // Rows per range: a power of two (the sums do not depend on it), small enough for four
  // ranges per thread, handed out one at a time (aligned ranges rarely split the rows
  // evenly: 50257 rows in two ranges would be 32768 and 17489), and at least 16 rows.
  int64_t span = 1;
  while (span < rows) span <<= 1;
  const int64_t threads = std::max(1, omp_get_max_threads());
  while (span > 16 && (rows + span - 1) / span < 4 * threads) span >>= 1;
  const int64_t ranges = (rows + span - 1) / span;
  std::vector<float> roots(ranges * cols);
  for (int64_t b = 0; b < batch; ++b) {
    const float* gb = g + b * rows * cols;
#pragma omp parallel for schedule(dynamic, 1) if (ranges > 1)
    for (int64_t t = 0; t < ranges; ++t) {
      factor_rows(gb, t * span, std::min(rows, (t + 1) * span), cols, rs + b * rows,
                  roots.data() + t * cols);
    }
    // The ranges' roots are the leaves of the top of the tree.
    int64_t n = ranges;
    while (n > 1) {
      const int64_t h = n / 2;
      for (int64_t k = 0; k < h; ++k) {
        float* dst = roots.data() + k * cols;
        add_into(roots.data() + 2 * k * cols, roots.data() + (2 * k + 1) * cols, cols);
        if (k > 0) std::copy(roots.data() + 2 * k * cols, roots.data() + (2 * k + 1) * cols, dst);
      }
      if (n & 1) std::copy(roots.data() + (n - 1) * cols, roots.data() + n * cols, roots.data() + h * cols);
      n = h + (n & 1);
    }
    std::copy(roots.data(), roots.data() + cols, cs + b * cols);
  }
  return {row_sum, col_sum};
}

// factor_stats of each tensor (see "many tensors per call"): {row sums, column sums}.
std::tuple<Tensors, Tensors> factor_stats_many(const Tensors& grad, const Ints& rows, const Ints& cols) {
  const size_t n = grad.size();
  check_counts(n, {rows.size(), cols.size()}, "factor_stats_many");
  Tensors row_sum(n), col_sum(n);
  for (size_t i = 0; i < n; ++i) {
    auto r = factor_stats(grad[i], rows[i], cols[i]);
    row_sum[i] = r[0];
    col_sum[i] = r[1];
  }
  return {row_sum, col_sum};
}

// Codes of the signed (first-moment) or linear (second-moment) map for values already
// multiplied by their inverse scale, computed by the vector code the passes use where the
// CPU has it (the scalar loops for the rest): lets tests check the quantizers on values
// chosen to sit on and next to every decision boundary.
torch::Tensor quantize_codes(torch::Tensor x, bool is_signed) {
  check_f32(x, "x");
  const int64_t n = x.numel();
  auto out = torch::empty({n}, torch::dtype(torch::kUInt8));
  const float* X = x.data_ptr<float>();
  uint8_t* O = out.data_ptr<uint8_t>();
  int64_t k = 0;
#ifdef PLASTICITY_SIMD
  // Through the quantizers and the packing the passes use.
  const Simd::SignedQ sq(kMaps.signed_mid);
  for (; k + 16 <= n; k += 16) {
    Simd::I c[16 / Simd::W];
    for (int h = 0; h < 16 / Simd::W; ++h) {
      const Simd::F v = Simd::load(X + k + Simd::W * h);
      c[h] = is_signed ? Simd::signed_codes(v, sq) : Simd::unsigned_codes(v);
    }
    uint8_t packed[8];
    Simd::pack(c, packed);
    for (int q = 0; q < 8; ++q) {
      O[k + 2 * q] = packed[q] & 15;
      O[k + 2 * q + 1] = packed[q] >> 4;
    }
  }
#endif
  if (is_signed) {
    quantize_signed(X + k, 1.0f, kMaps.signed_mid, O + k, n - k);
  } else {
    for (; k < n; ++k) O[k] = unsigned_code(X[k]);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_codes", &quantize_codes, "signed or linear-map codes of scaled values");
  m.def("fp32_step", &fp32_step, "one AdamW step with fp32 moments");
  m.def("all_finite", &all_finite, "whether every element of a float32 tensor is finite");
  m.def("rank1_stats", &rank1_stats, "row/column maxima of the new second moment");
  m.def("fused_step", &fused_step, "one fused 4-bit AdamW step for one tensor");
  m.def("factor_stats", &factor_stats, "row and column sums of g^2, as pairwise trees");
  m.def("all_finite_many", &all_finite_many, "all_finite of each tensor");
  m.def("rank1_stats_many", &rank1_stats_many, "rank1_stats of each tensor");
  m.def("fused_step_many", &fused_step_many, "fused_step of each tensor");
  m.def("fp32_step_many", &fp32_step_many, "fp32_step of each tensor");
  m.def("factor_stats_many", &factor_stats_many, "factor_stats of each tensor");
}
