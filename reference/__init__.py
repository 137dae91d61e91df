"""Pure-PyTorch reference attention math (float64-capable). Imports nothing of ours."""
