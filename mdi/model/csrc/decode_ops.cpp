// The small operations between a decoder layer's GEMMs, one kernel each, on the
// CPU (mdi/model/fused_ops.py builds and loads this file). Activations and the
// cache are float32 or bfloat16; every kernel computes in float32 and rounds its
// outputs once; weights (the norms') are float32.
//
// Eager PyTorch spends a decode step of one sequence mostly between its matrix
// products: an RMSNorm is 7 aten calls, RoPE 6, the cache write 4-8, attention
// 10-20 with its views, SwiGLU's gate 4. Here each is one call, and no
// temporary tensor is made between its steps.
//
// Every sum runs in the order this source gives (LANES partial sums, then added
// pairwise: `fold`), built with -ffp-contract=off: the results are the same
// bits on any x86 CPU and with any vector width the compiler picks, so the
// processes of a ring, built on different machines, compute alike. Each row of
// a batch is computed on its own, so a row's numbers never depend on its
// neighbours (--batch-invariant holds).
//
// A kernel's output dtype is chosen by its caller (`bf16`): a low-bit linear
// (int4, int8) reads bfloat16 and gives bfloat16 back, so the kernels around it
// write and read bfloat16 themselves instead of two casts per linear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "float_bits.h"

namespace {

constexpr int64_t LANES = 16;
// rows' elements below which a call stays on the calling thread (a thread team's
// start costs more than the work)
constexpr int64_t GRAIN = 1 << 15;
// keys beyond which a query attends through scaled_dot_product_attention (its
// blocked kernel was 2x this file's at 1500 keys, 0.8x at 200, 0.5x at 16); per
// query, so a row's choice depends on its own position alone
constexpr int64_t LONG = 256;

// the LANES partial sums added pairwise (halves, then quarters...): a vector's
// shuffles, not a chain of LANES dependent adds
inline float fold(float* acc) {
  for (int64_t w = LANES / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// e^x to ~2 ulp, written out so that a loop of it vectorizes (libm's expf is a
// call per element) and gives the same bits everywhere: x = n ln2 + r with
// |r| <= ln2/2, e^r by its Taylor polynomial to r^7, 2^n by the exponent bits.
// x is clamped to [-87.3, 88.7] first: below, it returns e^-87.3 (~1e-38, a
// softmax weight of nothing) rather than 0; from ~88.4, infinity. NaN stays NaN.
inline float exp_fast(float x) {
  // (compares that keep a NaN, which then runs through the arithmetic: no branch)
  const float lo = x < -87.3f ? -87.3f : x;
  const float xc = lo > 88.7f ? 88.7f : lo;
  // floor(xc log2(e) + 0.5) by truncating a positive number
  const float n = static_cast<float>(static_cast<int32_t>(xc * 1.44269504f + 128.5f)) - 128.0f;
  const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

using mdi::put;
using mdi::widen;

// f(T{}) with T the element type of a float32 or bfloat16 tensor
template <typename F>
void by_type(at::ScalarType t, const F& f) {
  if (t == at::kBFloat16)
    f(at::BFloat16{});
  else
    f(float{});
}

at::ScalarType out_type(bool bf16) { return bf16 ? at::kBFloat16 : at::kFloat; }

void check_rows(const at::Tensor& x, const char* what, bool any = true) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat ||
                                      (any && x.scalar_type() == at::kBFloat16)),
              what, ": float32 ", any ? "or bfloat16 " : "", "CPU tensors only, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.is_contiguous(), what, ": a contiguous tensor is needed");
}

void check_weight(const at::Tensor& x, const at::Tensor& w, const char* what) {
  check_rows(w, what, false);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), what, ": float32 weight of ", x.size(-1),
              " elements needed, got shape ", w.sizes());
}

void check_cache(const at::Tensor& kv, int64_t B, int64_t n_kv, int64_t hs, const char* what) {
  TORCH_CHECK(kv.device().is_cpu() && (kv.scalar_type() == at::kFloat ||
                                       kv.scalar_type() == at::kBFloat16) &&
              kv.dim() == 5 && kv.size(0) == 2 && kv.size(1) == B && kv.size(2) == n_kv &&
              kv.size(4) == hs && kv.stride(4) == 1, what,
              ": a float32 or bfloat16 cache buffer (2, ", B, ", ", n_kv, ", T, ", hs,
              ") needed, got ", kv.sizes(), " ", kv.scalar_type());
}

const int64_t* checked_positions(const at::Tensor& pos, int64_t B, int64_t T, int64_t T_max,
                                 const char* what) {
  TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == at::kLong && pos.is_contiguous() &&
              pos.dim() == 2 &&
              pos.size(0) == B && pos.size(1) == T, what, ": positions (", B, ", ", T,
              ") int64 needed, got ", pos.sizes());
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < T_max, what, ": position ", pp[i],
                " is outside the cache's ", T_max, " positions");
  return pp;
}

// rows of n elements, a thread's share at least GRAIN elements
template <typename F>
void for_rows(int64_t rows, int64_t n, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, GRAIN / std::max<int64_t>(n, 1)), f);
}

template <typename In, typename Out>
void norm_row(const In* a, const float* w, Out* o, int64_t n, float eps) {
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t l = 0; l < LANES; ++l) acc[l] += widen(a[i + l]) * widen(a[i + l]);
  float ss = fold(acc);
  for (; i < n; ++i) ss += widen(a[i]) * widen(a[i]);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) put(o + i, w[i] * (widen(a[i]) * r));
}

// x * rsqrt(mean(x^2) + eps) * w over the last dimension, in bfloat16 with bf16
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool bf16) {
  check_rows(x, "rms_norm");
  check_weight(x, w, "rms_norm");
  auto out = at::empty(x.sizes(), x.options().dtype(out_type(bf16)));
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* pw = w.data_ptr<float>();
  const float e = static_cast<float>(eps);
  by_type(x.scalar_type(), [&](auto in) {
    using In = decltype(in);
    const In* px = x.data_ptr<In>();
    by_type(out.scalar_type(), [&](auto o) {
      using Out = decltype(o);
      Out* po = out.data_ptr<Out>();
      for_rows(rows, n, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) norm_row(px + r * n, pw, po + r * n, n, e);
      });
    });
  });
  return out;
}

// (x + y, rms_norm(x + y)): a residual add, its sum in x's dtype (y float32 or
// bfloat16), and the norm of that sum as stored, in bfloat16 with bf16
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& y,
                                                const at::Tensor& w, double eps, bool bf16) {
  check_rows(x, "add_rms_norm");
  check_rows(y, "add_rms_norm");
  check_weight(x, w, "add_rms_norm");
  TORCH_CHECK(x.sizes() == y.sizes(), "add_rms_norm: shapes differ, ", x.sizes(), " and ", y.sizes());
  auto sum = at::empty(x.sizes(), x.options());
  auto out = at::empty(x.sizes(), x.options().dtype(out_type(bf16)));
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* pw = w.data_ptr<float>();
  const float e = static_cast<float>(eps);
  by_type(x.scalar_type(), [&](auto xt) {
    using X = decltype(xt);
    const X* px = x.data_ptr<X>();
    X* ps = sum.data_ptr<X>();
    by_type(y.scalar_type(), [&](auto yt) {
      using Y = decltype(yt);
      const Y* py = y.data_ptr<Y>();
      by_type(out.scalar_type(), [&](auto ot) {
        using Out = decltype(ot);
        Out* po = out.data_ptr<Out>();
        for_rows(rows, n, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            for (int64_t i = r * n; i < (r + 1) * n; ++i) put(ps + i, widen(px[i]) + widen(py[i]));
            norm_row(ps + r * n, pw, po + r * n, n, e);
          }
        });
      });
    });
  });
  return {sum, out};
}

// qkv (B, T, nh + 2 nkv, hs), float32 or bfloat16 -> float32, with the q and k
// heads rotated (rotate-half RoPE with float32 cos, sin (B, T, hs); none for
// learned positions) and, given a cache buffer kv (2, B, nkv, T_max, hs), each
// (b, t)'s k and v heads written into it (in its dtype) at row b, position
// pos[b, t]. The rotation is Hugging Face's x*cos + cat(-x2, x1)*sin, with the
// same products and sums.
at::Tensor rope_write(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                      const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& pos,
                      const std::optional<at::Tensor>& kv, int64_t n_head, int64_t n_kv) {
  check_rows(qkv, "rope_write");
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(2) == n_head + 2 * n_kv, "rope_write: qkv (B, T, ",
              n_head + 2 * n_kv, ", hs) needed, got ", qkv.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(2), hs = qkv.size(3);
  const bool rotate = cos.has_value();
  if (rotate) {
    TORCH_CHECK(sin.has_value(), "rope_write: cos without sin");
    check_rows(*cos, "rope_write", false);
    check_rows(*sin, "rope_write", false);
    TORCH_CHECK(cos->numel() == B * T * hs && sin->numel() == B * T * hs && hs % 2 == 0,
                "rope_write: cos and sin (B, T, hs) needed");
  }
  const int64_t* pp = nullptr;
  if (kv.has_value()) {
    check_cache(*kv, B, n_kv, hs, "rope_write");
    TORCH_CHECK(pos.has_value(), "rope_write: a cache write needs the positions");
    pp = checked_positions(*pos, B, T, kv->size(3), "rope_write");
  }
  auto out = at::empty(qkv.sizes(), qkv.options().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  const float* pc = rotate ? cos->data_ptr<float>() : nullptr;
  const float* psn = rotate ? sin->data_ptr<float>() : nullptr;
  const int64_t half = hs / 2, rotated = n_head + n_kv;
  by_type(qkv.scalar_type(), [&](auto in) {
    using In = decltype(in);
    const In* px = qkv.data_ptr<In>();
    for_rows(B * T, H * hs, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t h = 0; h < H; ++h) {
          const In* x = px + (i * H + h) * hs;
          float* y = po + (i * H + h) * hs;
          if (pc == nullptr || h >= rotated) {
            for (int64_t d = 0; d < hs; ++d) y[d] = widen(x[d]);
            continue;
          }
          const float* c = pc + i * hs;
          const float* s = psn + i * hs;
          for (int64_t d = 0; d < half; ++d) {
            const float x1 = widen(x[d]), x2 = widen(x[d + half]);
            y[d] = x1 * c[d] - x2 * s[d];
            y[d + half] = x2 * c[d + half] + x1 * s[d + half];
          }
        }
      }
    });
  });
  if (pp != nullptr) {
    const int64_t s0 = kv->stride(0), s1 = kv->stride(1), s2 = kv->stride(2), s3 = kv->stride(3);
    by_type(kv->scalar_type(), [&](auto ct) {
      using C = decltype(ct);
      C* pk = kv->data_ptr<C>();
      for (int64_t i = 0; i < B * T; ++i) {
        const float* row = po + i * H * hs;
        C* at_pos = pk + (i / T) * s1 + pp[i] * s3;
        for (int64_t h = 0; h < n_kv; ++h)
          for (int64_t d = 0; d < hs; ++d) {
            put(at_pos + h * s2 + d, row[(n_head + h) * hs + d]);
            put(at_pos + s0 + h * s2 + d, row[(n_head + n_kv + h) * hs + d]);
          }
      }
    });
  }
  return out;
}

template <typename C>
inline float dot_key(const float* q, const C* k, int64_t n) {
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t l = 0; l < LANES; ++l) acc[l] += q[i + l] * widen(k[i + l]);
  float s = fold(acc);
  for (; i < n; ++i) s += q[i] * widen(k[i]);
  return s;
}

// the queries of at most LONG keys, each (query, head) a unit of work
template <typename C, typename Out>
void attend_short(const float* px, const C* pk, const int64_t* pp, int64_t T, Out* po, int64_t BT,
                  int64_t H, int64_t hs, int64_t n_head, int64_t group, at::IntArrayRef st,
                  float sc, int64_t keys) {
  const int64_t s0 = st[0], s1 = st[1], s2 = st[2], s3 = st[3];
  at::parallel_for(0, BT * n_head, std::max<int64_t>(1, GRAIN / std::max<int64_t>(keys * hs, 1)),
                   [&](int64_t u0, int64_t u1) {
    std::vector<float> scores(keys), sums(hs);
    float* __restrict__ score = scores.data();
    float* __restrict__ y = sums.data();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t i = u / n_head, h = u % n_head, L = pp[i] + 1;
      if (L > LONG) continue;
      const float* q = px + i * H * hs + h * hs;
      const C* k = pk + (i / T) * s1 + (h / group) * s2;
      const C* v = k + s0;
      float top = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        score[j] = dot_key(q, k + j * s3, hs) * sc;
        top = score[j] > top || score[j] != score[j] ? score[j] : top;  // a NaN wins
      }
      for (int64_t j = 0; j < L; ++j) score[j] = exp_fast(score[j] - top);
      float acc[LANES] = {0};
      int64_t j = 0;
      for (; j + LANES <= L; j += LANES)
        for (int64_t l = 0; l < LANES; ++l) acc[l] += score[j + l];
      float total = fold(acc);
      for (; j < L; ++j) total += score[j];
      std::fill_n(y, hs, 0.0f);
      for (j = 0; j < L; ++j) {
        const float wj = score[j];
        const C* vj = v + j * s3;
        for (int64_t d = 0; d < hs; ++d) y[d] += wj * widen(vj[d]);
      }
      const float inv = 1.0f / total;
      Out* o = po + i * n_head * hs + h * hs;
      for (int64_t d = 0; d < hs; ++d) put(o + d, y[d] * inv);
    }
  });
}

// Attention of the q heads of qkv (B, T, nh + 2 nkv, hs) (float32, rope_write's)
// over the cache kv (2, B, nkv, T_max, hs): query (b, t) sees the keys of row b
// at positions 0..pos[b, t] (causal by position). Returns (B, T, nh * hs), the
// layout the output projection reads, in bfloat16 with bf16. For the few queries
// of a decode step; a prefill's many are faster in scaled_dot_product_attention's
// blocked kernel, and so is a query of more than LONG keys.
at::Tensor cache_attention(const at::Tensor& qkv, const at::Tensor& kv, const at::Tensor& pos,
                           int64_t n_head, int64_t n_kv, double scale, bool bf16) {
  check_rows(qkv, "cache_attention", false);
  TORCH_CHECK(qkv.dim() == 4 && n_kv > 0 && qkv.size(2) == n_head + 2 * n_kv && n_head % n_kv == 0,
              "cache_attention: qkv (B, T, nh + 2 nkv, hs) needed, got ", qkv.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(2), hs = qkv.size(3);
  check_cache(kv, B, n_kv, hs, "cache_attention");
  const int64_t* pp = checked_positions(pos, B, T, kv.size(3), "cache_attention");
  int64_t longest = 0;
  for (int64_t i = 0; i < B * T; ++i) longest = std::max(longest, pp[i] + 1);
  auto out = at::empty({B, T, n_head * hs}, qkv.options().dtype(out_type(bf16)));
  for (int64_t i = 0; i < B * T; ++i) {  // the long queries, one at a time
    const int64_t L = pp[i] + 1, b = i / T;
    if (L <= LONG) continue;
    auto q = qkv.select(0, b).select(0, i % T).narrow(0, 0, n_head).unsqueeze(0).unsqueeze(2);
    auto k = kv.select(0, 0).select(0, b).narrow(1, 0, L).unsqueeze(0);  // (1, nkv, L, hs)
    auto v = kv.select(0, 1).select(0, b).narrow(1, 0, L).unsqueeze(0);
    // in float32, as the queries are: a narrower cache read back widened, as torch's path does
    auto y = at::scaled_dot_product_attention(q, k.to(at::kFloat), v.to(at::kFloat), std::nullopt,
                                              0.0, false, scale, true);
    out.select(0, b).select(0, i % T).copy_(y.reshape({n_head * hs}));
  }
  const float* px = qkv.data_ptr<float>();
  by_type(kv.scalar_type(), [&](auto ct) {
    using C = decltype(ct);
    by_type(out.scalar_type(), [&](auto ot) {
      using Out = decltype(ot);
      attend_short(px, kv.data_ptr<C>(), pp, T, out.data_ptr<Out>(), B * T, H, hs, n_head,
                   n_head / n_kv, kv.strides(), static_cast<float>(scale),
                   std::min(longest, LONG));
    });
  });
  return out;
}

// SwiGLU's gate: h (..., 2w) holds gate | up (float32 or bfloat16); silu(gate) * up
// -> (..., w), computed in float32, in bfloat16 with bf16
at::Tensor silu_mul(const at::Tensor& h, bool bf16) {
  check_rows(h, "silu_mul");
  const int64_t n2 = h.size(-1), w = n2 / 2;
  TORCH_CHECK(n2 % 2 == 0, "silu_mul: an even last dimension needed, got ", n2);
  auto sizes = h.sizes().vec();
  sizes.back() = w;
  auto out = at::empty(sizes, h.options().dtype(out_type(bf16)));
  const int64_t rows = w ? h.numel() / n2 : 0;
  by_type(h.scalar_type(), [&](auto it) {
    using In = decltype(it);
    const In* ph = h.data_ptr<In>();
    by_type(out.scalar_type(), [&](auto ot) {
      using Out = decltype(ot);
      Out* po = out.data_ptr<Out>();
      for_rows(rows, n2, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const In* __restrict__ g = ph + r * n2;
          const In* __restrict__ up = g + w;
          Out* __restrict__ o = po + r * w;
          for (int64_t i = 0; i < w; ++i) {
            const float a = widen(g[i]);
            put(o + i, a / (1.0f + exp_fast(-a)) * widen(up[i]));
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mdi_fused, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps, bool bf16) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor y, Tensor w, float eps, bool bf16) -> (Tensor, Tensor)");
  m.def("rope_write(Tensor qkv, Tensor? cos, Tensor? sin, Tensor? pos, Tensor(a!)? kv, "
        "int n_head, int n_kv) -> Tensor");
  m.def("cache_attention(Tensor qkv, Tensor kv, Tensor pos, int n_head, int n_kv, float scale, "
        "bool bf16) -> Tensor");
  m.def("silu_mul(Tensor h, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(mdi_fused, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rope_write", rope_write);
  m.impl("cache_attention", cache_attention);
  m.impl("silu_mul", silu_mul);
}
