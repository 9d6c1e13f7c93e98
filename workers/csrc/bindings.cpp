// The Python module of herd's CPU kernels (compiled by workers/cpu_kernels.py).
// pybind11 with torch's tensor casters, not <torch/extension.h> (see aten.h): ~17 s to compile against ~47 s.
#include <torch/csrc/utils/pybind.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor seq_lens, double scale);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
void rotary_(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor positions);
at::Tensor silu_mul(at::Tensor gate_up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention over the block cache");
  m.def("rms_norm", &rms_norm, "RMSNorm as Hugging Face computes it (fp32 statistics)");
  m.def("rotary_", &rotary_, "rotary position embedding, in place, rotate-half layout");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over a fused [T, 2I] gate|up tensor");
}
