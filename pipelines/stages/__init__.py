"""The data stages: download, caption, filter, rank, assemble, evaluate, ablate, and the shard loop they share."""
