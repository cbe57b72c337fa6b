"""The convolution every ResNet layer uses. One seam, so the lowering can differ by backend
while parameters (names `kernel`/`bias`, layout HWIO) stay those of `flax.linen.Conv`."""

import flax.linen as nn

Conv = nn.Conv
