"""Stage 2 of MAGE: value-model guidance and the decoding loop that applies it."""
