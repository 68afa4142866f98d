"""dead-code-elimination: remove nodes whose outputs reach no graph output, and initializers no node reads.

Graph inputs stay even when unused: they are the compiled model's interface, and callers pass them.
"""

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.graph_delta import structure


@register_pass
class DeadCodeElimination(Pass):
    name = "dead-code-elimination"
    summary = "remove nodes that reach no output and initializers that no node reads; inputs are kept"

    def call(self, model: Model) -> bool:
        before = structure(model.graph)
        model.graph.cleanup(remove_unused_graph_inputs=False)
        return structure(model.graph) != before
