"""The model runner: turns a ScheduledBatch into tensors, runs the model, samples."""
