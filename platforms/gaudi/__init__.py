"""The Intel Gaudi platform (torch.hpu through habana_frameworks)."""
