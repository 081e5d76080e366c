"""Text corpora and task datasets (IOI, induction, greater-than, factual recall)."""
