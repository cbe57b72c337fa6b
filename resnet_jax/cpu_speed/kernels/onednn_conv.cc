// XLA FFI handlers: float32 NHWC x HWIO 2-D convolutions -- forward, data gradient, weight
// gradient -- on oneDNN's CPU kernels, the library PyTorch's CPU convolutions run on.
//
// Each handler reads its shapes from the buffers XLA hands it and its strides / paddings
// from attributes, builds the oneDNN primitive for that problem once (creating one
// JIT-compiles a kernel: milliseconds) and caches it. Activations stay in XLA's row-major
// NHWC buffers (oneDNN's `nhwc`); the kernel goes through a reorder into the blocked layout
// the primitive picked (`any`): on plain HWIO weights oneDNN falls back to its GEMM-based
// gradients, 1.5-9x slower (56x56x64, batch 32: dw 86 vs 35 ms; 32x32x16, batch 128: 23.8
// vs 2.7 ms). The reorder copies the kernel, ~2% of the convolution's time.

#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>

#include "kernel_lock.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = memory::format_tag;

enum class Kind { kForward, kBackwardData, kBackwardWeights };

// One convolution: x [n, h, w, c], kernel [kh, kw, c, f], y [n, ho, wo, f]; paddings
// top, bottom, left, right (asymmetric, as XLA's SAME padding of a strided conv can be).
struct Problem {
  int64_t n, h, w, c, f, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr;
  auto Key() const {
    return std::make_tuple(n, h, w, c, f, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr);
  }
  memory::desc X() const { return {{n, c, h, w}, memory::data_type::f32, tag::nhwc}; }
  memory::desc Y() const { return {{n, f, ho, wo}, memory::data_type::f32, tag::nhwc}; }
  memory::desc W(tag t) const { return {{f, c, kh, kw}, memory::data_type::f32, t}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive, its weights layout and scratchpad, and the reorder between the user's HWIO
// kernel and that layout (user -> primitive for forward and dx; back for dw).
struct Entry {
  dnnl::primitive prim;
  memory::desc prim_w, scratch;
  dnnl::reorder reorder;
  bool needs_reorder = false;
};

// The weight gradient of a stride-1 1x1 convolution that keeps or widens the channels (the
// bottleneck's expansions, 64->256 ... 512->2048) is one matrix product, x^T dy, and
// oneDNN's GEMM implementation computes it faster than the direct 1x1 kernel it lists first:
// 0.53-0.83x the time for those ResNet-50 shapes (batch 32, 2 cores, AMD EPYC); narrowing
// ones (256->64, ...) are 1.0-1.3x slower on GEMM and keep the default.
bool GemmWeightGradient(const Problem& p) {
  return p.kh == 1 && p.kw == 1 && p.sh == 1 && p.sw == 1 && p.pt == 0 && p.pb == 0 &&
         p.pl == 0 && p.pr == 0 && p.f >= p.c;
}

// Steps `pd` to the first implementation whose name contains `name`; false if none does
// (then `pd` is left at the last one).
template <typename PrimitiveDesc>
bool NextImplementation(PrimitiveDesc& pd, const char* name) {
  do {
    if (std::string(pd.impl_info_str()).find(name) != std::string::npos) return true;
  } while (pd.next_impl());
  return false;
}

Entry Build(Kind kind, const Problem& p) {
  auto& eng = Engine();
  const memory::dims strides = {p.sh, p.sw}, pad_l = {p.pt, p.pl}, pad_r = {p.pb, p.pr};
  const auto direct = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  // Scratch memory comes from us (one buffer reused under the kernel lock), not from
  // oneDNN's per-primitive or per-thread pools.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, direct, p.X(), p.W(tag::any), p.Y(), strides,
      pad_l, pad_r, attr);
  Entry e;
  switch (kind) {
    case Kind::kForward:
      e.prim = dnnl::convolution_forward(fwd);
      e.prim_w = fwd.weights_desc();
      e.scratch = fwd.scratchpad_desc();
      break;
    case Kind::kBackwardData: {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          eng, direct, p.X(), p.W(tag::any), p.Y(), strides, pad_l, pad_r, fwd, attr);
      e.prim = dnnl::convolution_backward_data(pd);
      e.prim_w = pd.weights_desc();
      e.scratch = pd.scratchpad_desc();
      break;
    }
    case Kind::kBackwardWeights: {
      auto make = [&] {
        return dnnl::convolution_backward_weights::primitive_desc(
            eng, direct, p.X(), p.W(tag::any), p.Y(), strides, pad_l, pad_r, fwd, attr);
      };
      auto pd = make();
      if (GemmWeightGradient(p) && !NextImplementation(pd, "gemm")) pd = make();
      e.prim = dnnl::convolution_backward_weights(pd);
      e.prim_w = pd.diff_weights_desc();
      e.scratch = pd.scratchpad_desc();
      break;
    }
  }
  const memory::desc user_w = p.W(tag::hwio);
  e.needs_reorder = e.prim_w != user_w;
  if (e.needs_reorder) {
    e.reorder = kind == Kind::kBackwardWeights
                    ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.prim_w, eng, user_w))
                    : dnnl::reorder(dnnl::reorder::primitive_desc(eng, user_w, eng, e.prim_w));
  }
  return e;
}

// 64-byte aligned memory that grows to the largest request (used under the kernel lock).
class Arena {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// x, w, y: the user's buffers (inputs or the output, by kind).
ffi::Error Run(Kind kind, const Problem& p, float* x, float* w, float* y) {
  std::lock_guard<std::mutex> guard(resnet_jax::KernelLock());
  static auto* cache = new std::map<std::tuple<Kind, decltype(p.Key())>, Entry>();
  static Arena scratch_arena, weights_arena;
  try {
    const auto key = std::make_tuple(kind, p.Key());
    auto it = cache->find(key);
    if (it == cache->end()) it = cache->emplace(key, Build(kind, p)).first;
    const Entry& e = it->second;
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory scratch(e.scratch, eng, scratch_arena.Get(e.scratch.get_size()));
    memory user_w(p.W(tag::hwio), eng, w);
    memory prim_w = e.needs_reorder
                        ? memory(e.prim_w, eng, weights_arena.Get(e.prim_w.get_size()))
                        : user_w;
    memory x_m(p.X(), eng, x), y_m(p.Y(), eng, y);
    switch (kind) {
      case Kind::kForward:
        if (e.needs_reorder) e.reorder.execute(stream, user_w, prim_w);
        e.prim.execute(stream, {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_WEIGHTS, prim_w},
                                {DNNL_ARG_DST, y_m}, {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      case Kind::kBackwardData:
        if (e.needs_reorder) e.reorder.execute(stream, user_w, prim_w);
        e.prim.execute(stream, {{DNNL_ARG_DIFF_DST, y_m}, {DNNL_ARG_WEIGHTS, prim_w},
                                {DNNL_ARG_DIFF_SRC, x_m}, {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      case Kind::kBackwardWeights:
        e.prim.execute(stream, {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_DIFF_DST, y_m},
                                {DNNL_ARG_DIFF_WEIGHTS, prim_w}, {DNNL_ARG_SCRATCHPAD, scratch}});
        if (e.needs_reorder) e.reorder.execute(stream, prim_w, user_w);
        break;
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution failed: ") + err.what());
  }
  return ffi::Error::Success();
}

using Dims = ffi::Span<const int64_t>;

ffi::Error MakeProblem(Dims x, Dims k, Dims y, Dims strides, Dims padding, Problem* p) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding.size() != 4 || x[0] != y[0] || x[3] != k[2] || y[3] != k[3]) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolution: expected x [N,H,W,C], kernel [KH,KW,C,F], y [N,Ho,Wo,F], "
        "2 strides and 4 paddings");
  }
  *p = Problem{x[0], x[1], x[2], x[3], k[3], k[0], k[1], y[1], y[2],
               strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 k, F32Out y, Dims strides, Dims padding) {
  Problem p;
  ffi::Error err = MakeProblem(x.dimensions(), k.dimensions(), y->dimensions(), strides,
                               padding, &p);
  if (err.failure()) return err;
  return Run(Kind::kForward, p, x.typed_data(), k.typed_data(), y->typed_data());
}

ffi::Error BackwardData(F32 dy, F32 k, F32Out dx, Dims strides, Dims padding) {
  Problem p;
  ffi::Error err = MakeProblem(dx->dimensions(), k.dimensions(), dy.dimensions(), strides,
                               padding, &p);
  if (err.failure()) return err;
  return Run(Kind::kBackwardData, p, dx->typed_data(), k.typed_data(), dy.typed_data());
}

ffi::Error BackwardWeights(F32 x, F32 dy, F32Out dk, Dims strides, Dims padding) {
  Problem p;
  ffi::Error err = MakeProblem(x.dimensions(), dk->dimensions(), dy.dimensions(), strides,
                               padding, &p);
  if (err.failure()) return err;
  return Run(Kind::kBackwardWeights, p, x.typed_data(), dk->typed_data(), dy.typed_data());
}

}  // namespace

#define RESNET_JAX_CONV_BINDING                                            \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<Dims>("strides") \
      .Attr<Dims>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvForward, Forward, RESNET_JAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBackwardData, BackwardData, RESNET_JAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBackwardWeights, BackwardWeights,
                              RESNET_JAX_CONV_BINDING);
