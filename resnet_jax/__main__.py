import sys

from resnet_jax.main import main

sys.exit(main())
