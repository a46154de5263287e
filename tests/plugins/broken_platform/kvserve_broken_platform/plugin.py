"""Stands in for a vendor plugin whose SDK is not installed: importing it fails."""
raise ImportError("vendor SDK missing")
