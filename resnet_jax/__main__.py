import sys

from resnet_jax import hugepages

hugepages.reexec_if_missing()   # before JAX allocates anything; see hugepages.py

from resnet_jax.main import main  # noqa: E402

sys.exit(main())
