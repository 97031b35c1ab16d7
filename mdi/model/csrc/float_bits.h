// bfloat16 as torch converts it, for the kernels of decode_ops.cpp,
// lowbit_ops.cpp and rows_ops.cpp: widening is exact; narrowing rounds to nearest even, as
// c10::BFloat16 does, so a kernel's bfloat16 output has the bits of its float32
// result passed through .to(torch.bfloat16) (a NaN stays a NaN, with other
// payload bits than torch's vectorized cast writes)
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace mdi {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void put(float* p, float v) { *p = v; }
inline void put(c10::BFloat16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t r = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  p->x = v != v ? static_cast<uint16_t>(0x7fc0) : r;
}

}  // namespace mdi
