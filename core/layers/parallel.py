"""Layers split over the tensor-parallel ranks, as Megatron-LM splits them: a column-parallel projection keeps a
slice of the outputs, a row-parallel one a slice of the inputs and sums its partial products over the ranks, the
embedding and the output head a slice of the vocabulary (padded to a multiple of the ranks). With one rank each
is the plain layer. Each reads its slice of a checkpoint tensor through ``checkpoint_slice``, which
``load_weights`` calls with the whole tensor, after checking that tensor's shape."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.core.distributed.parallel_state import tensor_parallel
from kvserve.core.layers.linear import Linear, MergedLinear


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"checkpoint tensor for {name} has shape {tuple(tensor.shape)}, the model expects {shape}")


class RowParallelLinear(Linear):
    """This rank's slice of the inputs; the partial products summed over the ranks, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = tensor_parallel()
        first, count = tp.part(in_features)
        super().__init__(count, out_features, bias=bias)
        self.tp, self.first_input, self.total_inputs = tp, first, in_features

    def checkpoint_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == "bias":
            _expect("a row-parallel bias", tensor, (self.out_features,))
            return tensor
        _expect("a row-parallel weight", tensor, (self.out_features, self.total_inputs))
        return tensor.narrow(1, self.first_input, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        out = self.tp.all_reduce(F.linear(x, self.weight) if self.kernel is None else self.kernel(x, None))
        return out if self.bias is None else out + self.bias


class ColumnParallelLinear(Linear):
    """This rank's slice of the outputs (and of the bias), not gathered: the row-parallel layer after it takes
    them as its slice of the inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        first, count = tensor_parallel().part(out_features)
        super().__init__(in_features, count, bias=bias)
        self.first_output, self.total_outputs = first, out_features

    def checkpoint_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        shape = (self.total_outputs, self.in_features) if name == "weight" else (self.total_outputs,)
        _expect(f"a column-parallel {name}", tensor, shape)
        return tensor.narrow(0, self.first_output, self.out_features)


def _vocab_rows(vocab_size: int) -> tuple[int, int]:
    """(first, count) of this rank's vocabulary rows, the count rounded up so that every rank holds as many."""
    tp = tensor_parallel()
    count = -(-vocab_size // tp.size)
    return tp.rank * count, count


def _vocab_slice(tensor: torch.Tensor, shape: tuple[int, int], first: int, count: int) -> torch.Tensor:
    """Rows [first, first + count) of a [vocabulary, width] ``tensor`` of ``shape``, zeros past its last."""
    _expect("a vocabulary-parallel weight", tensor, shape)
    rows = tensor[first:first + count]
    return F.pad(rows, (0, 0, 0, count - rows.shape[0]))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding: a token outside them looks up zeros, and the ranks' lookups are summed."""

    def __init__(self, vocab_size: int, hidden_size: int):
        first, count = _vocab_rows(vocab_size)
        super().__init__(count, hidden_size)
        self.tp, self.vocab_size, self.first_row = tensor_parallel(), vocab_size, first

    def checkpoint_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return _vocab_slice(tensor, (self.vocab_size, self.embedding_dim), self.first_row, self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.first_row
        inside = (local >= 0) & (local < self.num_embeddings)
        looked_up = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.tp.all_reduce(looked_up * inside[:, None].to(looked_up.dtype))


class ParallelLMHead(Linear):
    """This rank's rows of the output head; the ranks' logits gathered, the padding rows dropped."""

    def __init__(self, hidden_size: int, vocab_size: int):
        first, count = _vocab_rows(vocab_size)
        super().__init__(hidden_size, count, bias=False)
        self.tp, self.vocab_size, self.first_row = tensor_parallel(), vocab_size, first

    @classmethod
    def tied_to(cls, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        with torch.device(embedding.weight.device):
            head = cls(embedding.embedding_dim, embedding.vocab_size)
        head.weight = embedding.weight
        return head

    def checkpoint_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return _vocab_slice(tensor, (self.vocab_size, self.in_features), self.first_row, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if self.tp.size == 1 else self.tp.all_gather(logits, -1)[..., :self.vocab_size]


def qkv_projection(hidden_size: int, num_heads: int, num_kv_heads: int, head_size: int,
                   bias: bool) -> tuple[MergedLinear, int, int]:
    """(the fused q/k/v projection of this rank's heads, its query heads, its key-value heads): num_heads / size
    query heads and num_kv_heads / size key-value heads, or, with fewer key-value heads than ranks, a copy of
    the one its query heads share."""
    tp = tensor_parallel()
    q_first, q_heads = tp.part(num_heads)
    if num_kv_heads >= tp.size:
        kv_first, kv_heads = tp.part(num_kv_heads)
    else:
        kv_first, kv_heads = tp.rank * num_kv_heads // tp.size, 1
    sizes = {"q": q_heads * head_size, "k": kv_heads * head_size, "v": kv_heads * head_size}
    rows = {"q": (q_first * head_size, num_heads * head_size), "k": (kv_first * head_size, num_kv_heads * head_size),
            "v": (kv_first * head_size, num_kv_heads * head_size)}
    return MergedLinear(hidden_size, sizes, bias=bias, checkpoint_rows=rows), q_heads, kv_heads
