"""The read-only query service over the value-added catalogue."""
