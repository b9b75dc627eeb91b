"""The `tokensynth` command line: every parser and flag check, one module per job.

console.py (the `tokensynth` script: host_malloc's re-exec, then main), main.py (the parser and
the one place a UserError becomes a line and exit 2), checks.py (shared validators), atomic.py
(outputs written whole or not at all), model_commands.py (init, convert, convert-clap,
inference-checkpoint, export), synthesis.py, evaluation.py, training.py (train, sweep), prep.py
(the only import of the prep job, tokensynth_prep) and demo.py.
"""
