"""Token sequences as a data set, with the same fields the image path reads (`train_x`, ...).

A causal language model's targets are its inputs (position l predicts token l + 1), so
`train_y` is `train_x` itself and `num_classes` is the vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedleak.data.text.tokenizer import TextTokenizer


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Sequences of `seq_len` token ids (int64 [N, L]) cut from whole documents.

    `documents[i]` is the index (in the corpus order) of the document training sequence i was
    cut from: the attacker's auxiliary sequences and each client's come from disjoint documents.
    """

    name: str
    train_x: Tensor
    test_x: Tensor
    documents: np.ndarray
    tokenizer: TextTokenizer
    source: str

    modality = "tokens"
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split, x in (("train", self.train_x), ("test", self.test_x)):
            if x.ndim != 2 or x.dtype != torch.int64:
                raise ValueError(
                    f"{self.name}: {split}_x must be int64 [N, L], got {x.dtype} {tuple(x.shape)}"
                )
        if self.test_x.shape[1] != self.train_x.shape[1]:
            raise ValueError(f"{self.name}: test and training sequences differ in length")
        if len(self.documents) != len(self.train_x):
            raise ValueError(f"{self.name}: one document index per training sequence expected")

    @property
    def train_y(self) -> Tensor:
        """The next-token targets: the sequences themselves (the model shifts them)."""
        return self.train_x

    @property
    def test_y(self) -> Tensor:
        """The test split's targets, as `train_y`."""
        return self.test_x

    @property
    def num_classes(self) -> int:
        """The vocabulary size: the language model's output classes."""
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (L)."""
        return int(self.train_x.shape[1])

    @property
    def input_shape(self) -> tuple[int]:
        """(L,): one sequence of token ids."""
        return (self.seq_len,)
