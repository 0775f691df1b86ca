"""Reference captioners, one family per module, each following the model-file contract."""
