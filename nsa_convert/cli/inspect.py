"""`nsa-convert inspect`."""
