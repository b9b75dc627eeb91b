"""data_prep: the Apache Beam job that renders, augments and tokenizes TokenSynth training pairs.

MIDI segments (a Lakh-style directory or the procedural generator) x instruments (SoundFont
presets or NSynth) -> sample-based renders of a reference and a target clip -> the same random
effect chain on both -> CLAP embedding of the reference, codec codes of the target, MIDI tokens of
the target -> `tokensynth_jax.records.PairRecord`s in ArrayRecord shards plus a manifest. The
package may import `tokensynth_jax.records`, `token_layout`, `midi_tokens`, `integrity` (file
checksums) and `dac_convert` (descript's DAC padding) only.
"""
