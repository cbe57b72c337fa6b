// Every implementation oneDNN offers for a convolution's forward, dx and dw, timed one by one.
//
// oneDNN lists its implementations for a problem best-first by its own heuristics and
// resnet_jax/cpu_speed/kernels/onednn_conv.cc takes the first, except where this survey
// measured another to be faster (GemmWeightGradient: the weight gradient of widening 1x1
// convolutions on GEMM). Reference ("ref:") and narrower-ISA implementations are skipped.
// Shapes come on stdin, one per line: batch height width in_channels out_channels kernel
// stride count (padding (kernel-1)/2, as ResNets pad; `count`: how often the net has it).
// The last line sums default and best per kind over the shapes, weighted by count.
//
//   g++ -O2 -std=c++17 -fopenmp experiments/onednn_implementations.cc -I.venv/include \
//       -L.venv/lib -l:libdnnl.so.3 -Wl,-rpath,$PWD/.venv/lib -o /tmp/onednn_implementations
//   OMP_NUM_THREADS=2 /tmp/onednn_implementations < experiments/resnet50_convs.txt
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using namespace dnnl;
using tag = memory::format_tag;

namespace {

struct Shape { long n, h, w, c, f, k, s, count; };

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool Skipped(const std::string& name) {
  return name.find("ref") != std::string::npos || name.find("sse41") != std::string::npos ||
         name.find("avx2") != std::string::npos;
}

}  // namespace

int main() {
  engine eng(engine::kind::cpu, 0);
  stream st(eng);
  std::vector<Shape> shapes;
  Shape q;
  while (scanf("%ld %ld %ld %ld %ld %ld %ld %ld", &q.n, &q.h, &q.w, &q.c, &q.f, &q.k, &q.s,
               &q.count) == 8) {
    shapes.push_back(q);
  }
  const char* kinds[3] = {"fwd", "dx ", "dw "};
  double first_total[3] = {0, 0, 0}, best_total[3] = {0, 0, 0};
  for (const Shape& p : shapes) {
    const long pad = (p.k - 1) / 2;
    const long ho = (p.h + 2 * pad - p.k) / p.s + 1, wo = (p.w + 2 * pad - p.k) / p.s + 1;
    memory::desc x_d({p.n, p.c, p.h, p.w}, memory::data_type::f32, tag::nhwc);
    memory::desc y_d({p.n, p.f, ho, wo}, memory::data_type::f32, tag::nhwc);
    memory::desc w_d({p.f, p.c, p.k, p.k}, memory::data_type::f32, tag::any);
    const memory::dims strides = {p.s, p.s}, pads = {pad, pad};
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    auto fwd = convolution_forward::primitive_desc(eng, prop_kind::forward_training,
                                                   algorithm::convolution_direct, x_d, w_d,
                                                   y_d, strides, pads, pads, attr);
    std::vector<float> xb(x_d.get_size() / 4), yb(y_d.get_size() / 4);
    for (size_t i = 0; i < xb.size(); ++i) xb[i] = (i % 7) * 0.1f;
    for (size_t i = 0; i < yb.size(); ++i) yb[i] = (i % 5) * 0.1f;
    printf("%ldx%ldx%ld %ld->%ld %ldx%ld/%ld (x%ld)\n", p.n, p.h, p.w, p.c, p.f, p.k, p.k, p.s,
           p.count);
    auto survey = [&](auto pd, int kind) {
      double first = -1, best = 1e30;
      int index = 0;
      do {
        const std::string name = pd.impl_info_str();
        if (Skipped(name)) { ++index; continue; }
        memory::desc wd = kind == 2 ? pd.diff_weights_desc() : pd.weights_desc();
        std::vector<char> wb(wd.get_size() + 64), sb(pd.scratchpad_desc().get_size() + 64);
        memory w(wd, eng, wb.data()), scratch(pd.scratchpad_desc(), eng, sb.data());
        memory x(x_d, eng, xb.data()), y(y_d, eng, yb.data());
        std::unordered_map<int, memory> args = {{DNNL_ARG_SCRATCHPAD, scratch}};
        if (kind == 0) args.insert({{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}});
        if (kind == 1) {
          args.insert({{DNNL_ARG_DIFF_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, y}});
        }
        if (kind == 2) {
          args.insert({{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, y}});
        }
        primitive prim(pd);
        prim.execute(st, args);
        st.wait();
        std::vector<double> times;
        for (int r = 0; r < 5; ++r) {
          const double start = Now();
          prim.execute(st, args);
          st.wait();
          times.push_back(Now() - start);
        }
        std::sort(times.begin(), times.end());
        const double ms = times[2] * 1e3;
        printf("  %s %d %-48s %8.2f ms\n", kinds[kind], index, name.c_str(), ms);
        if (first < 0) first = ms;
        best = std::min(best, ms);
        ++index;
      } while (pd.next_impl());
      first_total[kind] += first * p.count;
      best_total[kind] += best * p.count;
    };
    survey(fwd, 0);
    survey(convolution_backward_data::primitive_desc(eng, algorithm::convolution_direct, x_d,
                                                     w_d, y_d, strides, pads, pads, fwd, attr),
           1);
    survey(convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct,
                                                        x_d, w_d, y_d, strides, pads, pads,
                                                        fwd, attr),
           2);
    fflush(stdout);
  }
  printf("weighted sums, ms: first-listed fwd %.1f dx %.1f dw %.1f; fastest fwd %.1f dx %.1f "
         "dw %.1f\n", first_total[0], first_total[1], first_total[2], best_total[0],
         best_total[1], best_total[2]);
  return 0;
}
