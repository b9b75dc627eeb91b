"""data_prep: the Apache Beam job that renders, augments and tokenizes TokenSynth training pairs.

MIDI segments (a Lakh-style directory or the procedural generator) x instruments (SoundFont
presets or NSynth) -> sample-based renders of a reference and a target clip -> the same random
effect chain on both -> CLAP embedding of the reference, codec codes of the target, MIDI tokens of
the target -> `tokensynth_jax.tokens.records.PairRecord`s in ArrayRecord shards plus a manifest. The
package imports from `tokensynth_jax` only its tokens and records, the audio front end
(`tokensynth_jax.audio`), `integrity` (file checksums), `interop.dac_convert` (descript's DAC padding)
and `errors`; nothing there imports it back except the CLI's prep gate.
"""
