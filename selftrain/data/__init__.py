"""Data: sources, the provenance pool, packing into blocks."""
