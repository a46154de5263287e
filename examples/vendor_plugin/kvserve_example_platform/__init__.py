"""A template kvserve platform plugin (see docs/plugins.md, "Writing a platform plugin")."""
