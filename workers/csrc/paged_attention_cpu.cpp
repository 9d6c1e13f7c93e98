// Paged decode attention for the CPU: one query token per sequence, keys/values read in place from the
// block-paged cache (no gather copy).
//
// One task per sequence (or per (sequence, kv head) when there are too few sequences to feed the threads):
// the task walks the sequence's blocks once, each block one contiguous run of all its kv heads, scores each
// key row against every query head that shares its kv head (GQA reads each key once), folds the block into
// a running softmax (online max/denominator rescaling, as flash-decoding does) and accumulates the value
// rows the same way. With AVX-512 and head_dim 64/128 the rows go from the cache straight into registers
// (bf16 widened by a 16-bit shift); otherwise they are widened to fp32 buffers that plain, vectorizable
// loops read (the conversion through c10::BFloat16's operator float does not vectorize and made the first
// version of this kernel ~4x slower; see convert.h).
#include "aten.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "convert.h"

namespace {

using herd::widen;

// The running max before any score: finite, because the kernels are built with -ffast-math (which lets
// the compiler assume no infinities and is what gives it glibc's vectorized expf). exp(kNoScore - x) == 0.
constexpr float kNoScore = -3.0e38f;

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void scale_row(float alpha, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

#if defined(__AVX512F__)
#define HERD_AVX512 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <typename T>
constexpr bool kHasLoad16 = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

// scores[t] = q . k_t for the n key rows of one block (rows `stride` elements apart), D = kD, in registers.
template <int64_t kD, typename T>
inline void block_scores(const float* q, const T* k, int64_t stride, int64_t n, float* scores) {
  constexpr int64_t V = kD / 16;
  __m512 qv[V];
  for (int64_t i = 0; i < V; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  for (int64_t t = 0; t < n; ++t) {
    const T* kt = k + t * stride;
    __m512 acc = _mm512_mul_ps(qv[0], load16(kt));
    for (int64_t i = 1; i < V; ++i) acc = _mm512_fmadd_ps(qv[i], load16(kt + 16 * i), acc);
    scores[t] = _mm512_reduce_add_ps(acc);
  }
}

// acc = acc * correction + sum_t p[t] * v_t over the n value rows of one block, D = kD, in registers.
template <int64_t kD, typename T>
inline void block_accumulate(const float* p, const T* v, int64_t stride, int64_t n, float correction, float* acc) {
  constexpr int64_t V = kD / 16;
  __m512 a[V];
  const __m512 c = _mm512_set1_ps(correction);
  for (int64_t i = 0; i < V; ++i) a[i] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), c);
  for (int64_t t = 0; t < n; ++t) {
    const __m512 pt = _mm512_set1_ps(p[t]);
    const T* vt = v + t * stride;
    for (int64_t i = 0; i < V; ++i) a[i] = _mm512_fmadd_ps(pt, load16(vt + 16 * i), a[i]);
  }
  for (int64_t i = 0; i < V; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}
#endif

// Turns one block's raw scores s[0..n) into probabilities relative to the running max `m`, updates the
// running max and denominator `l`, and returns the factor the accumulated output must be rescaled by.
inline float online_softmax_update(float* s, int64_t n, float& m, float& l) {
  float block_max = kNoScore;
  for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, s[t]);
  const float new_max = std::max(m, block_max);
  const float correction = std::exp(m - new_max);  // 0 on the first block
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - new_max);
    sum += s[t];
  }
  l = l * correction + sum;
  m = new_max;
  return correction;
}

// kHeadDim > 0 fixes head_dim at compile time (the common 64 and 128: fully unrolled inner loops, and with
// AVX-512 the rows are read straight from the cache into registers); 0 reads it from `head_dim`.
template <typename T, int64_t kHeadDim>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* seq_lens,
                   T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t head_dim, int64_t BS, int64_t max_blocks,
                   float scale) {
#if defined(HERD_AVX512)
  constexpr bool kVector = kHeadDim > 0 && kHeadDim % 16 == 0 && kHasLoad16<T>;
#else
  constexpr bool kVector = false;
#endif
  const int64_t D = kHeadDim > 0 ? kHeadDim : head_dim;
  const int64_t G = Hq / Hkv;          // query heads per kv head
  const int64_t row = Hkv * D;         // one slot's keys (all kv heads): contiguous in the cache
  // A task is one sequence and a range of its kv heads. All heads of a sequence in one task read each cache
  // block as one contiguous run (prefetch-friendly); with few sequences, heads are split to feed every thread.
  const int64_t heads_per_task = B >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t tasks_per_seq = Hkv / heads_per_task;
  at::parallel_for(0, B * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    const int64_t H = heads_per_task * G;  // query heads of one task
    const int64_t width = heads_per_task * D;  // elements of one slot this task reads
    std::vector<float> qf(H * D), acc(H * D), rows(kVector ? 0 : 2 * BS * width), scores(BS), m(H), l(H);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq, kv0 = (task % tasks_per_seq) * heads_per_task, L = seq_lens[b];
      widen(q + (b * Hq + kv0 * G) * D, qf.data(), H * D);
      scale_row(scale, qf.data(), H * D);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNoScore);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t blk = 0; blk * BS < L; ++blk) {
        const int64_t n = std::min(BS, L - blk * BS);
        const int64_t first_slot = tables[b * max_blocks + blk] * BS;
        const T* kp = k_cache + first_slot * row + kv0 * D;
        const T* vp = v_cache + first_slot * row + kv0 * D;
        float* s = scores.data();
        if constexpr (kVector) {
#if defined(HERD_AVX512)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t off = (h / G) * D;
            block_scores<kHeadDim>(qf.data() + h * D, kp + off, row, n, s);
            const float correction = online_softmax_update(s, n, m[h], l[h]);
            block_accumulate<kHeadDim>(s, vp + off, row, n, correction, acc.data() + h * D);
          }
#endif
        } else {
          // Portable: widen the block's rows to fp32 once, then plain loops the compiler vectorizes.
          float* krows = rows.data();
          float* vrows = rows.data() + BS * width;
          for (int64_t t = 0; t < n; ++t) {
            widen(kp + t * row, krows + t * width, width);
            widen(vp + t * row, vrows + t * width, width);
          }
          for (int64_t h = 0; h < H; ++h) {
            const float* kh = krows + (h / G) * D;
            const float* vh = vrows + (h / G) * D;
            for (int64_t t = 0; t < n; ++t) s[t] = dot(qf.data() + h * D, kh + t * width, D);
            const float correction = online_softmax_update(s, n, m[h], l[h]);
            scale_row(correction, acc.data() + h * D, D);
            for (int64_t t = 0; t < n; ++t) axpy(s[t], vh + t * width, acc.data() + h * D, D);
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        T* op = out + (b * Hq + kv0 * G + h) * D;
        const float inv = 1.f / l[h];
        for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(acc[h * D + d] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,Hq,D], cache [blocks,block_size,Hkv,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the cache must have one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "block tables and sequence lengths must be int64");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = at::empty_like(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2), max_blocks = block_tables.size(1);
  TORCH_CHECK(seq_lens.numel() == B && block_tables.size(0) == B, "one block table and length per sequence");
  // The kernel reads raw pointers: a bad length or block id must be an error here, not a read out of bounds.
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * BS, "sequence ", b, " has length ", lens[b],
                " outside [1, ", max_blocks * BS, "]");
    for (int64_t blk = 0; blk * BS < lens[b]; ++blk) {
      const int64_t id = tables[b * max_blocks + blk];
      TORCH_CHECK(id >= 0 && id < k_cache.size(0), "block id ", id, " outside the cache");
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
             block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, Hq, Hkv, D,
             BS, max_blocks, static_cast<float>(scale));
    };
    if (D == 64) run(decode_kernel<scalar_t, 64>);
    else if (D == 128) run(decode_kernel<scalar_t, 128>);
    else run(decode_kernel<scalar_t, 0>);
  });
  return out;
}
