// Matrix products of weights stored as rows, against float32 activations: int8
// rows with a scale per output (`int8_mm`, Int8Linear's few-rows kernel) and
// bfloat16 rows (`bf16_mm`, a bfloat16 Linear's decode, its bias added to the float32
// sums), read as they are stored.
//
// torch's kernels for these take bfloat16 activations and round the output to
// bfloat16 inside; these read float32 (a bfloat16 input is widened, exactly) and
// keep float32 sums: out = scale * sum_k w_k x_k, the sum in 16 lanes (k mod 16),
// each a chain of fused multiply-adds in k's order, folded pairwise as
// decode_ops.cpp's sums are. The AVX-512, AVX2 and portable loops give the same
// bits (std::fma rounds as the vector instructions do), so the processes of a
// ring compute alike on any CPU, and a row's result never depends on the other
// rows (--batch-invariant holds). A bfloat16 input gets a bfloat16 output (the
// float32 sum rounded once, to nearest even).
//
// Threads split the outputs; a tile of 4 outputs takes every row, 4 rows at a
// time, before the next (its weights come from memory once, from the core's cache
// for the further rows), each weight converted to float32 once per 4 rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "float_bits.h"
#include "kernel_common.h"

namespace {

using mdi::check_input;
using mdi::float_rows;
using mdi::ROWS_AT_ONCE;
using mdi::widen;
constexpr int64_t LANES = 16;
constexpr int64_t OUTPUTS = 4;  // outputs sharing one load of the activations

#if defined(__AVX512F__) || defined(__AVX2__)
// the cache line 8 KB on in an output's weights, into L2: one row of SmolLM2's
// matrices at a time read at ~20 GB/s with the lines fetched 4 KB ahead into L1,
// at 25-38 GB/s this way (AMD Zen 4, 2 threads; docs/benchmarks.md)
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + 8192, _MM_HINT_T1);
}
#endif

inline float value(int8_t q) { return static_cast<float>(q); }
inline float value(at::BFloat16 b) { return widen(b); }

// the LANES partial sums added pairwise (halves, then quarters...), as decode_ops.cpp's fold
inline float fold(float* acc) {
  for (int64_t w = LANES / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// outputs [n0, n0 + NB) of rows [0, R): lane l of an output's sum takes the k with
// k mod 16 = l, in k's order; times the output's scale where there is one
template <typename T, int64_t R, int64_t NB>
void outputs_portable(const float* x, int64_t K, const T* w, const float* scale, int64_t n0,
                      float* out, int64_t ldo) {
  float acc[R][NB][LANES] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < NB; ++n)
      for (int64_t r = 0; r < R; ++r)
        acc[r][n][k % LANES] =
            std::fma(value(w[(n0 + n) * K + k]), x[r * K + k], acc[r][n][k % LANES]);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < NB; ++n) {
      const float sum = fold(acc[r][n]);
      out[r * ldo + n0 + n] = scale ? sum * scale[n0 + n] : sum;
    }
}

#ifdef __AVX512F__
inline float fold(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// 16 weights (the lanes m of them; the rest 0) as float32
inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// one step of 16 inputs (k.. k + 15, the lanes `m` of them) of every output and row
template <typename T, int64_t R, int64_t NB>
inline void step16(const float* x, int64_t K, const T* w, int64_t k, __mmask16 m,
                   __m512 (&acc)[R][NB]) {
  __m512 xv[R];
  UNROLL for (int64_t r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * K + k);
  UNROLL for (int64_t n = 0; n < NB; ++n) {
    const __m512 wv = load16(w + n * K + k, m);
    // (a masked-off lane is left as it is, as the portable loop leaves it)
    UNROLL for (int64_t r = 0; r < R; ++r)
      acc[r][n] = _mm512_mask3_fmadd_ps(wv, xv[r], acc[r][n], m);
  }
}

template <typename T, int64_t R, int64_t NB>
void outputs(const float* x, int64_t K, const T* w, const float* scale, int64_t n0, float* out,
             int64_t ldo) {
  constexpr int64_t LINE = 64 / sizeof(T);  // weights a cache line holds
  __m512 acc[R][NB];
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int64_t n = 0; n < NB; ++n) acc[r][n] = _mm512_setzero_ps();
  const T* wn = w + n0 * K;
  if (K % LINE == 0) {
    for (int64_t k = 0; k < K; k += LINE) {  // a cache line of each output's weights
      UNROLL for (int64_t n = 0; n < NB; ++n) prefetch_ahead(wn + n * K + k);
      UNROLL for (int64_t i = 0; i < LINE; i += LANES)
        step16<T, R, NB>(x, K, wn, k + i, 0xffff, acc);
    }
  } else {
    for (int64_t k = 0; k < K; k += LANES)
      step16<T, R, NB>(x, K, wn, k,
                       K - k >= LANES ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1),
                       acc);
  }
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int64_t n = 0; n < NB; ++n) {
      const float sum = fold(acc[r][n]);
      out[r * ldo + n0 + n] = scale ? sum * scale[n0 + n] : sum;
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
// two 8-lane vectors: lanes 0-7 and 8-15 of the 16 partial sums
inline float fold(__m256 lo, __m256 hi) {
  const __m256 a = _mm256_add_ps(lo, hi);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// 8 weights as float32
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <typename T, int64_t R, int64_t NB>
void outputs(const float* x, int64_t K, const T* w, const float* scale, int64_t n0, float* out,
             int64_t ldo) {
  if (K % LANES != 0) {  // a ragged width: the portable loop (tiny models only)
    outputs_portable<T, R, NB>(x, K, w, scale, n0, out, ldo);
    return;
  }
  constexpr int64_t LINE = 64 / sizeof(T);
  __m256 acc[R][NB][2];
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int64_t n = 0; n < NB; ++n) acc[r][n][0] = acc[r][n][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += LANES) {
    UNROLL for (int64_t n = 0; n < NB; ++n) {
      const T* p = w + (n0 + n) * K + k;
      if (k % LINE == 0) prefetch_ahead(p);
      UNROLL for (int h = 0; h < 2; ++h) {
        const __m256 wv = load8(p + 8 * h);
        UNROLL for (int64_t r = 0; r < R; ++r)
          acc[r][n][h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k + 8 * h), acc[r][n][h]);
      }
    }
  }
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int64_t n = 0; n < NB; ++n) {
      const float sum = fold(acc[r][n][0], acc[r][n][1]);
      out[r * ldo + n0 + n] = scale ? sum * scale[n0 + n] : sum;
    }
}
#else
template <typename T, int64_t R, int64_t NB>
void outputs(const float* x, int64_t K, const T* w, const float* scale, int64_t n0, float* out,
             int64_t ldo) {
  outputs_portable<T, R, NB>(x, K, w, scale, n0, out, ldo);
}
#endif

// outputs [n, n + NB) of every row, ROWS_AT_ONCE rows at a time: the outputs' weights
// are read from memory once and from the core's cache for the further rows
template <typename T, int64_t NB>
void all_rows(const float* x, int64_t M, int64_t K, const T* w, const float* scale, float* out,
              int64_t N, int64_t n, bool portable) {
  for (int64_t r = 0; r < M; r += ROWS_AT_ONCE) {
    const float* xr = x + r * K;
    float* o = out + r * N;
    switch (std::min(ROWS_AT_ONCE, M - r)) {
#define MDI_ROWS(R) \
  (portable ? outputs_portable<T, R, NB> : outputs<T, R, NB>)(xr, K, w, scale, n, o, N)
      case 1: MDI_ROWS(1); break;
      case 2: MDI_ROWS(2); break;
      case 3: MDI_ROWS(3); break;
      default: MDI_ROWS(4); break;
#undef MDI_ROWS
    }
  }
}

// x (M, K) @ w (N, K).T [* scale (N,)] [+ bias (N,)], threads splitting the outputs; a
// bfloat16 x gets a bfloat16 output, each float32 result (bias included) rounded once
template <typename T>
at::Tensor rows_mm(const at::Tensor& x, const T* w, int64_t N, int64_t K, const float* scale,
                   const at::BFloat16* bias, bool portable) {
  const int64_t M = x.size(0);
  std::vector<float> widened;
  const float* xf = float_rows(x, widened);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({M, N}, x.options());
  const at::Tensor sums = bf16 ? at::empty({M, N}, x.options().dtype(at::kFloat)) : out;
  float* po = sums.data_ptr<float>();
  at::BFloat16* pb = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  const int64_t pieces = (N + OUTPUTS - 1) / OUTPUTS;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K * sizeof(T), 1));
  at::parallel_for(0, pieces, grain, [&](int64_t p0, int64_t p1) {
    const int64_t n0 = p0 * OUTPUTS, n1 = std::min(N, p1 * OUTPUTS);
    int64_t n = n0;
    for (; n + OUTPUTS <= n1; n += OUTPUTS)
      all_rows<T, OUTPUTS>(xf, M, K, w, scale, po, N, n, portable);
    for (; n < n1; ++n) all_rows<T, 1>(xf, M, K, w, scale, po, N, n, portable);
    if (bias == nullptr && !bf16) return;
    for (int64_t r = 0; r < M; ++r)  // these outputs' bias, and their one rounding
      for (int64_t j = n0; j < n1; ++j) {
        float v = po[r * N + j];
        if (bias != nullptr) v += widen(bias[j]);
        if (bf16) {
          mdi::put(pb + r * N + j, v);  // rounded as .to(torch.bfloat16) rounds (float_bits.h)
        } else {
          po[r * N + j] = v;
        }
      }
  });
  return out;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   bool portable) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 &&
              w.is_contiguous(), "int8_mm: int8 weight (N, K) contiguous needed, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  check_input(x, K, "int8_mm");
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat &&
              scale.is_contiguous() && scale.dim() == 1 && scale.size(0) == N,
              "int8_mm: float32 scales (", N, ") needed, got ", scale.scalar_type(), " ",
              scale.sizes());
  return rows_mm(x, w.data_ptr<int8_t>(), N, K, scale.data_ptr<float>(), nullptr, portable);
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                   bool portable) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2 &&
              w.is_contiguous(), "bf16_mm: bfloat16 weight (N, K) contiguous needed, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  check_input(x, K, "bf16_mm");
  if (bias.has_value())
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kBFloat16 &&
                    bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == N,
                "bf16_mm: a bfloat16 bias (", N, ") needed, got ", bias->scalar_type(), " ",
                bias->sizes());
  return rows_mm(x, w.data_ptr<at::BFloat16>(), N, K, nullptr,
                 bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr, portable);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdi_fused, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale, bool portable=False) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor w, Tensor? bias=None, bool portable=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(mdi_fused, CPU, m) {
  m.impl("int8_mm", int8_mm);
  m.impl("bf16_mm", bf16_mm);
}
