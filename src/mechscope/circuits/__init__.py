"""Circuit discovery: the computational graph, edge patching, EAP, EAP-IG, ACDC and circuits."""

from mechscope.circuits.attribution import edge_scores
from mechscope.circuits.graph import Graph
from mechscope.circuits.patch import edge_patch

__all__ = ["Graph", "edge_patch", "edge_scores"]
