"""The `tokensynth` command line: parsers, flag checks and the demo; the only place that imports the prep job."""
