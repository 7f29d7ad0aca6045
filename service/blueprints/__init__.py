"""HTTP resources of the query service, one blueprint each."""
