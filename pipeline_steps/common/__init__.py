"""Code shared by several steps (steps never import each other)."""
