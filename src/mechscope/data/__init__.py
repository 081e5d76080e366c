"""Text corpora and task datasets (IOI, induction, greater-than, factual recall).

Example:
    >>> from mechscope.data import induction_dataset
    >>> induction_dataset(n=2, seq_len=4, d_vocab=50).clean_tokens.shape
    torch.Size([2, 7])
"""

from mechscope.data.tasks import (
    TaskDataset,
    factual_recall_dataset,
    greater_than_dataset,
    induction_dataset,
    ioi_dataset,
    single_token_words,
    tokenize_pairs,
)

__all__ = [
    "TaskDataset",
    "factual_recall_dataset",
    "greater_than_dataset",
    "induction_dataset",
    "ioi_dataset",
    "single_token_words",
    "tokenize_pairs",
]
