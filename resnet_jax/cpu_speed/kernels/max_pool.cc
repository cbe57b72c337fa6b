// XLA FFI handlers: VALID max pooling of float32 NHWC maps and its gradient.
//
//   MaxPoolForward(x)           -> (y, winner)   winner: int8 index (row-major in the window)
//                                                of the first tap equal to the maximum
//   MaxPoolBackward(dy, winner) -> dx            dy of each output added at its winner
//
// The same numbers as XLA's select-and-scatter gradient (the first maximum in window order
// takes the gradient; ties elsewhere get none). Written as XLA ops, the gradient's nine
// taps each became a fusion over the whole padded input (0.6 s of a ResNet-18 step, batch
// 32: XLA recomputed the winners in each); here the forward records the winner in one byte
// and the backward is one pass. A window holding a NaN gives y = NaN and no winner.
// The forward works on 16 channels at a time as explicit vectors: GCC vectorised the
// per-channel loop across taps instead (gathers), 13.5 vs 4.5 ms for the ResNet stem's pool
// (113x113x64 -> 56x56x64, batch 32, 2 cores).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_lock.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int8_t kNoWinner = 127;

using Dims = ffi::Span<const int64_t>;

struct Geometry {
  int64_t n, h, w, c, ho, wo, kh, kw, sh, sw;
};

ffi::Error MakeGeometry(Dims x, Dims y, Dims window, Dims strides, Geometry* g) {
  if (x.size() != 4 || y.size() != 4 || window.size() != 2 || strides.size() != 2 ||
      x[0] != y[0] || x[3] != y[3] || window[0] * window[1] > kNoWinner ||
      y[1] != (x[1] - window[0]) / strides[0] + 1 ||
      y[2] != (x[2] - window[1]) / strides[1] + 1) {
    return ffi::Error::InvalidArgument(
        "max pool: expected x [N,H,W,C], y [N,Ho,Wo,C] of a VALID window (at most 127 taps)");
  }
  *g = Geometry{x[0], x[1], x[2], x[3], y[1], y[2], window[0], window[1], strides[0],
                strides[1]};
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using S8 = ffi::Buffer<ffi::S8>;

// 16 channels as one vector (GCC/Clang vector extensions: one AVX-512 register, two AVX2
// ones, ... -- whatever the target has).
constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef int8_t Bytes __attribute__((vector_size(kLanes)));

inline Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// One output pixel over channels [c0, c0 + kLanes) of its window's taps (`tap[t] + c0`):
// the maximum and the first tap that holds it. Two passes over the taps (in L1 by then): the
// maximum, then the winner as the lowest t whose value equals it -- the same result as one
// pass of "strictly greater takes over", without the index depending on the running
// maximum, so both passes are plain vector max / compare-select.
inline void PoolVector(const float* const* tap, int taps, int64_t c0, float* best,
                       int8_t* index) {
  Floats m = Load(tap[0] + c0);
  Ints nan = m != m;
  for (int t = 1; t < taps; ++t) {
    const Floats v = Load(tap[t] + c0);
    m = v > m ? v : m;   // strictly greater: the first of equal values stays
    nan |= v != v;
  }
  Ints win = Ints{} + kNoWinner;
  for (int t = taps - 1; t >= 0; --t) win = Load(tap[t] + c0) == m ? Ints{} + t : win;
  // A NaN in the window: y = NaN and no winner, as XLA's max and == give.
  m = nan ? Floats{} + std::numeric_limits<float>::quiet_NaN() : m;
  win = nan ? Ints{} + kNoWinner : win;
  const Bytes bytes = __builtin_convertvector(win, Bytes);
  std::memcpy(best + c0, &m, sizeof(m));
  std::memcpy(index + c0, &bytes, sizeof(bytes));
}

// The same for one channel (the tail of a width that is not a multiple of kLanes).
inline void PoolScalar(const float* const* tap, int taps, int64_t c, float* best,
                       int8_t* index) {
  float m = tap[0][c];
  bool nan = m != m;
  for (int t = 1; t < taps; ++t) {
    const float v = tap[t][c];
    m = v > m ? v : m;
    nan |= v != v;
  }
  int8_t win = kNoWinner;
  for (int t = taps - 1; t >= 0; --t) win = tap[t][c] == m ? static_cast<int8_t>(t) : win;
  best[c] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  index[c] = nan ? kNoWinner : win;
}

ffi::Error Forward(F32 x, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> winner,
                   Dims window, Dims strides) {
  Geometry g;
  ffi::Error err = MakeGeometry(x.dimensions(), y->dimensions(), window, strides, &g);
  if (err.failure()) return err;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  int8_t* ip = winner->typed_data();
  const int taps = static_cast<int>(g.kh * g.kw);
  std::lock_guard<std::mutex> guard(resnet_jax::KernelLock());
#pragma omp parallel
  {
    std::vector<const float*> tap(taps);
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t oh = 0; oh < g.ho; ++oh) {
        for (int64_t ow = 0; ow < g.wo; ++ow) {
          const int64_t out = ((n * g.ho + oh) * g.wo + ow) * g.c;
          int t = 0;
          for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j) {
              tap[t++] = xp + ((n * g.h + oh * g.sh + i) * g.w + ow * g.sw + j) * g.c;
            }
          }
          int64_t c0 = 0;
          for (; c0 + kLanes <= g.c; c0 += kLanes) {
            PoolVector(tap.data(), taps, c0, yp + out, ip + out);
          }
          for (; c0 < g.c; ++c0) PoolScalar(tap.data(), taps, c0, yp + out, ip + out);
        }
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error Backward(F32 dy, S8 winner, ffi::ResultBuffer<ffi::F32> dx, Dims window,
                    Dims strides) {
  Geometry g;
  ffi::Error err = MakeGeometry(dx->dimensions(), dy.dimensions(), window, strides, &g);
  if (err.failure()) return err;
  if (winner.element_count() != dy.element_count()) {
    return ffi::Error::InvalidArgument("max pool gradient: winner and dy differ in shape");
  }
  const float* gp = dy.typed_data();
  const int8_t* ip = winner.typed_data();
  float* dxp = dx->typed_data();
  std::lock_guard<std::mutex> guard(resnet_jax::KernelLock());
  const int64_t row = g.w * g.c;   // one input row of dx
  // One image per iteration: windows overlap within an image, never across images. Rows
  // of dx are zeroed just before the first window reaches them, so they are still in cache
  // when the gradient is added (zeroing the whole image first: 7.5 vs 5.6 ms at 113x113x64,
  // batch 32).
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < g.n; ++n) {
    float* image = dxp + n * g.h * row;
    int64_t zeroed = 0;   // rows [0, zeroed) are zero or hold gradient
    for (int64_t oh = 0; oh < g.ho; ++oh) {
      const int64_t last = std::min(g.h, oh * g.sh + g.kh);
      if (last > zeroed) {
        std::memset(image + zeroed * row, 0, sizeof(float) * (last - zeroed) * row);
        zeroed = last;
      }
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        const int64_t out = ((n * g.ho + oh) * g.wo + ow) * g.c;
        const float* __restrict grad = gp + out;
        const int8_t* __restrict index = ip + out;
        int t = 0;
        for (int64_t i = 0; i < g.kh; ++i) {
          for (int64_t j = 0; j < g.kw; ++j, ++t) {
            float* __restrict dst = image + (oh * g.sh + i) * row + (ow * g.sw + j) * g.c;
#pragma omp simd
            for (int64_t c = 0; c < g.c; ++c) dst[c] += index[c] == t ? grad[c] : 0.f;
          }
        }
      }
    }
    if (g.h > zeroed) std::memset(image + zeroed * row, 0, sizeof(float) * (g.h - zeroed) * row);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMaxPoolForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Ret<S8>()
                                  .Attr<Dims>("window").Attr<Dims>("strides"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMaxPoolBackward, Backward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<S8>().Ret<F32>()
                                  .Attr<Dims>("window").Attr<Dims>("strides"));
