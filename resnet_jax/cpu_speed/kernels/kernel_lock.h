// The one lock every kernel in this library runs under.
//
// Each kernel runs on an OpenMP team as wide as the machine (oneDNN's convolutions and the
// channel sums alike). XLA:CPU runs independent ops concurrently -- a layer's dx and dw, or
// the 8 programs of 8 host-platform devices -- and two teams at once would put twice as many
// busy threads as cores on the machine, where OpenMP's barriers spin against each other.
// Serialised, each call has every core to itself.
#ifndef RESNET_JAX_CPU_KERNELS_KERNEL_LOCK_H_
#define RESNET_JAX_CPU_KERNELS_KERNEL_LOCK_H_

#include <mutex>

namespace resnet_jax {

inline std::mutex& KernelLock() {
  static std::mutex mu;   // one instance in the shared library (inline: merged across files)
  return mu;
}

}  // namespace resnet_jax

#endif  // RESNET_JAX_CPU_KERNELS_KERNEL_LOCK_H_
