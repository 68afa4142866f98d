"""reccc's built-in pass library. Importing it registers every pass (see the `reccc.passes` entry point)."""

from reccc.passes import constant_folding, dead_code_elimination  # noqa: F401  (imported to register)
from reccc.passes import concat_fc_fusion  # noqa: F401  (imported to register)
from reccc.passes import (  # noqa: F401  (imported to register) import legalization passes
    batch_arithmetic,
    embedding_bag_loops,
    explicit_squeeze_axes,
    gru_unrolling,
    reject_baked_dims,
    resolve_static_ifs,
    static_shape_operands,
)
from reccc.passes import embedding_quantization, fc_quantization  # noqa: F401  (imported to register) compression
from reccc.passes import (  # noqa: F401  (imported to register) pruning passes
    dedupe_initializers,
    magnitude_pruning,
    neuron_pruning,
    prune_dead_neurons,
    prune_embedding_rows,
)
from reccc.passes import (  # noqa: F401  (imported to register) canonicalization passes
    canonicalize_shape_chains,
    fold_batchnorm,
    fold_transpose_into_gemm,
    matmul_add_to_gemm,
    merge_reshapes,
    remove_id_casts,
    remove_no_ops,
)
