// int4 matrix products: codes in the packed layout of torch's CPU int4 kernel,
// read as they are stored (no second copy) against float32 activations
// (rows_ops.cpp: int8 and bfloat16 rows).
//
// torch's weight-only kernels take bfloat16 activations (its int4 kernel is
// 10-40x slower with float32 ones) and run a matrix-vector product per row;
// this reads float32 (a bfloat16 input is widened first), so no cast is made
// around it and a row keeps float32's precision. Its sums run in the order
// the source gives, each output on its own, with fused multiply-adds: the
// AVX-512, AVX2 and portable loops give the same bits (std::fma rounds as the
// vector instructions do), so the processes of a ring compute alike on any CPU,
// and a row's result never depends on the other rows (--batch-invariant holds).
//
// int4: w = (q - 8) * scale + zero per group of `group` inputs, so a group adds
//   out = fma(scale, sum_k (q_k - 8) x_k, out);  out = fma(zero, sum_k x_k, out)
// with sum_k (q - 8) x a chain of fmas in k's order (a row's group sums of x
// first, in k's order).
//
// The AVX loops prefetch: the codes 4 KB ahead of the read (their stream), and
// the scales two groups ahead (N outputs apart: no hardware prefetcher follows
// them); without it a pass over SmolLM2's block matrices at one row took 9.0 ms,
// with it 4-5 (docs/benchmarks.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "float_bits.h"
#include "kernel_common.h"

namespace {

using mdi::check_input;
using mdi::float_rows;
using mdi::put;
using mdi::ROWS_AT_ONCE;
using mdi::widen;

constexpr int64_t TAIL = 16;   // outputs: torch packs a multiple of 16

#if defined(__AVX512F__) || defined(__AVX2__)
// the cache line 4 KB on in the codes' stream (one stream a block: nearer and into
// L1 was faster here than rows_ops.cpp's distance)
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + 4096, _MM_HINT_T0);
}

// group g's scales and zeros of a block of bw outputs (4 bw bytes), if g < groups
inline void prefetch_scales(const at::BFloat16* sz, int64_t N, int64_t n0, int64_t bw, int64_t g,
                            int64_t groups) {
  if (g < groups)
    for (int64_t i = 0; i < bw / 16; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(sz + (g * N + n0) * 2) + 64 * i, _MM_HINT_T0);
}
#endif

// ---- int4 ----

// torch packs int4 codes by its CPU capability (`layout`): blocks of BW = 64
// (AVX-512) or 32 (AVX2) outputs, per input k BW / 2 bytes, byte j holding
// outputs j (low nibble) and j + BW / 2 (high); or (layout 0, other CPUs) blocks
// of 32 in pairs, byte j holding outputs 2j and 2j + 1; the last N % BW outputs
// in pairs too. The per-output arithmetic is the same for every layout.

// rows [0, R) of one block of BW outputs, the portable loop: lane i is output n0 + i
template <int64_t R, int64_t BW>
void int4_block_portable(const float* x, int64_t K, const uint8_t* codes, const at::BFloat16* sz,
                         int64_t N, int64_t n0, int64_t group, const float* xsum, int64_t G,
                         float* out, int64_t ldo) {
  float acc[R][BW];
  float res[R][BW] = {};
  for (int64_t g = 0; g < K / group; ++g) {
    std::memset(acc, 0, sizeof acc);
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const uint8_t* b = codes + k * (BW / 2);
      for (int64_t r = 0; r < R; ++r) {
        const float xv = x[r * K + k];
        for (int64_t j = 0; j < BW / 2; ++j) {
          acc[r][j] = std::fma(static_cast<float>((b[j] & 15) - 8), xv, acc[r][j]);
          acc[r][j + BW / 2] =
              std::fma(static_cast<float>((b[j] >> 4) - 8), xv, acc[r][j + BW / 2]);
        }
      }
    }
    const at::BFloat16* s = sz + (g * N + n0) * 2;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < BW; ++i) {
        res[r][i] = std::fma(widen(s[2 * i]), acc[r][i], res[r][i]);
        res[r][i] = std::fma(widen(s[2 * i + 1]), xsum[r * G + g], res[r][i]);
      }
  }
  for (int64_t r = 0; r < R; ++r) std::memcpy(out + r * ldo + n0, res[r], sizeof res[r]);
}

#ifdef __AVX512F__
// the same block with AVX-512: 16 of a k's bytes widened to 16 int32 at a time, each
// nibble looked up as (q - 8) in a 16-float table (vpermps reads an index's low 4 bits)
template <int64_t R, int64_t BW>
void int4_block(const float* x, int64_t K, const uint8_t* codes, const at::BFloat16* sz,
                int64_t N, int64_t n0, int64_t group, const float* xsum, int64_t G, float* out,
                int64_t ldo) {
  constexpr int V = BW / 16, C = BW / 32;  // vectors of outputs; 16-byte loads per k
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 res[R][V];
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int i = 0; i < V; ++i) res[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 acc[R][V];
    UNROLL for (int64_t r = 0; r < R; ++r)
      UNROLL for (int i = 0; i < V; ++i) acc[r][i] = _mm512_setzero_ps();
    prefetch_scales(sz, N, n0, BW, g + 2, K / group);
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const uint8_t* b = codes + k * (BW / 2);
      if (k % (128 / BW) == 0) prefetch_ahead(b);
      __m512 w[V];
      UNROLL for (int c = 0; c < C; ++c) {
        const __m512i v =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * c)));
        w[c] = _mm512_permutexvar_ps(v, table);                            // outputs 16c..
        w[C + c] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);  // BW / 2 + 16c..
      }
      UNROLL for (int64_t r = 0; r < R; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * K + k]);
        UNROLL for (int i = 0; i < V; ++i) acc[r][i] = _mm512_fmadd_ps(w[i], xv, acc[r][i]);
      }
    }
    // 16 outputs' (scale, zero) pairs are 16 int32: scale in the low half, zero in the high
    const int32_t* s = reinterpret_cast<const int32_t*>(sz + (g * N + n0) * 2);
    UNROLL for (int i = 0; i < V; ++i) {
      const __m512i pair = _mm512_loadu_si512(s + 16 * i);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
      UNROLL for (int64_t r = 0; r < R; ++r) {
        res[r][i] = _mm512_fmadd_ps(scale, acc[r][i], res[r][i]);
        res[r][i] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[r * G + g]), res[r][i]);
      }
    }
  }
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int i = 0; i < V; ++i) _mm512_storeu_ps(out + r * ldo + n0 + 16 * i, res[r][i]);
}
#elif defined(__AVX2__) && defined(__FMA__)
// the same block with AVX2: 8 outputs a vector, nibbles masked, shifted and converted
template <int64_t R, int64_t BW>
void int4_block(const float* x, int64_t K, const uint8_t* codes, const at::BFloat16* sz,
                int64_t N, int64_t n0, int64_t group, const float* xsum, int64_t G, float* out,
                int64_t ldo) {
  constexpr int V = BW / 8, C = BW / 16;  // vectors of outputs; 8-byte loads per k
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 res[R][V];
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int i = 0; i < V; ++i) res[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    prefetch_scales(sz, N, n0, BW, g + 2, K / group);
    __m256 acc[R][V];
    UNROLL for (int64_t r = 0; r < R; ++r)
      UNROLL for (int i = 0; i < V; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const uint8_t* b = codes + k * (BW / 2);
      if (k % (128 / BW) == 0) prefetch_ahead(b);
      __m256 w[V];
      UNROLL for (int q = 0; q < C; ++q) {
        const __m256i v =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * q)));
        w[q] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, low), eight));
        w[C + q] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
      }
      UNROLL for (int64_t r = 0; r < R; ++r) {
        const __m256 xv = _mm256_set1_ps(x[r * K + k]);
        UNROLL for (int i = 0; i < V; ++i) acc[r][i] = _mm256_fmadd_ps(w[i], xv, acc[r][i]);
      }
    }
    const int32_t* s = reinterpret_cast<const int32_t*>(sz + (g * N + n0) * 2);
    UNROLL for (int i = 0; i < V; ++i) {
      const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * i));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
      const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, high));
      UNROLL for (int64_t r = 0; r < R; ++r) {
        res[r][i] = _mm256_fmadd_ps(scale, acc[r][i], res[r][i]);
        res[r][i] = _mm256_fmadd_ps(zero, _mm256_set1_ps(xsum[r * G + g]), res[r][i]);
      }
    }
  }
  UNROLL for (int64_t r = 0; r < R; ++r)
    UNROLL for (int i = 0; i < V; ++i) _mm256_storeu_ps(out + r * ldo + n0 + 8 * i, res[r][i]);
}
#else
template <int64_t R, int64_t BW>
void int4_block(const float* x, int64_t K, const uint8_t* codes, const at::BFloat16* sz,
                int64_t N, int64_t n0, int64_t group, const float* xsum, int64_t G, float* out,
                int64_t ldo) {
  int4_block_portable<R, BW>(x, K, codes, sz, N, n0, group, xsum, G, out, ldo);
}
#endif

// outputs [n0, n0 + t) packed in pairs (t <= 64; byte j of a k: outputs 2j, 2j + 1),
// every row: the same sums as a block's, portably
void int4_pairs(const float* x, int64_t M, int64_t K, const uint8_t* codes,
                const at::BFloat16* sz, int64_t N, int64_t n0, int64_t t, int64_t group,
                const float* xsum, int64_t G, float* out) {
  float acc[64], res[64];
  for (int64_t r = 0; r < M; ++r) {
    std::fill(res, res + t, 0.0f);
    for (int64_t g = 0; g < K / group; ++g) {
      std::fill(acc, acc + t, 0.0f);
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const uint8_t* b = codes + k * (t / 2);
        const float xv = x[r * K + k];
        for (int64_t j = 0; j < t / 2; ++j) {
          acc[2 * j] = std::fma(static_cast<float>((b[j] & 15) - 8), xv, acc[2 * j]);
          acc[2 * j + 1] = std::fma(static_cast<float>((b[j] >> 4) - 8), xv, acc[2 * j + 1]);
        }
      }
      const at::BFloat16* s = sz + (g * N + n0) * 2;
      for (int64_t i = 0; i < t; ++i) {
        res[i] = std::fma(widen(s[2 * i]), acc[i], res[i]);
        res[i] = std::fma(widen(s[2 * i + 1]), xsum[r * G + g], res[i]);
      }
    }
    std::memcpy(out + r * N + n0, res, t * sizeof(float));
  }
}

// blocks [b0, b1) of BW outputs, every row, ROWS_AT_ONCE rows at a time: a block's codes
// are read from memory once and from the core's cache for the further rows
template <int64_t BW>
void int4_blocks(const float* x, int64_t M, int64_t K, const uint8_t* codes,
                 const at::BFloat16* sz, int64_t N, int64_t group, const float* xsum, int64_t G,
                 float* out, int64_t b0, int64_t b1, bool portable) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* cb = codes + b * BW * K / 2;
    for (int64_t r = 0; r < M; r += ROWS_AT_ONCE) {
      const float* xr = x + r * K;
      const float* sr = xsum + r * G;
      float* o = out + r * N;
      switch (std::min(ROWS_AT_ONCE, M - r)) {
#define MDI_INT4_ROWS(R)                                                                 \
  (portable ? int4_block_portable<R, BW> : int4_block<R, BW>)(xr, K, cb, sz, N, b * BW, group, \
                                                              sr, G, o, N)
        case 1: MDI_INT4_ROWS(1); break;
        case 2: MDI_INT4_ROWS(2); break;
        case 3: MDI_INT4_ROWS(3); break;
        default: MDI_INT4_ROWS(4); break;
#undef MDI_INT4_ROWS
      }
    }
  }
}

// (N, K, groups) of packed codes and their scales and zeros, checked
std::tuple<int64_t, int64_t, int64_t> check_int4(const at::Tensor& w, const at::Tensor& sz,
                                                 int64_t group, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 &&
              w.is_contiguous(), what, ": packed uint8 codes (N, K / 2) needed, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group > 0 && K % group == 0 && group % 2 == 0, what, ": group ", group,
              " does not divide the input width ", K);
  TORCH_CHECK(N % TAIL == 0, what, ": outputs ", N, " not a multiple of ", TAIL);
  const int64_t G = K / group;
  TORCH_CHECK(sz.device().is_cpu() && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
              sz.dim() == 3 && sz.size(0) == G && sz.size(1) == N && sz.size(2) == 2,
              what, ": bfloat16 scales and zeros (", G, ", ", N, ", 2) needed, got ",
              sz.scalar_type(), " ", sz.sizes());
  return {N, K, G};
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group,
                   int64_t layout, bool portable) {
  const auto [N, K, G] = check_int4(w, sz, group, "int4_mm");
  check_input(x, K, "int4_mm");
  TORCH_CHECK(layout == 64 || layout == 32 || layout == 0, "int4_mm: layout ", layout,
              " is not one of torch's packings (64, 32, or 0: pairs)");
  const int64_t M = x.size(0);
  std::vector<float> widened;
  const float* xf = float_rows(x, widened);
  std::vector<float> xsum(M * G);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xf[r * K + k];
      xsum[r * G + g] = s;
    }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  const uint8_t* pc = w.data_ptr<uint8_t>();
  const at::BFloat16* ps = sz.data_ptr<at::BFloat16>();
  const int64_t bw = layout == 0 ? 32 : layout, full = N / bw;
  // threads split the full blocks; the last outputs (pairs) go with the last share
  at::parallel_for(0, full + 1, 1, [&](int64_t b0, int64_t b1) {
    const int64_t e = std::min(b1, full);
    if (layout == 64)
      int4_blocks<64>(xf, M, K, pc, ps, N, group, xsum.data(), G, po, b0, e, portable);
    else if (layout == 32)
      int4_blocks<32>(xf, M, K, pc, ps, N, group, xsum.data(), G, po, b0, e, portable);
    else
      for (int64_t b = b0; b < e; ++b)
        int4_pairs(xf, M, K, pc + b * bw * K / 2, ps, N, b * bw, bw, group, xsum.data(),
                   G, po);
    if (b1 == full + 1 && full * bw < N)
      int4_pairs(xf, M, K, pc + full * bw * K / 2, ps, N, full * bw, N - full * bw, group,
                 xsum.data(), G, po);
  });
  return x.scalar_type() == at::kFloat ? out : out.to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdi_fused, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor sz, int group, int layout, bool portable=False) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(mdi_fused, CPU, m) {
  m.impl("int4_mm", int4_mm);
}
