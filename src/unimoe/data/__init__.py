"""Training data: record format, datasets, collation and the synthetic instruction set."""
