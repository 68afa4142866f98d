"""What onnxruntime's symbolic shape inference knows about a model's shape-like values and shapes, in
terms of the graph inputs' symbolic dims (dim_params).

It is onnxruntime's tool (onnxruntime.tools.symbolic_shape_infer, which needs sympy); reccc reads its
results after running it on a skeleton of the model (weights left out), and keeps what it inferred
before it gave up on a node (it fails on some graphs with If).
"""

import math

import onnx
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

# Initializers larger than this are left out of the copy the symbolic inference reads (it reads only
# shape-like values).
_SKELETON_MAX_ELEMENTS = 64

def symbolic_values(proto: onnx.ModelProto) -> tuple[dict[str, list], dict[str, list], str | None]:
    """(values of shape-like tensors, shapes, why the inference stopped early or None), by tensor name;
    value entries are ints or sympy expressions of the graph inputs' dim_params, shape entries ints
    (0: unknown) or dim_param names."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    weights = [t for t in skeleton.graph.initializer if math.prod(t.dims) > _SKELETON_MAX_ELEMENTS]
    for tensor in weights:  # declared as inputs: the inference reads their shapes only
        skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        skeleton.graph.initializer.remove(tensor)
    inference = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
    failure = None
    try:
        inference._preprocess(skeleton)  # its infer_shapes() would write a file to the working dir on failure
        while inference.run_:
            inference._infer_impl()
    except Exception as error:  # noqa: BLE001 - what it inferred before the failing node stays valid
        failure = f"{type(error).__name__}: {error}"
    shapes = {}
    for name, info in inference.known_vi_.items():
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[name] = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
    return dict(inference.sympy_data_), shapes, failure


