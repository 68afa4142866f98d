"""A fingerprint of a graph's structure, to tell whether a graphsurgeon call changed anything."""

import onnx_graphsurgeon as gs


def structure(graph: gs.Graph) -> tuple:
    """Nodes with their input/output tensor names, plus which tensors are constants."""
    nodes = tuple((node.op, tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs)) for node in graph.nodes)
    constants = frozenset(name for name, t in graph.tensors().items() if isinstance(t, gs.Constant))
    return nodes, constants
