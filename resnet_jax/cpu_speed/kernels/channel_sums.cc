// XLA FFI handlers: BatchNorm's per-channel sums over [..., C] float32 activations, in one
// pass over memory on every core.
//
//   ChannelSums(x)           -> (sum x, sum x^2)                  the forward statistics
//   CentredSums(dy, x, mean) -> (sum dy, sum dy * (x - mean))     the backward's two sums
//
// XLA:CPU runs these as YNNPACK reductions, which need each operand in a buffer of its own:
// in a ResNet-18 step it materialised `x - mean` for every layer (one more write and read of
// the activation) and read dy once per sum. Here each sum reads its operands once.
//
// Accumulation: float partial sums over blocks of kBlockRows rows, folded into double
// per-thread totals, so the rounding error does not grow with the batch the way one float
// running sum's would.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kernel_lock.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 64;

// 16 channels as one vector (GCC/Clang vector extensions: one AVX-512 register, two AVX2
// ones, ... -- whatever the target has).
constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(4 * kLanes)));

inline Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Floats v) { std::memcpy(p, &v, sizeof(v)); }

// Each kernel writes what it sums once, for both widths: `terms(load, r, j)` reads its
// operands through `load` -- 16 channels from j (LoadLanes) or channel j alone (LoadOne) --
// and gives (what p0 gets, what p1 gets).
struct LoadLanes {
  Floats operator()(const float* p) const { return Load(p); }
};
struct LoadOne {
  float operator()(const float* p) const { return *p; }
};

// Adds rows [r0, r1) of channels [j, j + kVectors * kLanes) into the partials p0, p1, row by
// row, in registers.
template <int kVectors, typename Terms>
inline void AddRows(int64_t r0, int64_t r1, int64_t j, float* p0, float* p1, Terms terms) {
  Floats a0[kVectors], a1[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    a0[v] = Load(p0 + j + v * kLanes);
    a1[v] = Load(p1 + j + v * kLanes);
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      const auto [t0, t1] = terms(LoadLanes{}, r, j + v * kLanes);
      a0[v] += t0;
      a1[v] += t1;
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    Store(p0 + j + v * kLanes, a0[v]);
    Store(p1 + j + v * kLanes, a1[v]);
  }
}

// out0[j], out1[j] = sums over rows r of terms(.., r, j): 16 channels at a time, then one by
// one for the channels past the last multiple of 16. Each block of kBlockRows rows is
// summed in float, 64 channels at a time held in registers (a loop over all channels per
// row, through memory, ran at half the memory bandwidth XLA's own reductions reach).
template <typename Terms>
void SumRows(int64_t rows, int64_t c, float* out0, float* out1, Terms terms) {
  const int threads = omp_get_max_threads();
  std::vector<double> totals(static_cast<size_t>(threads) * 2 * c, 0.0);
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t vector_end = c / kLanes * kLanes;
#pragma omp parallel num_threads(threads)
  {
    double* t0 = totals.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * c;
    double* t1 = t0 + c;
    std::vector<float> p0(c), p1(c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      std::fill(p0.begin(), p0.end(), 0.f);
      std::fill(p1.begin(), p1.end(), 0.f);
      const int64_t r0 = b * kBlockRows, r1 = std::min(rows, (b + 1) * kBlockRows);
      int64_t j = 0;
      for (; j + 4 * kLanes <= vector_end; j += 4 * kLanes) {
        AddRows<4>(r0, r1, j, p0.data(), p1.data(), terms);
      }
      for (; j < vector_end; j += kLanes) AddRows<1>(r0, r1, j, p0.data(), p1.data(), terms);
      for (; j < c; ++j) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto [s0, s1] = terms(LoadOne{}, r, j);
          p0[j] += s0;
          p1[j] += s1;
        }
      }
      for (int64_t k = 0; k < c; ++k) {
        t0[k] += p0[k];
        t1[k] += p1[k];
      }
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    double s0 = 0, s1 = 0;
    for (int t = 0; t < threads; ++t) {
      s0 += totals[static_cast<size_t>(t) * 2 * c + j];
      s1 += totals[static_cast<size_t>(t) * 2 * c + c + j];
    }
    out0[j] = static_cast<float>(s0);
    out1[j] = static_cast<float>(s1);
  }
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// c = x's last dimension, which both [C] outputs must have.
ffi::Error CheckChannels(const F32& x, size_t out0, size_t out1, int64_t* c) {
  auto dims = x.dimensions();
  if (dims.size() < 1 || out0 != static_cast<size_t>(dims.back()) ||
      out1 != static_cast<size_t>(dims.back())) {
    return ffi::Error::InvalidArgument("channel sums: expected x [..., C] and two [C] sums");
  }
  *c = dims.back();
  return ffi::Error::Success();
}

ffi::Error ChannelSums(F32 x, F32Out sum, F32Out sum_sq) {
  int64_t c;
  ffi::Error err = CheckChannels(x, sum->element_count(), sum_sq->element_count(), &c);
  if (err.failure()) return err;
  const float* xp = x.typed_data();
  std::lock_guard<std::mutex> guard(resnet_jax::KernelLock());
  SumRows(c ? x.element_count() / c : 0, c, sum->typed_data(), sum_sq->typed_data(),
          [&](auto load, int64_t r, int64_t j) {
            const auto v = load(xp + r * c + j);
            return std::pair{v, v * v};
          });
  return ffi::Error::Success();
}

ffi::Error CentredSums(F32 dy, F32 x, F32 mean, F32Out sum_dy, F32Out sum_dy_xc) {
  int64_t c;
  ffi::Error err = CheckChannels(x, sum_dy->element_count(), sum_dy_xc->element_count(), &c);
  if (err.failure()) return err;
  if (dy.element_count() != x.element_count() || mean.element_count() != c) {
    return ffi::Error::InvalidArgument(
        "centred sums: expected dy and x of one shape [..., C] and mean [C]");
  }
  const float *gp = dy.typed_data(), *xp = x.typed_data(), *mp = mean.typed_data();
  std::lock_guard<std::mutex> guard(resnet_jax::KernelLock());
  SumRows(c ? x.element_count() / c : 0, c, sum_dy->typed_data(), sum_dy_xc->typed_data(),
          [&](auto load, int64_t r, int64_t j) {
            const auto g = load(gp + r * c + j);
            return std::pair{g, g * (load(xp + r * c + j) - load(mp + j))};
          });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxChannelSums, ChannelSums,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxCentredSums, CentredSums,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Ret<F32>());
