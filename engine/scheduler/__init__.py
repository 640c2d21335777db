"""Continuous-batching scheduler (no torch): who runs this step, and how many tokens each."""
from engine.scheduler.scheduler import Scheduler

__all__ = ["Scheduler"]
