// Row conversions between the cache / activation dtypes and fp32, written as plain loops over raw bits so
// the compiler vectorizes them (c10::BFloat16's own conversions do not vectorize). Build with
// -fno-strict-aliasing: the bf16 paths write fp32 bit patterns through uint32_t pointers.
#pragma once
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace herd {

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <typename T>  // fp16, fp64: plain conversion
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void narrow(const float* src, float* dst, int64_t n) { std::memmove(dst, src, n * sizeof(float)); }

// Round to nearest even, as c10::BFloat16 does (NaN stays a quiet NaN).
inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = s[i];
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    d[i] = (bits & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// x := float(T(x)): the rounding a value takes when an eager torch op stores it in dtype T.
template <typename T>
inline void round_through(float* x, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    T tmp[256];
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
      const int64_t m = std::min<int64_t>(256, n - i0);
      narrow(x + i0, tmp, m);
      widen(tmp, x + i0, m);
    }
  }
}

}  // namespace herd
