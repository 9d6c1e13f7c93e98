// Paged decode attention for the CPU: one query token per sequence, keys/values read in place from the
// block-paged cache (no gather copy), scores in fp32, OpenMP over (sequence, head).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

template <typename T>
static void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                          const int64_t* seq_lens, T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t BS, int64_t max_blocks, float scale) {
  const int64_t group = Hq / Hkv;
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hq, h = i % Hq, kvh = h / group, L = seq_lens[b];
      const T* qp = q + (b * Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qp[d]) * scale;
      scores.resize(L);
      float m = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = tables[b * max_blocks + t / BS] * BS + t % BS;
        const T* kp = k_cache + (slot * Hkv + kvh) * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qf[d] * static_cast<float>(kp[d]);
        scores[t] = s;
        m = s > m ? s : m;
      }
      float denom = 0.f;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t t = 0; t < L; ++t) {
        const float p = std::exp(scores[t] - m);
        denom += p;
        const int64_t slot = tables[b * max_blocks + t / BS] * BS + t % BS;
        const T* vp = v_cache + (slot * Hkv + kvh) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vp[d]);
      }
      T* op = out + (b * Hq + h) * D;
      const float inv = 1.f / denom;
      for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,Hq,D], cache [blocks,block_size,Hkv,D]");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2), max_blocks = block_tables.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                            B, Hq, Hkv, D, BS, max_blocks, static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
