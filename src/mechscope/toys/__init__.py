"""Toy models that reproduce classic results: grokking, superposition, induction heads."""
