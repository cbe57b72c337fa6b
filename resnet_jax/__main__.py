import sys

from resnet_jax import allocator

allocator.reexec_if_missing()   # before JAX allocates anything; see allocator.py

from resnet_jax.main import main  # noqa: E402

sys.exit(main())
