"""The Intel GPU platform (torch.xpu, with intel-extension-for-pytorch's kernels where installed)."""
