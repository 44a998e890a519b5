"""Small helpers every step uses: atomic writes, one-line refusals, the device choice."""
