"""kvserve's in-tree platform plugins; each registers through the kvserve.platforms entry point group."""
