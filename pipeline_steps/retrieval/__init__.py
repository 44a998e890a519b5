"""Retrieval: encoding a split with a model, scorers over image x caption blocks, the metrics and
protocols, and offline candidate mining."""
