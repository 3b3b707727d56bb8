"""Use cases: one function per thing a caller can ask of Tally, each owning its transaction."""
