"""Whole-slide images -> tissue -> aligned 5x/20x tile pairs -> ArrayRecord shards (Apache Beam)."""
