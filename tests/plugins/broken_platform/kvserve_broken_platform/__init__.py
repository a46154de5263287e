"""A platform plugin whose vendor SDK is missing."""
