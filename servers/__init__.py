"""Reference servers (one module per dialect) that follow the closure rules."""
