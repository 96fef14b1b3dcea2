"""The Qt layer: displays state and dispatches core jobs to worker threads."""
