"""Moving data into the catalogue: ingest, cross-match, batch inference, and the CLI."""
