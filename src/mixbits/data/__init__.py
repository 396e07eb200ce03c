"""Data plumbing: the download cache, embedded texts, and token windows for calibration and evaluation."""
