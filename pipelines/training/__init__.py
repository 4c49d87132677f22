"""Training on Ray Train: the stages (pretrain, fine-tune, CLIP), their config, the worker loop, tasks and data."""
