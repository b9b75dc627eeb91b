"""`python -m tokensynth_jax.cli ...` runs the `tokensynth` command line."""
import sys

from tokensynth_jax.cli.main import main

sys.exit(main())
