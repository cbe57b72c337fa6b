"""Multiply-accumulates of a forward pass, two ways.

`xla_macs` asks XLA's cost analysis of the lowered forward pass (flops / 2). XLA counts only
the multiply-adds that touch real input, so zero padding is not counted. `analytic_macs`
counts every conv/dense output position times its kernel volume, padding included -- the
convention of torchvision's and timm's published GFLOPS (fvcore), e.g. 4.09 for ResNet-50.
Both trace the model with its default layers: the count is the model's arithmetic, whatever
lowering runs it (a CPU lowering's FFI calls are invisible to both).
"""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models.resnet import DEFAULT_LAYERS


def _forward_inputs(model, image_size: int, channels: int = 3):
  model = model.clone(**DEFAULT_LAYERS)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return model, variables, x


def xla_macs(model, image_size: int, channels: int = 3) -> float:
  """MACs per image of the eval forward pass, from XLA's cost analysis."""
  model, variables, x = _forward_inputs(model, image_size, channels)
  cost = jax.jit(model.apply).lower(variables, x).cost_analysis()
  if isinstance(cost, (list, tuple)):     # older jax returned one dict per computation
    cost = cost[0]
  return float(cost["flops"]) / 2


def analytic_macs(model, image_size: int, channels: int = 3) -> float:
  """MACs per image counted from the jaxpr's convolutions and matmuls, padding included."""
  model, variables, x = _forward_inputs(model, image_size, channels)
  jaxpr = jax.make_jaxpr(model.apply)(variables, x).jaxpr
  return float(_count(jaxpr))


def _count(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      kernel = eqn.invars[1].aval.shape          # HWIO, I already divided by groups
      total += int(np.prod(out)) * int(np.prod(kernel[:-1]))
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs[d] for d in contract]))
    for sub in _sub_jaxprs(eqn.params):       # inside jit / custom_vjp / scan
      total += _count(sub)
  return total


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (list, tuple)) else [value]:
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr
      elif hasattr(v, "eqns"):
        yield v
