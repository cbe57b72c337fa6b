"""JAX ops over the CPU kernels: XLA FFI calls, partitioned along the batch.

An FFI call is opaque to XLA's SPMD partitioner: left alone it would gather a batch-sharded
operand onto every device and convolve the whole global batch on each. Each op here is a
`custom_partitioning` whose rule keeps the leading (batch) dimension split as its operand
is and every other dimension whole: per-device convolutions see their own shard, and the
outputs that sum over the batch (weight gradients, BatchNorm sums) are `psum`med over the
mesh axes the batch is split over, as the all-reduce XLA inserts for a sharded `jnp.sum`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax.cpu_speed.kernels import library


def _ffi(target: str, out_shapes, *args, **attrs):
  library.load()
  return jax.ffi.ffi_call(target, out_shapes, vmap_method="sequential")(*args, **attrs)


def _batch_axes(sharding) -> tuple[str, ...]:
  """Mesh axes the leading dimension is split over ((): whole on every device)."""
  spec = getattr(sharding, "spec", None)
  if not spec or spec[0] is None:
    return ()
  return tuple(spec[0]) if isinstance(spec[0], (tuple, list)) else (spec[0],)


def _batch_partitioned(fn, rule: str, batched_args: tuple[bool, ...],
                       batched_outs: tuple[bool, ...], replicated_factors: tuple[str, ...]):
  """`fn` (positional arrays -> tuple of arrays) as a custom_partitioning op.

  batched_args / batched_outs: which arrays have the batch as their leading dimension; the
  rest are whole on every device. An output that is not batched is a sum over the batch:
  each device computes its shard's and they are psummed. The batch split is taken from the
  first argument.
  """
  op = custom_partitioning(fn)

  def shardings(mesh, axes):
    spec = lambda batched: P(axes) if batched and axes else P()   # noqa: E731
    return (tuple(NamedSharding(mesh, spec(b)) for b in batched_args),
            tuple(NamedSharding(mesh, spec(b)) for b in batched_outs))

  def partition(mesh, arg_shapes, result_shape):
    axes = _batch_axes(arg_shapes[0].sharding)
    arg_shardings, out_shardings = shardings(mesh, axes)

    def per_device(*args):
      outs = fn(*args)
      return tuple(o if b or not axes else jax.lax.psum(o, axes)
                   for o, b in zip(outs, batched_outs))
    return mesh, per_device, out_shardings, arg_shardings

  def infer(mesh, arg_shapes, result_shape):   # the GSPMD partitioner's question
    return shardings(mesh, _batch_axes(arg_shapes[0].sharding))[1]

  # Shardy numbers the factors in order of appearance and wants each list in that order.
  factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
  result_factors = set(rule.split("->")[1].replace(",", " ").split())
  op.def_partition(
      partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
      reduction_factors=tuple(f for f in factors if f not in result_factors
                              and f not in replicated_factors),   # the batch, summed over
      need_replication_factors=tuple(f for f in factors if f in replicated_factors))
  return op


# --- convolution -----------------------------------------------------------------------

@functools.cache
def _conv_ops(geometry):
  """(forward, backward_data, backward_weights) for one convolution geometry:
  (strides, ((top, bottom), (left, right)), input (h, w), kernel (kh, kw))."""
  strides, padding, (h, w), (kh, kw) = geometry
  attrs = dict(strides=np.asarray(strides, np.int64),
               padding=np.asarray([p for pair in padding for p in pair], np.int64))
  ho = (h + sum(padding[0]) - kh) // strides[0] + 1
  wo = (w + sum(padding[1]) - kw) // strides[1] + 1
  spatial = ("h", "w", "c", "kh", "kw", "f", "ho", "wo")
  f32 = jnp.float32

  def forward(x, k):
    return (_ffi("resnet_jax_conv_forward",
                 jax.ShapeDtypeStruct((x.shape[0], ho, wo, k.shape[3]), f32), x, k, **attrs),)

  def backward_data(dy, k):
    return (_ffi("resnet_jax_conv_backward_data",
                 jax.ShapeDtypeStruct((dy.shape[0], h, w, k.shape[2]), f32), dy, k, **attrs),)

  def backward_weights(x, dy):
    return (_ffi("resnet_jax_conv_backward_weights",
                 jax.ShapeDtypeStruct((kh, kw, x.shape[3], dy.shape[3]), f32), x, dy, **attrs),)

  return (_batch_partitioned(forward, "n h w c, kh kw c f -> n ho wo f", (True, False),
                             (True,), spatial),
          _batch_partitioned(backward_data, "n ho wo f, kh kw c f -> n h w c", (True, False),
                             (True,), spatial),
          _batch_partitioned(backward_weights, "n h w c, n ho wo f -> kh kw c f",
                             (True, True), (False,), spatial))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, geometry):
  return _conv_ops(geometry)[0](x, kernel)[0]


def _conv_fwd(x, kernel, geometry):
  return _conv(x, kernel, geometry), (x, kernel)


def _conv_bwd(geometry, res, dy):
  x, kernel = res
  _, backward_data, backward_weights = _conv_ops(geometry)
  # An unused dx (the image's, at the stem) is an unused call: XLA removes it.
  return backward_data(dy, kernel)[0], backward_weights(x, dy)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x, kernel, strides, padding):
  """float32 NHWC x HWIO convolution on oneDNN; `padding` is explicit ((t, b), (l, r))."""
  geometry = (tuple(strides), tuple(tuple(p) for p in padding), tuple(x.shape[1:3]),
              tuple(kernel.shape[:2]))
  return _conv(x, kernel, geometry)


# --- BatchNorm's per-channel sums --------------------------------------------------------

def _sums_shape(x):
  s = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
  return (s, s)


_channel_sums = _batch_partitioned(
    lambda x: tuple(_ffi("resnet_jax_channel_sums", _sums_shape(x), x)),
    "m c -> c, c", (True,), (False, False), ("c",))
_centred_sums = _batch_partitioned(
    lambda dy, x, mean: tuple(_ffi("resnet_jax_centred_sums", _sums_shape(x), dy, x, mean)),
    "m c, m c, c -> c, c", (True, True, False), (False, False), ("c",))


def channel_sums(x):
  """(sum x, sum x^2) over every axis but the last, float32 [C] each."""
  return _channel_sums(x.reshape(-1, x.shape[-1]))


def centred_sums(dy, x, mean):
  """(sum dy, sum dy * (x - mean)) over every axis but the last, float32 [C] each."""
  c = x.shape[-1]
  return _centred_sums(dy.reshape(-1, c), x.reshape(-1, c), mean)


# --- max pooling -------------------------------------------------------------------------

@functools.cache
def _max_pool_ops(window, strides, hw):
  """(forward, backward) of VALID max pooling over [N, h, w, C] maps."""
  attrs = dict(window=np.asarray(window, np.int64), strides=np.asarray(strides, np.int64))
  ho, wo = ((size - k) // s + 1 for size, k, s in zip(hw, window, strides))
  spatial = ("h", "w", "ho", "wo", "c")

  def forward(x):
    shape = (x.shape[0], ho, wo, x.shape[3])
    return tuple(_ffi("resnet_jax_max_pool_forward", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                                      jax.ShapeDtypeStruct(shape, jnp.int8)),
                      x, **attrs))

  def backward(dy, winner):
    shape = (dy.shape[0], *hw, dy.shape[3])
    return (_ffi("resnet_jax_max_pool_backward", jax.ShapeDtypeStruct(shape, jnp.float32), dy,
                 winner, **attrs),)

  return (_batch_partitioned(forward, "n h w c -> n ho wo c, n ho wo c", (True,),
                             (True, True), spatial),
          _batch_partitioned(backward, "n ho wo c, n ho wo c -> n h w c", (True, True),
                             (True,), spatial))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, geometry):
  return _max_pool_ops(*geometry)[0](x)[0]


def _max_pool_fwd(x, geometry):
  return _max_pool_ops(*geometry)[0](x)   # (y, winner): the winner is the residual


def _max_pool_bwd(geometry, winner, dy):
  return (_max_pool_ops(*geometry)[1](dy, winner)[0],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window, strides):
  """VALID max pooling of float32 NHWC `x`; the gradient goes to each window's first
  maximum, as select-and-scatter's."""
  return _max_pool(x, (tuple(window), tuple(strides), tuple(x.shape[1:3])))
