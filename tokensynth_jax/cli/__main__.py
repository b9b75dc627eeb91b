"""`python -m tokensynth_jax.cli ...` runs the `tokensynth` command line."""
import sys

from tokensynth_jax.cli.console import main

sys.exit(main())
