"""The report's parts: metrics rows, statistics over seeds, and figures (pipeline_steps/report.py)."""
