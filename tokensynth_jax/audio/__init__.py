"""The audio front end: codecs, timbre embedders (CLAP), audio reading and resampling (torch lives here)."""
