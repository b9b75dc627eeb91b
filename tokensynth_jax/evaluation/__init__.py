"""Audio metrics (spectral loss, CLAP score, transcription F1) and the paper's evaluation table."""
