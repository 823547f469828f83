// Macros shared by every op header: code between host and device compilers.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TCM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TCM_HOST_DEVICE inline
#endif

#include <cstdint>
#include <cstring>

namespace tcm {

// IEEE single-precision arithmetic that no compiler may contract into an FMA.
// Bit-identical results across CPU, CUDA and Triton depend on every rounding
// happening at the same place, so the RNG-derived keys use these instead of
// bare operators. (Host code is additionally compiled with -ffp-contract=off.)
TCM_HOST_DEVICE float fmul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TCM_HOST_DEVICE float fadd_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TCM_HOST_DEVICE float fsub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
TCM_HOST_DEVICE float fdiv_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

TCM_HOST_DEVICE uint32_t float_as_uint(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
TCM_HOST_DEVICE float uint_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

}  // namespace tcm
