"""Circuit discovery: the computational graph of a model, edge patching, EAP, EAP-IG, ACDC and circuits.

Example:
    >>> from mechscope.circuits import attribute, faithfulness_curve
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    >>> metric = lambda logits: logits[:, -1, 7] - logits[:, -1, 8]
    >>> circuit = attribute(model, clean, corrupted, metric, method="eap-ig-inputs", steps=5)
    >>> curve = faithfulness_curve(model, circuit, clean, corrupted, metric, sizes=[10, 50])
    >>> circuit.top(10).n_edges, len(curve.faithfulness)
    (10, 2)
"""

from mechscope.circuits.acdc import acdc
from mechscope.circuits.attribution import attribute, edge_scores
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.faithfulness import FaithfulnessCurve, faithfulness_curve, verify_edges
from mechscope.circuits.graph import Graph
from mechscope.circuits.patch import edge_patch, node_patch

__all__ = [
    "Circuit",
    "FaithfulnessCurve",
    "Graph",
    "acdc",
    "attribute",
    "edge_patch",
    "edge_scores",
    "faithfulness_curve",
    "node_patch",
    "verify_edges",
]
