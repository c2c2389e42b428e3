"""snowball-aggregator."""
