// What the product kernels of lowbit_ops.cpp and rows_ops.cpp share: their
// activations as float32 rows, the checks of them, and the unrolling that keeps
// their accumulators in registers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "float_bits.h"

// fully unrolled: a kernel's accumulators (arrays of vectors indexed by these loops) stay
// in registers; without it g++ 12 kept them on the stack, stored at every step (the
// int8 kernel ran at a third of the FMA units' speed)
#define UNROLL _Pragma("GCC unroll 16")

namespace mdi {

constexpr int64_t ROWS_AT_ONCE = 4;  // activations rows sharing one conversion of the weights

// x (M, K) as float32 rows: a float32 input's own data (no copy in the per-token
// path), or a bfloat16 input widened into `copy`
inline const float* float_rows(const at::Tensor& x, std::vector<float>& copy) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const int64_t n = x.numel();
  copy.resize(n);
  const at::BFloat16* p = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < n; ++i) copy[i] = widen(p[i]);
  return copy.data();
}

inline void check_input(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat ||
                                      x.scalar_type() == at::kBFloat16),
              what, ": float32 or bfloat16 CPU activations only, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), what,
              ": activations (rows, ", K, ") contiguous needed, got ", x.sizes());
}

}  // namespace mdi
