"""The Huawei Ascend platform (torch.npu through torch_npu)."""
