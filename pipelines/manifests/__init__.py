"""Parquet manifests, the contract between stages: schema, generations, image references, atomic writes."""
