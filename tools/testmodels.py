"""Builders for the testsuite's recommender models, written with onnx.helper (no framework needed).

Every model has a symbolic batch dim "batch" and carries the shapes exporters emit: Gemm with
transposed weights, a Shape->Gather->Concat->Reshape chain around the batch, a weight computed from
constants (for constant folding) and a dead debug branch (for dead-code elimination).

    python tools/testmodels.py            # rewrite testsuite/models/*.onnx
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
MODELS_DIR = Path(__file__).resolve().parent.parent / "testsuite" / "models"


class _GraphBuilder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, output: str | None = None, **attrs) -> str:
        out = output or self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weights(self, rows: int, cols: int) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def mlp(self, x: str, sizes: list[int], last_activation: bool) -> str:
        """Gemm layers as PyTorch's exporter writes nn.Linear: weight [out, in] with transB=1."""
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            w = self.const("fc_w", self.weights(fan_out, fan_in))
            b = self.const("fc_b", (0.1 * self.rng.standard_normal(fan_out)).astype(np.float32))
            x = self.node("Gemm", [x, w, b], "fc", transB=1)
            if last_activation or i < len(sizes) - 2:
                x = self.node("Relu", [x])
        return x

    def table(self, rows: int, dim: int, std: float = 0.05) -> str:
        return self.const("emb", (std * self.rng.standard_normal((rows, dim))).astype(np.float32))

    def lookup(self, ids: str, rows: int, dim: int, std: float = 0.05) -> str:
        return self.node("Gather", [self.table(rows, dim, std), ids], "emb_out", axis=0)

    def flatten_keep_batch(self, x: str, inner: int) -> str:
        """Reshape to [batch, inner] with the shape computed from Shape(x), as torch exports x.view(x.size(0), -1)."""
        shape = self.node("Shape", [x])
        batch = self.node("Gather", [shape, self.const("zero", np.array(0, np.int64))], axis=0)
        batch = self.node("Unsqueeze", [batch, self.const("axis", np.array([0], np.int64))])
        target = self.node("Concat", [batch, self.const("inner", np.array([inner], np.int64))], axis=0)
        return self.node("Reshape", [x, target])

    def dead_branch(self, x: str) -> None:
        """A debug tensor nobody reads, as left behind by tracing."""
        self.node("Relu", [self.node("Mul", [x, self.const("scale", np.array(2.0, np.float32))])], "debug")

    def model(self, name: str, outputs: list[tuple[str, list]]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            self.inputs,
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape) for out, shape in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="reccc-testmodels")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def dlrm(tables: int = 4, rows: int = 1000, dim: int = 16, dense: int = 13,
         bottom: tuple[int, ...] = (64,), top: tuple[int, ...] = (64, 32), seed: int = 0, table_std: float = 0.05) -> onnx.ModelProto:
    """DLRM-style: bottom MLP on dense features, one embedding per categorical feature, concat, top MLP, sigmoid.
    Table values are drawn from N(0, table_std^2)."""
    g = _GraphBuilder(seed)
    x = g.input("dense", TensorProto.FLOAT, ["batch", dense])
    bottom_out = g.mlp(x, [dense, *bottom, dim], last_activation=True)
    g.dead_branch(bottom_out)
    embedded = [g.lookup(g.input(f"cat_{i}", TensorProto.INT64, ["batch"]), rows, dim, table_std) for i in range(tables)]
    joined = g.node("Concat", [bottom_out, *embedded], axis=1)
    # The first top layer's weight is stored transposed and transposed back at run time: constant folding removes it.
    width = dim * (tables + 1)
    w = g.node("Transpose", [g.const("top_w_t", g.weights(width, top[0]))], perm=[1, 0])
    hidden = g.node("Relu", [g.node("Gemm", [joined, w, g.const("top_b", np.zeros(top[0], np.float32))], transB=1)])
    logit = g.mlp(hidden, [top[0], *top[1:], 1], last_activation=False)
    return g.model("dlrm", [(g.node("Sigmoid", [logit], output="ctr"), ["batch", 1])])


def wide_and_deep(fields: int = 3, rows: int = 500, dim: int = 8, dense: int = 6, seed: int = 1) -> onnx.ModelProto:
    """Wide&Deep: a linear (wide) part over ids and dense features plus a deep MLP over embeddings."""
    g = _GraphBuilder(seed)
    x = g.input("dense", TensorProto.FLOAT, ["batch", dense])
    ids = [g.input(f"cat_{i}", TensorProto.INT64, ["batch"]) for i in range(fields)]
    wide_terms = [g.lookup(i, rows, 1) for i in ids] + [g.node("MatMul", [x, g.const("wide_w", g.weights(dense, 1))])]
    wide = wide_terms[0]
    for term in wide_terms[1:]:
        wide = g.node("Add", [wide, term])
    deep_in = g.node("Concat", [x, *[g.lookup(i, rows, dim) for i in ids]], axis=1)
    deep = g.mlp(deep_in, [dense + fields * dim, 32, 16, 1], last_activation=False)
    g.dead_branch(deep)
    return g.model("wide_and_deep", [(g.node("Sigmoid", [g.node("Add", [wide, deep])], output="prob"), ["batch", 1])])


def two_tower(rows: int = 800, dim: int = 16, dense: int = 8, hidden: tuple[int, ...] = (32, 16), seed: int = 2) -> onnx.ModelProto:
    """Two-tower retrieval: user and item towers, each an embedding plus dense features through an MLP
    (`hidden` units, the last one the vectors' width), dot product."""
    g = _GraphBuilder(seed)
    towers = []
    for side in ("user", "item"):
        ids = g.input(f"{side}_id", TensorProto.INT64, ["batch"])
        feats = g.input(f"{side}_features", TensorProto.FLOAT, ["batch", dense])
        joined = g.node("Concat", [g.lookup(ids, rows, dim), feats], axis=1)
        towers.append(g.mlp(joined, [dim + dense, *hidden], last_activation=False))
    product = g.node("Mul", towers)
    score = g.node("ReduceSum", [product, g.const("axis", np.array([1], np.int64))], output="score", keepdims=1)
    user_vector = g.node("Identity", [towers[0]], output="user_vector")
    return g.model("two_tower", [(score, ["batch", 1]), (user_vector, ["batch", hidden[-1]])])


def deepfm(fields: int = 5, rows: int = 300, dim: int = 8, hidden: tuple[int, ...] = (32, 16), seed: int = 3) -> onnx.ModelProto:
    """DeepFM over one [batch, fields] id input: first-order weights, FM pairwise interaction, deep MLP
    with `hidden` units."""
    g = _GraphBuilder(seed)
    ids = g.input("feat_ids", TensorProto.INT64, ["batch", fields])
    first = g.node("ReduceSum", [g.lookup(ids, rows, 1), g.const("axes", np.array([1, 2], np.int64))], keepdims=0)
    first = g.node("Unsqueeze", [first, g.const("axis", np.array([1], np.int64))])
    v = g.lookup(ids, rows, dim)  # [batch, fields, dim]
    fields_axis = g.const("fields_axis", np.array([1], np.int64))
    square_of_sum = g.node("Mul", [g.node("ReduceSum", [v, fields_axis], keepdims=0)] * 2)
    sum_of_square = g.node("ReduceSum", [g.node("Mul", [v, v]), fields_axis], keepdims=0)
    half = g.const("half", np.array(0.5, np.float32))
    fm = g.node("Mul", [half, g.node("ReduceSum", [g.node("Sub", [square_of_sum, sum_of_square]), fields_axis], keepdims=1)])
    deep = g.mlp(g.flatten_keep_batch(v, fields * dim), [fields * dim, *hidden, 1], last_activation=False)
    logit = g.node("Add", [g.node("Add", [first, fm]), deep])
    return g.model("deepfm", [(g.node("Sigmoid", [logit], output="prob"), ["batch", 1])])


TESTSUITE = {"dlrm": dlrm, "wide_and_deep": wide_and_deep, "two_tower": two_tower, "deepfm": deepfm}


def main() -> None:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in TESTSUITE.items():
        path = MODELS_DIR / f"{name}.onnx"
        onnx.save(build(), path)
        print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
