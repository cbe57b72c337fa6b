import sys

from resnet_jax import lowering

lowering.prepare_process()   # before JAX starts; CPU-backend processes only (lowering.py)

from resnet_jax.main import main  # noqa: E402

sys.exit(main(exit_at_once_when_stopped=True))
