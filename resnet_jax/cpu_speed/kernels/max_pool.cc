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

#include <omp.h>

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

ffi::Error Forward(F32 x, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> winner,
                   Dims window, Dims strides) {
  Geometry g;
  ffi::Error err = MakeGeometry(x.dimensions(), y->dimensions(), window, strides, &g);
  if (err.failure()) return err;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  int8_t* ip = winner->typed_data();
  std::lock_guard<std::mutex> guard(resnet_jax::KernelLock());
#pragma omp parallel
  {
    std::vector<uint8_t> nan(g.c);   // per channel: a NaN seen in this window
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t oh = 0; oh < g.ho; ++oh) {
        for (int64_t ow = 0; ow < g.wo; ++ow) {
          const int64_t out = ((n * g.ho + oh) * g.wo + ow) * g.c;
          float* __restrict best = yp + out;
          int8_t* __restrict index = ip + out;
          uint8_t* __restrict seen = nan.data();
          for (int64_t c = 0; c < g.c; ++c) {
            best[c] = -std::numeric_limits<float>::infinity();
            index[c] = kNoWinner;
            seen[c] = 0;
          }
          int8_t t = 0;
          for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j, ++t) {
              const float* __restrict tap =
                  xp + ((n * g.h + oh * g.sh + i) * g.w + ow * g.sw + j) * g.c;
#pragma omp simd
              for (int64_t c = 0; c < g.c; ++c) {
                const float v = tap[c];
                // Strictly greater: an equal later tap does not take over (first maximum).
                const bool take = v > best[c] || (index[c] == kNoWinner && v == best[c]);
                best[c] = take ? v : best[c];
                index[c] = take ? t : index[c];
                seen[c] |= v != v;
              }
            }
          }
          // A NaN in the window: y = NaN and no winner, as XLA's max and == give.
          for (int64_t c = 0; c < g.c; ++c) {
            if (seen[c]) {
              best[c] = std::numeric_limits<float>::quiet_NaN();
              index[c] = kNoWinner;
            }
          }
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
  // One image per iteration: windows overlap within an image, never across images.
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < g.n; ++n) {
    float* image = dxp + n * g.h * g.w * g.c;
    std::memset(image, 0, sizeof(float) * g.h * g.w * g.c);
    for (int64_t oh = 0; oh < g.ho; ++oh) {
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        const int64_t out = ((n * g.ho + oh) * g.wo + ow) * g.c;
        const float* __restrict grad = gp + out;
        const int8_t* __restrict index = ip + out;
        int8_t t = 0;
        for (int64_t i = 0; i < g.kh; ++i) {
          for (int64_t j = 0; j < g.kw; ++j, ++t) {
            float* __restrict dst = image + ((oh * g.sh + i) * g.w + ow * g.sw + j) * g.c;
#pragma omp simd
            for (int64_t c = 0; c < g.c; ++c) dst[c] += index[c] == t ? grad[c] : 0.f;
          }
        }
      }
    }
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
