"""A toy out-of-tree kvserve platform (see kvserve_toy_platform.plugin)."""
