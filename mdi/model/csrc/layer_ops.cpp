// A Llama-family decoder layer's decode step as one call: the same kernels, in
// the same order and with the same operands, as fused_layers.block_forward's
// Python calls them (so the same bits), without the Python between them.
//
// A decode step of one sequence made ~35 operator calls a layer from Python,
// ~80 us of interpreter and dispatch a layer (2.4 ms a step for 30 layers,
// measured on a model of tiny widths), a third of SmolLM2's step at one sequence.
// Here the kernels are called through the dispatcher from C++ (~1 us each).
//
//   h = rms_norm(x, ln_1);  qkv = rope_write(linear(c_attn, h), cos, sin, pos, kv)
//   y = cache_attention(qkv, kv, pos);  x, h = add_rms_norm(x, linear(c_proj, y), ln_2)
//   x = x + linear(mlp.c_proj, silu_mul(linear(c_fc, h)))
//
// Each linear is one of mdi's products (`kinds`): int4 codes (int4_mm), int8 rows
// (int8_mm), bfloat16 rows (bf16_mm, which adds the bias itself), its bias added
// as Int4Linear, Int8Linear and layers.linear add it. Which layers qualify is the
// caller's decision (fused_layers.layer_operands).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using OptT = std::optional<at::Tensor>;

constexpr int64_t INT4 = 0, INT8 = 1, BF16 = 2;  // a linear's kind

template <typename F>
c10::TypedOperatorHandle<F> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// linear i of the layer on h (B, T, C) -> (B, T, N)
at::Tensor linear(const at::Tensor& h, int64_t kind, int64_t group, int64_t layout,
                  const OptT& w, const OptT& aux, const OptT& bias) {
  static auto int4_mm = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, bool)>("mdi_fused::int4_mm");
  static auto int8_mm = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      bool)>("mdi_fused::int8_mm");
  static auto bf16_mm = op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, bool)>(
      "mdi_fused::bf16_mm");
  TORCH_CHECK(w.has_value() && (kind == BF16 || aux.has_value()),
              "decode_layer: a linear's weight (and its scales) needed");
  const at::Tensor x2 = h.reshape({-1, h.size(-1)});
  at::Tensor y;
  if (kind == INT4) {
    y = int4_mm.call(x2, *w, *aux, group, layout, false);
  } else if (kind == INT8) {
    y = int8_mm.call(x2, *w, *aux, false);
  } else {
    TORCH_CHECK(kind == BF16, "decode_layer: unknown linear kind ", kind);
    y = bf16_mm.call(x2, *w, bias, false);  // (the bias added before the one rounding)
  }
  if (bias.has_value() && kind != BF16) y = y.add(bias->to(y.scalar_type()));
  return y.view({h.size(0), h.size(1), y.size(1)});
}

// x (B, 1, C) contiguous, float32 or bfloat16 (bf16: the model's activations are
// bfloat16, so every kernel's output is); linears: (weight, scales or none, bias or
// none) for c_attn, attn.c_proj, c_fc, mlp.c_proj; meta: n_head, n_kv, layout, then
// (kind, group) per linear; reals: ln_1's eps, ln_2's eps, attention's scale
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& kv, const at::Tensor& ln_1,
                        const at::Tensor& ln_2, const c10::List<OptT>& linears,
                        at::IntArrayRef meta, at::ArrayRef<double> reals) {
  static auto rms_norm = op<at::Tensor(const at::Tensor&, const at::Tensor&, double, bool)>(
      "mdi_fused::rms_norm");
  static auto add_rms_norm = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>(
      "mdi_fused::add_rms_norm");
  static auto rope_write = op<at::Tensor(const at::Tensor&, const OptT&, const OptT&,
                                         const OptT&, const OptT&, int64_t, int64_t)>(
      "mdi_fused::rope_write");
  static auto cache_attention = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, int64_t, int64_t, double, bool)>(
      "mdi_fused::cache_attention");
  static auto silu_mul = op<at::Tensor(const at::Tensor&, bool)>("mdi_fused::silu_mul");
  TORCH_CHECK(linears.size() == 12 && meta.size() == 11 && reals.size() == 3,
              "decode_layer: 4 linears of 3 operands, 11 integers and 3 reals needed, got ",
              linears.size(), ", ", meta.size(), ", ", reals.size());
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "decode_layer: x (B, T, C) contiguous needed");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t nh = meta[0], nkv = meta[1], layout = meta[2];
  auto lin = [&](int64_t i, const at::Tensor& h) {
    return linear(h, meta[3 + 2 * i], meta[4 + 2 * i], layout, linears.get(3 * i),
                  linears.get(3 * i + 1), linears.get(3 * i + 2));
  };
  const int64_t B = x.size(0), T = x.size(1);
  at::Tensor h = rms_norm.call(x, ln_1, reals[0], bf16);
  at::Tensor qkv = lin(0, h);
  qkv = qkv.view({B, T, nh + 2 * nkv, qkv.size(2) / (nh + 2 * nkv)});
  qkv = rope_write.call(qkv, cos, sin, pos, kv, nh, nkv);
  const at::Tensor y = cache_attention.call(qkv, kv, pos, nh, nkv, reals[2], bf16);
  const at::Tensor a = lin(1, y);
  auto [sum, h2] = add_rms_norm.call(x, a, ln_2, reals[1], bf16);
  const at::Tensor g = silu_mul.call(lin(2, h2), bf16);
  const at::Tensor d = lin(3, g);
  return sum.add(d.scalar_type() == sum.scalar_type() || sum.scalar_type() == at::kFloat
                     ? d : d.to(sum.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdi_fused, m) {
  m.def("decode_layer(Tensor x, Tensor pos, Tensor cos, Tensor sin, Tensor(a!) kv, Tensor ln_1, "
        "Tensor ln_2, Tensor?[] linears, int[] meta, float[] reals) -> Tensor");
}

TORCH_LIBRARY_IMPL(mdi_fused, CPU, m) {
  m.impl("decode_layer", decode_layer);
}
