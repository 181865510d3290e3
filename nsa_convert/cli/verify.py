"""`nsa-convert verify`."""
