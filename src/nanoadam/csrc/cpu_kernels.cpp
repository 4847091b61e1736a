// Fused CPU kernels for NanoAdam: the sparse AdamW update and the chunked mask refresh.
//
// Plain C ABI (loaded with ctypes), no Python or torch headers, so it builds in a second with any
// C++17 compiler. The Python side (nanoadam/_cpu.py, nanoadam/functional.py) owns all validation
// and memory; these functions only read and write the buffers they are given. The eager PyTorch
// code in nanoadam/functional.py and nanoadam/selection.py is the reference these kernels are
// tested against.
//
// Layout of one sparse tensor's state (see nanoadam/selection.py): the flat tensor is cut into
// chunks of `chunk_size` entries; full chunks keep `k` entries each, the last partial chunk
// keeps `k_last`. `index` holds, per kept entry, the in-chunk position in its low
// `position_bits` bits and the entry's cohort (nanoadam/cohorts.py) in the 4 bits above (int16
// or int32), chunk-major and ascending inside a chunk, so the kept entries are in global
// ascending order and every pass over them walks memory forwards. `exp_avg`/`exp_avg_sq` are
// aligned with `index` and stored in bfloat16 (stochastically rounded) or float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NANO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NANO_CLONES
#endif

namespace {

constexpr int kCohorts = 16;

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The hash of nanoadam/rounding.py: murmur3's finalizer of (position ^ salt).
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t hash32(int64_t position, uint32_t salt) {
  const uint64_t p = static_cast<uint64_t>(position);
  return fmix32(static_cast<uint32_t>(p) ^ (static_cast<uint32_t>(p >> 32) * 0x9e3779b9u) ^ salt);
}

// float32 -> bfloat16 with stochastic rounding: add 16 random bits, truncate (unbiased). inf
// passes through; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16_stochastic(float f, uint32_t noise16) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t special = a > 0x7f800000u ? (u | 0x400000u) : u;  // NaN: quiet; inf: as it is
  return static_cast<uint16_t>((a >= 0x7f800000u ? special : u + noise16) >> 16);
}

inline float load_state(const void* p, int64_t i, int bytes) {
  return bytes == 2 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Stores a moment: bf16 rounded with `noise16`, or float32 as it is.
inline void store_state(void* p, int64_t i, int bytes, float x, uint32_t noise16) {
  if (bytes == 2)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16_stochastic(x, noise16);
  else
    static_cast<float*>(p)[i] = x;
}

// A stored index as an unsigned bit pattern (int16 values are two's complement).
inline uint32_t load_index(const void* p, int64_t i, int bytes) {
  return bytes == 2 ? static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i])
                    : static_cast<uint32_t>(static_cast<const int32_t*>(p)[i]);
}

inline void store_index(void* p, int64_t i, int bytes, uint32_t v) {
  if (bytes == 2)
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v);
  else
    static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
}

// Selection key: the order of |x| as an unsigned integer (the IEEE bit pattern of a non-negative
// float is monotone in its value, and NaN sorts above +inf). Smaller key = selected first.
inline uint32_t magnitude_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u & 0x7fffffffu;
}

enum KeySource : int32_t { SMALL_WEIGHTS = 0, LARGE_WEIGHTS = 1, LARGE_GRADIENTS = 2 };

inline uint32_t selection_key(float x, int32_t source) {
  uint32_t b = magnitude_bits(x);
  return source == SMALL_WEIGHTS ? b : 0x7fffffffu - b;
}

int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Sparse AdamW update: one pass over the kept entries of many tensors.
// ---------------------------------------------------------------------------------------------

// One tensor of an update: 64-bit words only, so that Python builds the whole task list as one
// int64 array. The hyperparameters are the same for every task of a call (one param group).
struct NanoUpdateTask {
  float* param;
  const float* grad;
  const void* index;
  void* exp_avg;
  void* exp_avg_sq;
  // Per cohort: 16 step sizes lr / (1 - beta1^age), then 16 values sqrt(1 - beta2^age).
  const float* cohort_table;
  int64_t numel;
  int64_t chunk_size;
  int64_t k;       // kept entries per full chunk
  int64_t k_last;  // kept entries in the last chunk when it is partial
  int64_t offset;  // global flat position of param[0] (FSDP2 shards): input of the rounding hash
  int64_t index_bytes;
  int64_t state_bytes;
  int64_t position_bits;
  int64_t seed;  // the parameter's ordinal in the optimizer: with the step, the rounding salt
};

struct NanoUpdateHyper {
  float decay;  // 1 - lr * weight_decay
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  uint32_t salt;  // per task, set by nano_sparse_adamw
};

// nanoadam.rounding.salt: the 32-bit salt of parameter `ordinal` at optimizer step `step`.
static uint32_t salt_of(int64_t ordinal, int64_t step, uint32_t stream) {
  uint32_t h = fmix32(static_cast<uint32_t>(ordinal) * 0x9e3779b9u + 0x5eedu);
  const uint64_t s = static_cast<uint64_t>(step);
  h = fmix32(h ^ static_cast<uint32_t>(s) ^ fmix32(static_cast<uint32_t>(s >> 32)));
  return fmix32(h ^ (stream * 0x632be5abu));
}

constexpr uint32_t kStreamMoments = 1;  // nanoadam.rounding.STREAM_MOMENTS

static int64_t kept_total(int64_t numel, int64_t chunk_size, int64_t k, int64_t k_last) {
  int64_t full = numel / chunk_size;
  return full * k + (numel % chunk_size ? k_last : 0);
}

// One run of kept entries inside one chunk: [j0, j1), their chunk starting at `base`, in three
// passes. The gathers (gradient, weight, the cohort's bias corrections) and the scatter of the new
// weights are scalar loops: hardware gathers are slower than scalar loads on several x86 cores
// (AMD Zen) and AVX2 has no scatter at all. The math, the rounding hash and the moment stores run
// over contiguous buffers in between and vectorize on every x86-64 level.
constexpr int64_t kRun = 256;

struct RunBuffers {
  alignas(64) float g[kRun];
  alignas(64) float w[kRun];
  alignas(64) float step_size[kRun];
  alignas(64) float bc2[kRun];
  alignas(64) uint32_t pos[kRun];
};

#if defined(__GNUC__) && !defined(__clang__)
#define NANO_NOVECTOR __attribute__((optimize("no-tree-vectorize")))
#else
#define NANO_NOVECTOR
#endif

// Entries ahead whose gradient and weight lines the gather prefetches (measured on MiniLM shapes:
// 7 % faster than none; 32 to 128 alike). The index is read ahead within the tensor's kept entries.
constexpr int64_t kPrefetch = 64;

template <int IB>
NANO_NOVECTOR static void gather_run(const NanoUpdateTask& t, const float* step_size, const float* bc2, int64_t j0,
                                     int64_t n, int64_t base, int64_t kept, RunBuffers& b) {
  const int pb = t.position_bits;
  const uint32_t pos_mask = (1u << pb) - 1u;
  const float* __restrict__ grad = t.grad + base;
  const float* __restrict__ param = t.param + base;
  const int64_t ahead_limit = kept - j0 - kPrefetch;  // r below it may read index j0 + r + kPrefetch
  for (int64_t r = 0; r < n; ++r) {
    if (r < ahead_limit) {  // the next chunk's entries prefetch lines of this one: harmless
      const uint32_t ahead = load_index(t.index, j0 + r + kPrefetch, IB) & pos_mask;
      __builtin_prefetch(grad + ahead);
      __builtin_prefetch(param + ahead, 1);
    }
    const uint32_t raw = load_index(t.index, j0 + r, IB);
    const uint32_t pos = raw & pos_mask, c = (raw >> pb) & (kCohorts - 1);
    b.pos[r] = pos;
    b.g[r] = grad[pos];
    b.w[r] = param[pos];
    b.step_size[r] = step_size[c];
    b.bc2[r] = bc2[c];
  }
}

NANO_NOVECTOR static void scatter_run(float* param, int64_t n, const RunBuffers& b) {
  for (int64_t r = 0; r < n; ++r) param[b.pos[r]] = b.w[r];
}

template <int SB, bool WIDE>
static inline void math_run(const NanoUpdateTask& t, const NanoUpdateHyper& hp, int64_t j0, int64_t n, int64_t base,
                            RunBuffers& b) {
  const float decay = hp.decay, omb1 = hp.one_minus_beta1, b2 = hp.beta2, omb2 = hp.one_minus_beta2;
  const float eps = hp.eps;
  const uint32_t salt = hp.salt;
  // The hash input is the global position offset + base + pos. Unless the chunk straddles a
  // multiple of 2^32 (WIDE: 64-bit arithmetic entry by entry), its high word is one constant and
  // its low word lo0 + pos, so the hash runs in 32-bit lanes.
  const int64_t first = t.offset + base;
  const uint32_t lo0 = static_cast<uint32_t>(static_cast<uint64_t>(first));
  const uint32_t hi_term = static_cast<uint32_t>(static_cast<uint64_t>(first) >> 32) * 0x9e3779b9u;
  // torch.lerp's two formulas: m + w (g - m) for w < 0.5, else g + (w - 1)(g - m); one fma with
  // chosen operands, so that no branch keeps the loop from vectorizing.
  const bool small_weight = omb1 < 0.5f;
  const float lerp_weight = small_weight ? omb1 : omb1 - 1.0f;
  float* __restrict__ wb = b.w;
  const float* __restrict__ gb = b.g;
  const float* __restrict__ ssb = b.step_size;
  const float* __restrict__ bcb = b.bc2;
  const uint32_t* __restrict__ pos = b.pos;
#pragma omp simd
  for (int64_t r = 0; r < n; ++r) {
    const int64_t j = j0 + r;
    const float g = gb[r];
    const float w = wb[r] * decay;
    float m = load_state(t.exp_avg, j, SB);
    float v = load_state(t.exp_avg_sq, j, SB);
    // The rounding of torch.optim.AdamW's single-tensor path on CPU, operation by operation
    // (lerp and addcmul are fused multiply-adds there, addcdiv is self + (value * t1) / t2),
    // with the bias corrections of the entry's cohort.
    m = std::fma(lerp_weight, g - m, small_weight ? m : g);
    v = std::fma(omb2 * g, g, v * b2);
    const float denom = std::sqrt(v) / bcb[r] + eps;
    wb[r] = w + (ssb[r] * m) / denom;
    if (SB == 2) {
      const uint32_t h = WIDE ? hash32(first + pos[r], salt) : fmix32((lo0 + pos[r]) ^ hi_term ^ salt);
      static_cast<uint16_t*>(t.exp_avg)[j] = f32_to_bf16_stochastic(m, h & 0xffffu);
      static_cast<uint16_t*>(t.exp_avg_sq)[j] = f32_to_bf16_stochastic(v, h >> 16);
    } else {
      static_cast<float*>(t.exp_avg)[j] = m;
      static_cast<float*>(t.exp_avg_sq)[j] = v;
    }
  }
}

template <int IB, int SB>
NANO_CLONES static void update_span(const NanoUpdateTask& t, const NanoUpdateHyper& hp, int64_t begin, int64_t end) {
  const int64_t k = t.k, cs = t.chunk_size, full_kept = (t.numel / cs) * k;
  float step_size[kCohorts], bc2[kCohorts];
  for (int c = 0; c < kCohorts; ++c) {
    step_size[c] = -t.cohort_table[c];
    bc2[c] = t.cohort_table[kCohorts + c];
  }
  RunBuffers buffers;
  const int64_t kept = kept_total(t.numel, cs, k, t.k_last);
  int64_t i = begin;
  while (i < end) {
    const int64_t chunk = i < full_kept ? i / k : t.numel / cs;
    const int64_t stop = std::min({end, i < full_kept ? (chunk + 1) * k : end, i + kRun});
    const int64_t base = chunk * cs, n = stop - i;
    gather_run<IB>(t, step_size, bc2, i, n, base, kept, buffers);
    const uint64_t first = static_cast<uint64_t>(t.offset + base);
    if ((first >> 32) == ((first + static_cast<uint64_t>(cs)) >> 32))
      math_run<SB, false>(t, hp, i, n, base, buffers);
    else
      math_run<SB, true>(t, hp, i, n, base, buffers);
    scatter_run(t.param + base, n, buffers);
    i = stop;
  }
}

static void update_dispatch(const NanoUpdateTask& t, const NanoUpdateHyper& hp, int64_t begin, int64_t end) {
  if (t.index_bytes == 2) {
    if (t.state_bytes == 2)
      update_span<2, 2>(t, hp, begin, end);
    else
      update_span<2, 4>(t, hp, begin, end);
  } else {
    if (t.state_bytes == 2)
      update_span<4, 2>(t, hp, begin, end);
    else
      update_span<4, 4>(t, hp, begin, end);
  }
}

// Applies the update to every task. Work is split into equal spans of kept entries across
// threads, independent of tensor boundaries, so a few large tensors and many small ones both
// keep every thread busy.
extern "C" void nano_sparse_adamw(const NanoUpdateTask* tasks, int64_t n_tasks, int32_t n_threads, float decay,
                                  float one_minus_beta1, float beta2, float one_minus_beta2, float eps, int64_t step) {
  std::vector<int64_t> offset(n_tasks + 1, 0);
  for (int64_t i = 0; i < n_tasks; ++i)
    offset[i + 1] = offset[i] + kept_total(tasks[i].numel, tasks[i].chunk_size, tasks[i].k, tasks[i].k_last);
  const int64_t total = offset[n_tasks];
  if (total == 0) return;
  int nt = resolve_threads(n_threads);
  if (total < 32768) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    const int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth;
    int64_t task = std::upper_bound(offset.begin(), offset.end(), lo) - offset.begin() - 1;
    for (int64_t pos = lo; pos < hi && task < n_tasks; ++task) {
      const int64_t b = pos - offset[task];
      const int64_t e = std::min(hi, offset[task + 1]) - offset[task];
      const NanoUpdateHyper hp{decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                               salt_of(tasks[task].seed, step, kStreamMoments)};
      if (e > b) update_dispatch(tasks[task], hp, b, e);
      pos = offset[task + 1];
    }
  }
}

extern "C" uint32_t nano_salt(int64_t ordinal, int64_t step, uint32_t stream) { return salt_of(ordinal, step, stream); }

// ---------------------------------------------------------------------------------------------
// Mask refresh: per chunk, the k entries of smallest key, ties broken by lower position.
// ---------------------------------------------------------------------------------------------

struct NanoRefreshTask {
  const float* param;
  const float* grad;  // gradient at this step: keys for LARGE_GRADIENTS
  int64_t numel;
  int64_t chunk_size;
  // The mask being replaced (old_k < 0: none). Same chunk_size as the new one. The new mask
  // may alias it (same pointers, same layout): then it is updated in place.
  const void* old_index;
  const void* old_exp_avg;
  const void* old_exp_avg_sq;
  int64_t old_k;
  int64_t old_k_last;
  // The new mask, written here.
  void* index;
  void* exp_avg;
  void* exp_avg_sq;
  int64_t k;
  int64_t k_last;
  int64_t offset;  // global flat position of param[0]: input of the rounding hash
  int32_t old_index_bytes;
  int32_t index_bytes;
  int32_t state_bytes;  // of both old and new moments
  int32_t position_bits;
  int32_t key_source;
  // Nonzero: the old mask may be used as a filter (requires old_k >= k, old_k_last >= k_last).
  int32_t filter_with_old_mask;
  int32_t newborn;  // cohort of newly selected entries
  // Kept entries of cohort merge_young (-1: no merge) join merge_old, moments multiplied by the
  // factors (bf16 rounded stochastically with merge_salt).
  int32_t merge_young;
  int32_t merge_old;
  float merge_m_factor;
  float merge_v_factor;
  uint32_t merge_salt;
};

// Composite key: selection key in the high half, position in the low half, so that
// "smallest composite" is exactly "smallest key, then lowest position" and all keys are distinct.
static inline uint64_t composite(uint32_t key, int64_t pos) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(pos);
}

struct RefreshScratch {
  std::vector<int32_t> cand;  // candidate positions, ascending
  std::vector<uint32_t> keys;
  std::vector<int32_t> doubt;
  std::vector<uint32_t> work;
};

// Positions j in [0, length) whose key is <= bound, appended in ascending order; returns the
// count. `out` needs room for length + 16 entries.
static int64_t scan_scalar(const float* src, int64_t length, int32_t source, uint32_t bound, int32_t* out) {
  int64_t n = 0;
  for (int64_t j = 0; j < length; ++j) {
    out[n] = static_cast<int32_t>(j);
    n += selection_key(src[j], source) <= bound;
  }
  return n;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx512f"))) static int64_t scan_avx512(const float* src, int64_t length, int32_t source,
                                                              uint32_t bound, int32_t* out) {
  // key <= bound  <=>  bits in [lo, hi] (bits = |x| as uint32; the large_* keys are reversed).
  const bool all = bound >= 0x7fffffffu;
  const uint32_t lo = all || source == SMALL_WEIGHTS ? 0u : 0x7fffffffu - bound;
  const uint32_t hi = all ? 0xffffffffu : source == SMALL_WEIGHTS ? bound : 0x7fffffffu;
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), vlo = _mm512_set1_epi32(static_cast<int32_t>(lo)),
                vhi = _mm512_set1_epi32(static_cast<int32_t>(hi)), sixteen = _mm512_set1_epi32(16);
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0, j = 0;
  for (; j + 16 <= length; j += 16) {
    const __m512i bits = _mm512_and_si512(_mm512_loadu_si512(src + j), abs_mask);
    const __mmask16 m = _mm512_cmple_epu32_mask(bits, vhi) & _mm512_cmpge_epu32_mask(bits, vlo);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(m, pos));
    n += __builtin_popcount(m);
    pos = _mm512_add_epi32(pos, sixteen);
  }
  for (; j < length; ++j) {
    out[n] = static_cast<int32_t>(j);
    n += selection_key(src[j], source) <= bound;
  }
  return n;
}
static const bool has_avx512 = __builtin_cpu_supports("avx512f");
#endif

static int64_t scan_bounded(const float* src, int64_t length, int32_t source, uint32_t bound, int32_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx512) return scan_avx512(src, length, source, bound, out);
#endif
  return scan_scalar(src, length, source, bound, out);
}

// A key bound with at least kn keys at or below it, from the kept entries of the old mask: every
// entry above the kn-th smallest old kept key has kn entries ahead of it. Between two refreshes
// only kept entries move, so few others fall under this bound.
static inline int64_t old_position(const NanoRefreshTask& t, int64_t i) {
  return static_cast<int64_t>(load_index(t.old_index, i, t.old_index_bytes) & ((1u << t.position_bits) - 1u));
}

static uint32_t bound_from_old_mask(const NanoRefreshTask& t, const float* src, int64_t chunk, int64_t kn,
                                    RefreshScratch& s) {
  const int64_t full = t.numel / t.chunk_size;
  const int64_t ko = chunk < full ? t.old_k : t.old_k_last, o0 = chunk * t.old_k;
  if (kn == ko) {
    uint32_t bound = 0;
    for (int64_t i = 0; i < ko; ++i)
      bound = std::max(bound, selection_key(src[old_position(t, o0 + i)], t.key_source));
    return bound;
  }
  s.work.resize(ko);
  for (int64_t i = 0; i < ko; ++i)
    s.work[i] = selection_key(src[old_position(t, o0 + i)], t.key_source);
  std::nth_element(s.work.begin(), s.work.begin() + (kn - 1), s.work.end());
  return static_cast<uint32_t>(s.work[kn - 1]);
}

// Keeps, of n candidates (ascending positions, their keys alongside), the kn with the smallest
// (key, position) and writes them in order to `chosen` (which has one spare slot). Radix
// selection on the key: each round histograms the 8 highest bits in which the keys still in doubt
// differ, which finds the bucket of the kn-th key; keys in lower buckets are kept, keys in higher
// ones dropped, the bucket itself stays in doubt. A round costs a pass over the keys in doubt and
// usually leaves a few dozen, so the cut is O(n).
static void radix_cut(const int32_t* cand, const uint32_t* keys, int64_t n, int64_t kn, RefreshScratch& s,
                      int32_t* chosen) {
  s.doubt.resize(n + 1);
  int32_t* doubt = s.doubt.data();  // indices into cand/keys
  for (int64_t i = 0; i < n; ++i) doubt[i] = static_cast<int32_t>(i);
  int64_t n_doubt = n, need = kn;
  uint32_t prefix = 0, prefix_mask = 0;  // keys in doubt agree with `prefix` on `prefix_mask`
  bool whole_bucket = false;
  while (true) {
    uint32_t all_and = 0xffffffffu, all_or = 0;
    for (int64_t i = 0; i < n_doubt; ++i) {
      all_and &= keys[doubt[i]];
      all_or |= keys[doubt[i]];
    }
    if (all_and == all_or) {  // equal keys: the lowest positions win the tie
      prefix = all_and;
      prefix_mask = 0xffffffffu;
      break;
    }
    const int high = 31 - __builtin_clz(all_and ^ all_or);
    const int shift = std::max(0, high - 7);
    uint32_t hist[4][256] = {};  // four interleaved copies break store-to-load chains
    int64_t i = 0;
    for (; i + 4 <= n_doubt; i += 4)
      for (int c = 0; c < 4; ++c) ++hist[c][(keys[doubt[i + c]] >> shift) & 0xffu];
    for (; i < n_doubt; ++i) ++hist[0][(keys[doubt[i]] >> shift) & 0xffu];
    uint32_t digit = 0;
    int64_t below = 0;
    for (;; ++digit) {
      const int64_t h = static_cast<int64_t>(hist[0][digit]) + hist[1][digit] + hist[2][digit] + hist[3][digit];
      if (below + h >= need) break;
      below += h;
    }
    need -= below;
    prefix = (all_and & ~((2u << high) - 1)) | (digit << shift);
    prefix_mask = ~((1u << shift) - 1);
    int64_t m = 0;  // branch-free filtering: which entries stay in doubt is unpredictable
    for (int64_t j = 0; j < n_doubt; ++j) {
      const int32_t e = doubt[j];
      doubt[m] = e;
      m += ((keys[e] >> shift) & 0xffu) == digit;
    }
    n_doubt = m;
    if (n_doubt == need) {
      whole_bucket = true;
      break;
    }
  }
  int64_t m = 0;
  if (whole_bucket) {  // keep every key up to the top of the threshold bucket
    const uint32_t top = prefix | ~prefix_mask;
    for (int64_t i = 0; i < n; ++i) {
      chosen[m] = cand[i];
      m += keys[i] <= top;
    }
    return;
  }
  // Keys below the (single) threshold key, and the `need` lowest positions holding it.
  int64_t ties = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool tie = keys[i] == prefix;
    chosen[m] = cand[i];
    m += keys[i] < prefix || (tie && ties < need);
    ties += tie;
  }
}

// Writes to `chosen` the kn entries of one chunk with the smallest (key, position), ascending.
// With an old mask to filter by, only entries under its bound are candidates (usually a few more
// than kn, cut by a small top-`extra` search); otherwise every entry is.
NANO_CLONES static void select_chunk(const NanoRefreshTask& t, int64_t chunk, int64_t length, int64_t kn,
                                     RefreshScratch& s, int32_t* chosen) {
  const float* src = (t.key_source == LARGE_GRADIENTS ? t.grad : t.param) + chunk * t.chunk_size;
  const int32_t source = t.key_source;
  s.cand.resize(length + 16);
  int32_t* cand = s.cand.data();
  int64_t n = length;
  if (t.filter_with_old_mask && t.old_k >= 0) {
    n = scan_bounded(src, length, source, bound_from_old_mask(t, src, chunk, kn, s), cand);
  } else {
    for (int64_t j = 0; j < length; ++j) cand[j] = static_cast<int32_t>(j);
  }
  const int64_t extra = n - kn;
  if (extra == 0) {
    std::memcpy(chosen, cand, sizeof(int32_t) * kn);
    return;
  }
  s.keys.resize(n);
  uint32_t* keys = s.keys.data();
  for (int64_t i = 0; i < n; ++i) keys[i] = selection_key(src[cand[i]], source);
  if (extra > 32) {
    radix_cut(cand, keys, n, kn, s, chosen);
    return;
  }
  // Few extra candidates: find the `extra` largest (key, position) and keep everything below.
  uint64_t top[32];  // ascending
  for (int64_t i = 0; i < extra; ++i) top[i] = composite(keys[i], cand[i]);
  std::sort(top, top + extra);
  for (int64_t i = extra; i < n; ++i) {
    const uint64_t x = composite(keys[i], cand[i]);
    if (x <= top[0]) continue;
    int64_t q = 0;
    while (q + 1 < extra && top[q + 1] < x) {
      top[q] = top[q + 1];
      ++q;
    }
    top[q] = x;
  }
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    chosen[m] = cand[i];
    m += composite(keys[i], cand[i]) < top[0];
  }
}

// The moments of a kept entry of cohort merge_young, rescaled as it joins merge_old.
static void merge_entry(const NanoRefreshTask& t, int64_t global_position, uint16_t* m, uint16_t* v) {
  const uint32_t h = hash32(t.offset + global_position, t.merge_salt);
  *m = f32_to_bf16_stochastic(bf16_to_f32(*m) * t.merge_m_factor, h & 0xffffu);
  *v = f32_to_bf16_stochastic(bf16_to_f32(*v) * t.merge_v_factor, h >> 16);
}

static void merge_entry(const NanoRefreshTask& t, int64_t, float* m, float* v) {
  *m *= t.merge_m_factor;
  *v *= t.merge_v_factor;
}

// The new mask of one chunk from its chosen positions: kept entries bring their moments and
// cohort (after the merge), new ones start from zero in the newborn cohort.
template <typename StateT>
static void merge_moments(const NanoRefreshTask& t, int64_t base, const int32_t* chosen, int64_t kn,
                          const int32_t* old_pos, const uint32_t* old_cohort, const StateT* old_m,
                          const StateT* old_v, int64_t ko, int64_t n0, int64_t length, std::vector<int32_t>& slot) {
  // slot[position] = where that position sat in the old mask, or -1: a branch-free lookup (whether
  // an entry is new is as unpredictable as a coin flip right after large moves).
  if (static_cast<int64_t>(slot.size()) < length) slot.assign(length, -1);
  for (int64_t i = 0; i < ko; ++i) slot[old_pos[i]] = static_cast<int32_t>(i);
  StateT* m = static_cast<StateT*>(t.exp_avg) + n0;
  StateT* v = static_cast<StateT*>(t.exp_avg_sq) + n0;
  const StateT zero{};  // +0.0 in bf16 bits and in float32
  const int pb = t.position_bits;
  for (int64_t j = 0; j < kn; ++j) {
    const int32_t p = chosen[j];
    const int32_t i = slot[p];
    const int32_t at = i < 0 ? 0 : i;
    uint32_t cohort = i < 0 ? static_cast<uint32_t>(t.newborn) : old_cohort[at];
    m[j] = i < 0 ? zero : old_m[at];
    v[j] = i < 0 ? zero : old_v[at];
    if (i >= 0 && static_cast<int32_t>(cohort) == t.merge_young) {
      cohort = static_cast<uint32_t>(t.merge_old);
      merge_entry(t, base + p, &m[j], &v[j]);
    }
    store_index(t.index, n0 + j, t.index_bytes, static_cast<uint32_t>(p) | (cohort << pb));
  }
  for (int64_t i = 0; i < ko; ++i) slot[old_pos[i]] = -1;
}

// The mask of one chunk is unchanged: only the merge, if any, relabels and rescales entries.
template <typename StateT>
static void merge_in_place(const NanoRefreshTask& t, int64_t base, int64_t n0, int64_t kn) {
  if (t.merge_young < 0) return;
  StateT* m = static_cast<StateT*>(t.exp_avg) + n0;
  StateT* v = static_cast<StateT*>(t.exp_avg_sq) + n0;
  const int pb = t.position_bits;
  const uint32_t pos_mask = (1u << pb) - 1u;
  for (int64_t j = 0; j < kn; ++j) {
    const uint32_t raw = load_index(t.index, n0 + j, t.index_bytes);
    if (static_cast<int32_t>((raw >> pb) & (kCohorts - 1)) != t.merge_young) continue;
    merge_entry(t, base + (raw & pos_mask), &m[j], &v[j]);
    store_index(t.index, n0 + j, t.index_bytes, (raw & pos_mask) | (static_cast<uint32_t>(t.merge_old) << pb));
  }
}

struct OldChunk {
  std::vector<int32_t> pos;
  std::vector<uint32_t> cohort;
  std::vector<uint8_t> m, v;
  std::vector<int32_t> slot;
};

static void refresh_chunk(const NanoRefreshTask& t, int64_t chunk, RefreshScratch& s, std::vector<int32_t>& chosen,
                          OldChunk& old) {
  const int64_t cs = t.chunk_size, full = t.numel / cs, base = chunk * cs;
  const int64_t length = std::min(cs, t.numel - base);
  const int64_t kn = chunk < full ? t.k : t.k_last;
  chosen.resize(kn + 1);
  select_chunk(t, chunk, length, kn, s, chosen.data());

  int64_t ko = 0, o0 = 0;
  if (t.old_k >= 0) {
    ko = chunk < full ? t.old_k : t.old_k_last;
    o0 = chunk * t.old_k;
  }
  // The new mask may be written over the old one (same layout): snapshot the old chunk first.
  const int sb = t.state_bytes, pb = t.position_bits;
  const int64_t n0 = chunk * t.k;
  old.pos.resize(ko);
  old.cohort.resize(ko);
  for (int64_t i = 0; i < ko; ++i) {
    const uint32_t raw = load_index(t.old_index, o0 + i, t.old_index_bytes);
    old.pos[i] = static_cast<int32_t>(raw & ((1u << pb) - 1u));
    old.cohort[i] = (raw >> pb) & (kCohorts - 1);
  }
  const bool in_place = t.index == t.old_index;
  if (in_place && kn == ko && std::equal(chosen.begin(), chosen.begin() + kn, old.pos.begin())) {
    if (sb == 2)
      merge_in_place<uint16_t>(t, base, n0, kn);
    else
      merge_in_place<float>(t, base, n0, kn);
    return;
  }
  old.m.resize(ko * sb);
  old.v.resize(ko * sb);
  if (ko) {
    std::memcpy(old.m.data(), static_cast<const uint8_t*>(t.old_exp_avg) + o0 * sb, ko * sb);
    std::memcpy(old.v.data(), static_cast<const uint8_t*>(t.old_exp_avg_sq) + o0 * sb, ko * sb);
  }
  if (sb == 2)
    merge_moments(t, base, chosen.data(), kn, old.pos.data(), old.cohort.data(),
                  reinterpret_cast<const uint16_t*>(old.m.data()), reinterpret_cast<const uint16_t*>(old.v.data()),
                  ko, n0, length, old.slot);
  else
    merge_moments(t, base, chosen.data(), kn, old.pos.data(), old.cohort.data(),
                  reinterpret_cast<const float*>(old.m.data()), reinterpret_cast<const float*>(old.v.data()), ko,
                  n0, length, old.slot);
}

extern "C" void nano_refresh(const NanoRefreshTask* tasks, int64_t n_tasks, int32_t n_threads) {
  std::vector<int64_t> first_chunk(n_tasks + 1, 0);
  for (int64_t i = 0; i < n_tasks; ++i) {
    const int64_t cs = tasks[i].chunk_size;
    first_chunk[i + 1] = first_chunk[i] + (tasks[i].numel + cs - 1) / cs;
  }
  const int64_t total = first_chunk[n_tasks];
  if (total == 0) return;
  int nt = resolve_threads(n_threads);
  if (total < 4) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    RefreshScratch scratch;
    std::vector<int32_t> chosen;
    OldChunk old;
#pragma omp for schedule(dynamic, 8)
    for (int64_t c = 0; c < total; ++c) {
      const int64_t task = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      refresh_chunk(tasks[task], c - first_chunk[task], scratch, chosen, old);
    }
  }
}

extern "C" int32_t nano_abi_version(void) { return 4; }

