"""Model-agnostic training machinery: schedules, losses, optimizer, jitted steps, checkpoints, loop."""
