// Training-mode batch normalization over the last axis of NHWC activations, optionally followed by a
// ReLU, as XLA FFI custom calls (see jaxft/cpu/onednn.py, batch_norm_train):
//   jaxft_bn_fwd  (x, scale, shift) -> (y, mean, biased var)      y = [relu]((x - mean) * a + shift)
//   jaxft_bn_bwd  (x, dy, scale, shift, mean, var) -> (dx, dscale, dshift)
// with a = scale / sqrt(var + epsilon). x, y, dy, dx are all float32 or all bfloat16; scale, shift and
// the statistics are float32, and all arithmetic is float32 (sums of chunks in double).
//
// Why hand-written and not oneDNN's batch normalization (which jaxft used before): on bfloat16 these
// passes are memory-bound, and oneDNN 2.6's kernels ran at about half the machine's bandwidth
// (a [32, 56, 56, 256] bfloat16 tensor, 2 threads, AMD Zen 4: forward 11.4 ms vs 5.9 ms here,
// backward 19.3 ms vs 7.9 ms; docs/benchmarks.md, "BatchNorm by hand"). Each pass here touches memory
// the minimum number of times: the forward reads x once for the statistics (each chunk of rows is
// read twice while it sits in cache, for a two-pass mean and variance) and once to normalise; the
// backward reads x and dy once for its two channel sums and once for dx. The ReLU costs nothing: the
// forward applies it before the store, and the backward recomputes its mask from x (no mask is
// stored), so neither XLA's ReLU pass nor its ReLU-gradient pass remains.
//
// Results do not depend on the number of threads or on timing: rows are split into fixed chunks, each
// chunk's sums go to its own slot, and the slots are merged in chunk order (Chan et al.'s pairwise
// update for mean and variance). The ReLU mask of the backward pass is the forward's own decision:
// both evaluate (x - mean) * a + shift with the same float32 operations (the library is built with
// -ffp-contract=off, so neither is fused into an FMA differently). Inputs are never written.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxft {
std::mutex& RunMutex();  // onednn_conv.cc: one multi-threaded kernel at a time
}  // namespace jaxft

namespace {

// GCC builds each loop for AVX-512, AVX2 and plain x86-64 and picks one at load time; Clang does not
// take target_clones on templates, so there the loops are built for the default target only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define JAXFT_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JAXFT_SIMD
#endif

inline float Load(const float* p, int64_t j) { return p[j]; }
inline float Load(const uint16_t* p, int64_t j) {  // bfloat16: the high half of a float32
  uint32_t u = static_cast<uint32_t>(p[j]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void Store(float* p, int64_t j, float v) { p[j] = v; }
inline void Store(uint16_t* p, int64_t j, float v) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  p[j] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// Rows per chunk: about 128 KB of bfloat16, so that the statistics' second pass over a chunk reads
// the cache, not memory; at most 4096, so that a chunk's float32 sums stay short for few channels.
int64_t ChunkRows(int64_t c) { return std::min<int64_t>(4096, std::max<int64_t>(1, 65536 / c)); }

// One chunk's mean and sum of squared deviations, per channel.
template <typename T>
JAXFT_SIMD void ChunkMoments(const T* x, int64_t rows, int64_t c, float* mean, float* m2) {
  for (int64_t j = 0; j < c; ++j) mean[j] = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = x + r * c;
    for (int64_t j = 0; j < c; ++j) mean[j] += Load(p, j);
  }
  const float inv = 1.f / static_cast<float>(rows);
  for (int64_t j = 0; j < c; ++j) {
    mean[j] *= inv;
    m2[j] = 0.f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = x + r * c;
    for (int64_t j = 0; j < c; ++j) {
      const float d = Load(p, j) - mean[j];
      m2[j] += d * d;
    }
  }
}

template <typename T>
JAXFT_SIMD void Normalize(const T* x, T* y, int64_t rows, int64_t c, const float* mean,
                          const float* a, const float* shift, bool relu) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = x + r * c;
    T* q = y + r * c;
    if (relu) {
      for (int64_t j = 0; j < c; ++j) {
        const float v = (Load(p, j) - mean[j]) * a[j] + shift[j];
        Store(q, j, v < 0.f ? 0.f : v);  // NaN stays NaN (jnp.maximum's), so divergence shows
      }
    } else {
      for (int64_t j = 0; j < c; ++j) Store(q, j, (Load(p, j) - mean[j]) * a[j] + shift[j]);
    }
  }
}

// One chunk's Σ dy' and Σ dy' (x - mean), dy' being dy masked by the forward's ReLU.
template <typename T>
JAXFT_SIMD void ChunkGradSums(const T* x, const T* dy, int64_t rows, int64_t c, const float* mean,
                              const float* a, const float* shift, bool relu, float* s1, float* s2) {
  for (int64_t j = 0; j < c; ++j) s1[j] = s2[j] = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = x + r * c;
    const T* g = dy + r * c;
    for (int64_t j = 0; j < c; ++j) {
      const float d = Load(p, j) - mean[j];
      float gj = Load(g, j);
      if (relu) gj = d * a[j] + shift[j] > 0.f ? gj : 0.f;
      s1[j] += gj;
      s2[j] += gj * d;
    }
  }
}

// dx = dy' a + (x - mean) k2 + k3 per channel (the closed-form BatchNorm VJP, coefficients folded).
template <typename T>
JAXFT_SIMD void InputGrad(const T* x, const T* dy, T* dx, int64_t rows, int64_t c, const float* mean,
                          const float* a, const float* shift, const float* k2, const float* k3,
                          bool relu) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = x + r * c;
    const T* g = dy + r * c;
    T* q = dx + r * c;
    for (int64_t j = 0; j < c; ++j) {
      const float d = Load(p, j) - mean[j];
      float gj = Load(g, j);
      if (relu) gj = d * a[j] + shift[j] > 0.f ? gj : 0.f;
      Store(q, j, gj * a[j] + d * k2[j] + k3[j]);
    }
  }
}

std::vector<float> Multipliers(const float* scale, const float* var, float epsilon, int64_t c) {
  std::vector<float> a(c);
  for (int64_t j = 0; j < c; ++j) a[j] = scale[j] / std::sqrt(var[j] + epsilon);
  return a;
}

template <typename T>
void Forward(const T* x, T* y, int64_t m, int64_t c, const float* scale, const float* shift,
             float epsilon, bool relu, float* mean, float* var) {
  const int64_t rows = ChunkRows(c), chunks = (m + rows - 1) / rows;
  std::vector<float> cmean(chunks * c), cm2(chunks * c);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t r0 = k * rows;
    ChunkMoments(x + r0 * c, std::min(rows, m - r0), c, &cmean[k * c], &cm2[k * c]);
  }
  std::vector<double> mu(c, 0.0), q(c, 0.0);
  double n = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {  // Chan et al.: merge chunk k (nb rows) into the first n
    const double nb = static_cast<double>(std::min(rows, m - k * rows)), total = n + nb;
    const double f = nb / total, g = n * nb / total;
    for (int64_t j = 0; j < c; ++j) {
      const double d = cmean[k * c + j] - mu[j];
      mu[j] += d * f;
      q[j] += cm2[k * c + j] + d * d * g;
    }
    n = total;
  }
  for (int64_t j = 0; j < c; ++j) {
    mean[j] = static_cast<float>(mu[j]);
    var[j] = static_cast<float>(q[j] / n);
  }
  const std::vector<float> a = Multipliers(scale, var, epsilon, c);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t r0 = k * rows;
    Normalize(x + r0 * c, y + r0 * c, std::min(rows, m - r0), c, mean, a.data(), shift, relu);
  }
}

template <typename T>
void Backward(const T* x, const T* dy, T* dx, int64_t m, int64_t c, const float* scale,
              const float* shift, const float* mean, const float* var, float epsilon, bool relu,
              float* dscale, float* dshift) {
  const int64_t rows = ChunkRows(c), chunks = (m + rows - 1) / rows;
  const std::vector<float> a = Multipliers(scale, var, epsilon, c);
  std::vector<float> cs1(chunks * c), cs2(chunks * c);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t r0 = k * rows;
    ChunkGradSums(x + r0 * c, dy + r0 * c, std::min(rows, m - r0), c, mean, a.data(), shift, relu,
                  &cs1[k * c], &cs2[k * c]);
  }
  std::vector<float> k2(c), k3(c);
  for (int64_t j = 0; j < c; ++j) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      s1 += cs1[k * c + j];
      s2 += cs2[k * c + j];
    }
    const double rstd = 1.0 / std::sqrt(static_cast<double>(var[j]) + epsilon);
    dshift[j] = static_cast<float>(s1);
    dscale[j] = static_cast<float>(s2 * rstd);
    k2[j] = static_cast<float>(-a[j] * rstd * rstd * s2 / m);
    k3[j] = static_cast<float>(-a[j] * s1 / m);
  }
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t r0 = k * rows;
    InputGrad(x + r0 * c, dy + r0 * c, dx + r0 * c, std::min(rows, m - r0), c, mean, a.data(), shift,
              k2.data(), k3.data(), relu);
  }
}

using Vec = ffi::Buffer<ffi::F32, 1>;

// x and its same-shaped companions: NHWC, one float type; every per-channel vector has C entries.
ffi::Error Check(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> same,
                 std::initializer_list<int64_t> vectors, int64_t* m, int64_t* c) {
  auto xd = x.dimensions();
  if (xd.size() != 4) return ffi::Error::InvalidArgument("x must be NHWC");
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  }
  for (const ffi::AnyBuffer* b : same) {
    auto bd = b->dimensions();
    if (b->element_type() != x.element_type() || bd.size() != 4 ||
        !std::equal(bd.begin(), bd.end(), xd.begin())) {
      return ffi::Error::InvalidArgument("x, y and their gradients must have one shape and type");
    }
  }
  *c = xd[3];
  *m = xd[0] * xd[1] * xd[2];
  for (int64_t v : vectors) {
    if (v != *c) return ffi::Error::InvalidArgument("per-channel arrays must have C entries");
  }
  if (*m < 1 || *c < 1) return ffi::Error::InvalidArgument("x must not be empty");
  return ffi::Error::Success();
}

// Calls f with a null pointer of the element type (bfloat16 as its bits) that Check accepted for t.
template <typename F>
void WithElementType(ffi::DataType t, F f) {
  if (t == ffi::DataType::BF16) {
    f(static_cast<uint16_t*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr));
  }
}

ffi::Error NormForward(ffi::AnyBuffer x, Vec scale, Vec shift, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<Vec> mean, ffi::Result<Vec> var, float epsilon, int64_t relu) {
  int64_t m, c;
  if (auto e = Check(x, {&*y}, {scale.dimensions()[0], shift.dimensions()[0],
                                mean->dimensions()[0], var->dimensions()[0]}, &m, &c);
      e.failure()) {
    return e;
  }
  std::lock_guard<std::mutex> run_lock(jaxft::RunMutex());
  WithElementType(x.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    Forward(static_cast<const T*>(x.untyped_data()), static_cast<T*>(y->untyped_data()), m, c,
            scale.typed_data(), shift.typed_data(), epsilon, relu != 0, mean->typed_data(),
            var->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error NormBackward(ffi::AnyBuffer x, ffi::AnyBuffer dy, Vec scale, Vec shift, Vec mean, Vec var,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<Vec> dscale,
                        ffi::Result<Vec> dshift, float epsilon, int64_t relu) {
  int64_t m, c;
  if (auto e = Check(x, {&dy, &*dx}, {scale.dimensions()[0], shift.dimensions()[0],
                                      mean.dimensions()[0], var.dimensions()[0],
                                      dscale->dimensions()[0], dshift->dimensions()[0]}, &m, &c);
      e.failure()) {
    return e;
  }
  std::lock_guard<std::mutex> run_lock(jaxft::RunMutex());
  WithElementType(x.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    Backward(static_cast<const T*>(x.untyped_data()), static_cast<const T*>(dy.untyped_data()),
             static_cast<T*>(dx->untyped_data()), m, c, scale.typed_data(), shift.typed_data(),
             mean.typed_data(), var.typed_data(), epsilon, relu != 0, dscale->typed_data(),
             dshift->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_bn_fwd, NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<Vec>()
                                  .Ret<Vec>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_bn_bwd, NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<Vec>()
                                  .Ret<Vec>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));
