"""Token layout, MIDI tokens and the pair-record schema: pure numpy data code that every part may use."""
