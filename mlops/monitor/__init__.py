"""Monitoring: traffic capture on every serving path, drift and SLO analysis, feedback, data checks."""
