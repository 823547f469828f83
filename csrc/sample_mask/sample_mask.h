// Host+device logic of tcm::sample_mask: the per-patch random keys and the
// stratum budgets. Every back end (CPU here, CUDA in sample_mask_cuda.cu, and the
// Triton kernel in tcm_kernels/triton/sample_mask.py, which mirrors this file)
// builds the same 64-bit key for each patch, then masks the M patches with the
// smallest (key, patch index). Equal keys => equal masks, bit for bit.
//
// Recipe (also in the docstring of tcm_kernels.sample_mask):
//   words  = Philox4x32-10(counter = (patch, row, offset_lo, offset_hi),
//                          key     = (seed_lo, seed_hi))
//   uniform, stratified, hardest (random part): key = words[0]
//   weighted: u = (2 * (words[0] >> 9) + 1) * 2^-24        (exact, in (0, 1))
//             E = -log_portable(u)                          (Exp(1) variate)
//             f = log_portable(E) - log_portable(score) * (1 / temperature)
//                 (+inf when score == 0)
//             key = ordered_bits(f) << 32 | words[1]
//   hardest (score part): key = ~ordered_bits(score): higher score first.
// The M smallest exponential keys E_i / w_i are Efraimidis–Spirakis successive
// sampling without replacement with probability proportional to w_i; taking logs
// keeps the order and lets temperature enter as a multiply.
#pragma once

#include "../common/host_device.h"
#include "../common/philox.h"

namespace tcm {
namespace sample_mask {

enum Strategy : int { kUniform = 0, kWeighted = 1, kStratified = 2, kHardest = 3 };

TCM_HOST_DEVICE Philox4 patch_words(uint64_t seed, uint64_t offset, uint32_t row, uint32_t patch) {
  return philox4x32_10(patch, row, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Maps a float to an unsigned integer with the same order (-0.0 == +0.0).
// Written with selects, not branches, here and below, so that the CPU loops vectorise.
TCM_HOST_DEVICE uint32_t ordered_bits(float f) {
  uint32_t b = float_as_uint(f);
  b = b == 0x80000000u ? 0u : b;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Natural log from correctly rounded +, -, *, / only, so that every back end
// returns the same bits (libm/libdevice logs differ in the last ulp).
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(z), z = (m-1)/(m+1),
// |z| <= 0.1716, series to z^11: truncation error < 1e-10, below fp32 rounding.
// Requires x > 0 and finite.
TCM_HOST_DEVICE float log_portable(float x) {
  const bool subnormal = (float_as_uint(x) >> 23) == 0u;  // scale into the normal range exactly
  x = subnormal ? fmul_rn(x, 8388608.0f) : x;             // 2^23
  const uint32_t bits = float_as_uint(x);
  const float m0 = uint_as_float((bits & 0x007FFFFFu) | 0x3F800000u);
  const bool fold = m0 > 1.41421353816986083984375f;  // float32(sqrt 2)
  const float m = fold ? fmul_rn(m0, 0.5f) : m0;
  const int e = static_cast<int>(bits >> 23) - 127 + (fold ? 1 : 0) - (subnormal ? 23 : 0);
  const float z = fdiv_rn(fsub_rn(m, 1.0f), fadd_rn(m, 1.0f));
  const float w = fmul_rn(z, z);
  float p = 0.0909090936183929443359375f;                       // float32(1/11)
  p = fadd_rn(fmul_rn(p, w), 0.111111111938953399658203125f);   // 1/9
  p = fadd_rn(fmul_rn(p, w), 0.14285714924335479736328125f);    // 1/7
  p = fadd_rn(fmul_rn(p, w), 0.2000000029802322387695312f);     // 1/5
  p = fadd_rn(fmul_rn(p, w), 0.3333333432674407958984375f);     // 1/3
  p = fadd_rn(fmul_rn(p, w), 1.0f);
  const float log_m = fmul_rn(fmul_rn(2.0f, z), p);
  return fadd_rn(fmul_rn(static_cast<float>(e), 0.693147182464599609375f), log_m);  // float32(ln 2)
}

TCM_HOST_DEVICE float uniform_open(uint32_t word) {
  return fmul_rn(static_cast<float>(2u * (word >> 9) + 1u), 5.9604644775390625e-08f);  // 2^-24
}

// Key of the weighted strategy (see the recipe above). inv_temperature = fp32(1/T).
TCM_HOST_DEVICE uint64_t weighted_key(float score, float inv_temperature, const Philox4& w) {
  const bool positive = score > 0.0f;
  const float expo = -log_portable(uniform_open(w.x[0]));
  const float f = fsub_rn(log_portable(expo), fmul_rn(log_portable(positive ? score : 1.0f), inv_temperature));
  // zero-score patches: above +inf, so they go last, in random order (low word)
  const uint32_t hi = positive ? ordered_bits(f) : 0xFFFFFFFFu;
  return (static_cast<uint64_t>(hi) << 32) | w.x[1];
}

TCM_HOST_DEVICE uint64_t hardest_score_key(float score) { return static_cast<uint64_t>(~ordered_bits(score)); }

// round(x) with ties away from zero for x >= 0, in double on every back end.
TCM_HOST_DEVICE int64_t round_half_up(double x) { return static_cast<int64_t>(x + 0.5); }

TCM_HOST_DEVICE int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Number of ROI patches to mask in a row with n_roi ROI patches out of n, when
// num_masked patches are masked in total: round(roi_mask_ratio * n_roi), moved
// just enough to fit when one stratum cannot hold its share.
TCM_HOST_DEVICE int64_t stratified_roi_budget(int64_t n, int64_t n_roi, int64_t num_masked, double roi_mask_ratio) {
  const int64_t n_bg = n - n_roi;
  const int64_t lo = num_masked - n_bg > 0 ? num_masked - n_bg : 0;
  const int64_t hi = num_masked < n_roi ? num_masked : n_roi;
  return clamp64(round_half_up(roi_mask_ratio * static_cast<double>(n_roi)), lo, hi);
}

TCM_HOST_DEVICE int64_t hardest_budget(int64_t num_masked, double hard_fraction) {
  return clamp64(round_half_up(hard_fraction * static_cast<double>(num_masked)), 0, num_masked);
}

}  // namespace sample_mask
}  // namespace tcm
