"""Cell-level differential privacy of what a site releases: accounting, Gaussian mechanisms, DP-SGD, the release
ledger."""
