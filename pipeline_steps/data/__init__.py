"""Data access: SCAN precomp folders (validation, memory-mapped features), tokenization and the
vocabulary, prepared splits, training batches with offline negatives, the authors' released files."""
