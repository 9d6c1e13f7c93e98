// The Python module of herd's CPU kernels (compiled by workers/cpu_kernels.py).
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions);
torch::Tensor silu_mul(torch::Tensor gate_up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention over the block cache");
  m.def("rms_norm", &rms_norm, "RMSNorm as Hugging Face computes it (fp32 statistics)");
  m.def("rotary_", &rotary_, "rotary position embedding, in place, rotate-half layout");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over a fused [T, 2I] gate|up tensor");
}
