"""`nsa-convert batch`."""
