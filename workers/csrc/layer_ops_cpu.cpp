// The elementwise parts of a Llama decoder layer as single passes on the CPU: RMSNorm, rotary embedding (in
// place on q and k) and SiLU(gate) * up. Each replaces 4-8 separate torch ops (and their temporaries and
// per-op dispatch). They round where Hugging Face's eager code rounds, so bf16 results match it: RMSNorm
// normalises in fp32, casts to the model dtype, then multiplies by the weight; RoPE and SiLU-mul round each
// product to the model dtype before adding / multiplying, as the eager tensor expressions do.
#include "aten.h"
#include <cmath>
#include <vector>

#include "convert.h"

namespace {

using herd::narrow;
using herd::round_through;
using herd::widen;

// Rows per parallel task: enough work per task that small decode batches stay on one thread.
inline int64_t grain_for(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

template <typename T>
void rms_norm_kernel(const T* x, const T* w, T* out, int64_t rows, int64_t H, float eps) {
  std::vector<float> wf(H);
  widen(w, wf.data(), H);
  at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(H);
    for (int64_t r = begin; r < end; ++r) {
      float* v = buf.data();
      widen(x + r * H, v, H);
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) ss += v[i] * v[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      for (int64_t i = 0; i < H; ++i) v[i] *= inv;
      round_through<T>(v, H);                      // hidden.to(input_dtype)
      for (int64_t i = 0; i < H; ++i) v[i] *= wf[i];  // weight * hidden
      narrow(v, out + r * H, H);
    }
  });
}

// x: [T, heads, D] rotated in place, `token_stride` elements between tokens (q and k are column slices of
// the fused qkv output); cos/sin: [max_positions, D/2]. Rotate-half layout:
// out = x * cos + rotate_half(x) * sin, each product rounded to T before the sum.
template <typename T>
void rotary_kernel(T* x, const T* cos, const T* sin, const int64_t* positions, int64_t tokens, int64_t heads,
                   int64_t D, int64_t token_stride) {
  const int64_t half = D / 2;
  at::parallel_for(0, tokens, grain_for(heads * D), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(6 * half);
    float *c = buf.data(), *s = c + half, *a = s + half, *b = a + half, *p = b + half, *q = p + half;
    for (int64_t t = begin; t < end; ++t) {
      widen(cos + positions[t] * half, c, half);
      widen(sin + positions[t] * half, s, half);
      for (int64_t h = 0; h < heads; ++h) {
        T* x1 = x + t * token_stride + h * D;
        T* x2 = x1 + half;
        widen(x1, a, half);
        widen(x2, b, half);
        for (int64_t i = 0; i < half; ++i) { p[i] = a[i] * c[i]; q[i] = -b[i] * s[i]; }
        round_through<T>(p, half);
        round_through<T>(q, half);
        for (int64_t i = 0; i < half; ++i) p[i] += q[i];
        narrow(p, x1, half);                                         // x1 * cos - x2 * sin
        for (int64_t i = 0; i < half; ++i) { p[i] = b[i] * c[i]; q[i] = a[i] * s[i]; }
        round_through<T>(p, half);
        round_through<T>(q, half);
        for (int64_t i = 0; i < half; ++i) p[i] += q[i];
        narrow(p, x2, half);                                         // x2 * cos + x1 * sin
      }
    }
  });
}

// gate_up: [T, 2I] (gate | up) -> out [T, I] = silu(gate) * up, silu rounded to T first.
template <typename T>
void silu_mul_kernel(const T* gate_up, T* out, int64_t tokens, int64_t I) {
  at::parallel_for(0, tokens, grain_for(I), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * I);
    float *g = buf.data(), *u = g + I;
    for (int64_t t = begin; t < end; ++t) {
      widen(gate_up + t * 2 * I, g, I);
      widen(gate_up + t * 2 * I + I, u, I);
      for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i]));
      round_through<T>(g, I);
      for (int64_t i = 0; i < I; ++i) g[i] *= u[i];
      narrow(g, out + t * I, I);
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  x = x.contiguous();
  check_rows(x, "x");
  check_rows(weight, "weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H, "weight must have x's last dimension");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              x.numel() / H, H, static_cast<float>(eps));
  });
  return out;
}

void rotary_(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor positions) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.size(1) * 2 == x.size(2), "x [T,H,D], cos/sin [P,D/2]");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "x's heads must be contiguous within a token");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && cos.scalar_type() == sin.scalar_type(), "one dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == x.size(0), "one int64 position per token");
  positions = positions.contiguous();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < x.size(0); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t], " outside the rotary table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    rotary_kernel<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                            positions.data_ptr<int64_t>(), x.size(0), x.size(1), x.size(2), x.stride(0));
  });
}

at::Tensor silu_mul(at::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up [T, 2I]");
  const int64_t I = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_kernel<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.size(0), I);
  });
  return out;
}
