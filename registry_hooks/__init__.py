"""Everything MLflow: the store, training-run logging, lineage, audit artifacts, the registry."""
