"""Training plumbing: optimisers and clipping, mixed precision, several processes, checkpoints and
the resume folder."""
