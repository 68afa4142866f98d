"""Relax operator fusion as reccc runs it: TVM's zero pipeline, with each embedding lookup grouped
into one kernel first, and the lookups a concatenation joins into one kernel with it.

TVM's FuseOps treats a gather (`take`) as opaque, since its loads are indexed by loaded ids, so a
quantized lookup (gather the codes, gather the row's scale and bias, cast, multiply, add, and the bag's
pooling) would run as several kernels that write the gathered rows to memory and read them back.
Marking gathers fusable would also let FuseOps merge them into whatever reads them, any injective op
included, so this pass groups only the lookup chains and their concatenations, and leaves the rest of
the module to FuseOps as before:

- a lookup starts at a gather from a table (a `call_tir` of a one-block PrimFunc that reads its first
  argument at an index it loads, where that argument is a constant, or a parameter of the function
  as the tables are with --weights=external);
- its row side is what such gathers flow into through cheap ops (elementwise, broadcast, injective,
  and reductions such as a bag's sum), and a concatenation of such rows, unless one of them is
  pooled: the CPU rules copy each source of a concatenation in a loop of its own
  (cpu_schedules._copy_segments), so a table's row goes straight into its columns of the
  concatenated row, one kernel for a DLRM's lookups and their Concat instead of one per table and
  a copy (the int8 DLRM-style model 6% to 8% faster at batch 64); a pooled row stays a kernel of its
  own, the reduction's loop nest apart from the copies;
- its id side is the cheap ops computed from the function's inputs and constants alone (the id
  wrap-around of negative ids, int4's row-pair arithmetic) that only the lookup reads.

A group is a member of the row side and what it is computed from on both sides, less what is also
read outside the group (which comes in as an input): latest first, the largest such groups with a
gather and one output, which is then made a primitive Relax function that FuseTIR turns into one
PrimFunc (named `fused_lookup...`).
"""

import tvm
from tvm import relax, s_tir, tirx

from reccc.targets.scalar_constants import inline_scalar_constants
from reccc.targets.tir_expressions import has_load

OP_PATTERN_INJECTIVE = 2  # tvm::relax::OpPatternKind: elementwise 0, broadcast 1, injective 2
OP_PATTERN_COMM_REDUCE = 3
GROUP_PREFIX = "fused_lookup"


def reads_at_loaded_index(block) -> bool:
    """Whether `block` reads a buffer at an index it loads from another (a gather)."""
    return any(has_load(extent.min) for read in block.reads for extent in read.region)


def is_gather(function: tirx.PrimFunc) -> bool:
    """One block that reads a buffer at an index it loads (TOPI's take)."""
    schedule = s_tir.Schedule(function)
    blocks = schedule.get_child_blocks(schedule.get_sblock("root"))
    return len(blocks) == 1 and reads_at_loaded_index(schedule.get(blocks[0]))


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


class _Kinds:
    """What each `call_tir` binding of a function computes, as far as grouping is concerned."""

    def __init__(self, module: tvm.IRModule):
        self.module = module
        self._gather: dict[str, bool] = {}

    def callee(self, value) -> tirx.PrimFunc | None:
        if not (isinstance(value, relax.Call) and value.op.same_as(_CALL_TIR)):
            return None
        function = self.module.functions.get(value.args[0])
        return function if isinstance(function, tirx.PrimFunc) else None

    def is_table_gather(self, value, computed: dict) -> bool:
        """A gather from a constant, or from a tensor the function is given (--weights=external
        passes the tables as parameters): not from a value the block computes."""
        function = self.callee(value)
        if function is None or not value.args[1].fields:  # a kernel of constants alone (scalar_constants.py)
            return False
        table = value.args[1].fields[0]
        if not (isinstance(table, tvm.ir.GenericConst) or (isinstance(table, relax.Var) and table not in computed)):
            return False
        name = value.args[0].name_hint
        if name not in self._gather:
            self._gather[name] = is_gather(function)
        return self._gather[name]

    def is_concatenation(self, value) -> bool:
        return self.callee(value) is not None and value.args[0].name_hint.startswith("concatenate")  # LegalizeOps' name for relax.concat

    def _pattern(self, value) -> int | None:
        function = self.callee(value)
        pattern = function.attrs.get("op_pattern") if function is not None and function.attrs is not None else None
        return None if pattern is None else int(pattern)

    def is_cheap(self, value) -> bool:
        pattern = self._pattern(value)
        return not self.is_concatenation(value) and pattern is not None and (pattern <= OP_PATTERN_INJECTIVE or pattern == OP_PATTERN_COMM_REDUCE)

    def is_reduction(self, value) -> bool:
        return self._pattern(value) == OP_PATTERN_COMM_REDUCE


def _argument_vars(value) -> list[relax.Var]:
    return [arg for arg in value.args[1].fields if isinstance(arg, relax.Var)]


def find_groups(block: relax.DataflowBlock, kinds: _Kinds, escaping: set) -> list[list[int]]:
    """Binding indices of each lookup group of `block`, in binding order. `escaping` holds the
    variables the block outputs (read after it)."""
    bindings = list(block.bindings)
    defined = {binding.var: index for index, binding in enumerate(bindings)}
    readers: dict[int, set[int]] = {index: set() for index in range(len(bindings))}
    reads: dict[int, set[int]] = {index: set() for index in range(len(bindings))}
    for index, binding in enumerate(bindings):
        for var in relax.analysis.free_vars(binding.value):
            if var in defined:
                readers[defined[var]].add(index)
                reads[index].add(defined[var])
    row_side, id_side, gathers, pooled = set(), set(), set(), set()
    for index, binding in enumerate(bindings):
        value = binding.value
        inputs = [defined[var] for var in _argument_vars(value) if var in defined] if kinds.callee(value) else []
        if kinds.is_table_gather(value, defined):
            gathers.add(index)
            row_side.add(index)
        elif kinds.is_cheap(value) and any(i in row_side for i in inputs):
            row_side.add(index)
            if kinds.is_reduction(value) or any(i in pooled for i in inputs):
                pooled.add(index)
        elif kinds.is_concatenation(value) and any(i in row_side for i in inputs) and not any(i in pooled for i in inputs):
            row_side.add(index)
        elif kinds.is_cheap(value) and all(i in id_side for i in inputs):
            id_side.add(index)
    return sorted(_single_output_groups(sorted(row_side | id_side), readers, reads, {defined[var] for var in escaping if var in defined}, gathers))


def _single_output_groups(members: list[int], readers: dict[int, set[int]], reads: dict[int, set[int]], escaping: set[int],
                          gathers: set[int]) -> list[list[int]]:
    """Disjoint groups of `members`, each with a table gather and one output, last in binding order:
    every other member flows into it, so no value leaves the group and comes back, and the group's
    call can stand where its last binding stood. Latest outputs first, a group is the member and the
    members it is computed from, less what is also read outside the group (an input then, and so, in
    turn, may be the values it reads): where a lookup's rows flow on into several readers (DeepFM's
    embeddings into the FM interaction and the MLP), the group ends at the rows, and ids clipped once
    for several tables come in clipped."""
    available, groups = set(members), []
    for last in reversed(members):
        if last not in available:
            continue
        group = _sources(last, reads, available)
        shrunk = True
        while shrunk:
            leaving = {i for i in group - {last} if readers[i] - group or i in escaping}
            shrunk = bool(leaving)
            group = _sources(last, reads, group - leaving)
        if group & gathers:
            groups.append(sorted(group))
            available -= group
    return groups


def _sources(last: int, reads: dict[int, set[int]], allowed: set[int]) -> set[int]:
    """`last` and the members of `allowed` it is computed from through members of `allowed`."""
    group, frontier = {last}, [last]
    while frontier:
        for source in reads[frontier.pop()] & allowed - group:
            group.add(source)
            frontier.append(source)
    return group


def _group_function(bindings: list[relax.VarBinding]) -> tuple[relax.Function, list[relax.Expr]]:
    """A primitive function computing `bindings` (the last is its result), and the arguments to call it
    with: the variables and constants the group reads from outside."""
    defined = {binding.var for binding in bindings}
    arguments: list[relax.Expr] = []
    for binding in bindings:
        for arg in binding.value.args[1].fields:
            if not (arg in defined or any(arg.same_as(known) for known in arguments)):
                arguments.append(arg)
    # A symbolic scalar the kernels take (a dim such as the batch, when no tensor argument's shape is
    # that plain var: ids of batch * 3 rows) comes in through a shape parameter, as FuseOps passes
    # them, which defines the var in the function; a scalar parameter would not, and the result's
    # shape would be unknown (FuseTIR then fails).
    symbolic = [arg for arg in arguments if isinstance(arg, tirx.Var) and isinstance(arg.ty, tvm.ir.type.PrimType)]
    arguments = [arg for arg in arguments if not any(arg.same_as(var) for var in symbolic)]
    params = [relax.Var(f"arg{index}", arg.ty) for index, arg in enumerate(arguments)]
    if symbolic:
        arguments.append(relax.ShapeExpr(symbolic))
        params.append(relax.Var("symbolic_dims", arguments[-1].ty))
    builder = relax.BlockBuilder()
    with builder.function(GROUP_PREFIX, params, attrs={"Primitive": 1}, private=True):
        with builder.dataflow():
            renamed = {}
            for position, binding in enumerate(bindings):
                call = binding.value
                fields = [renamed[arg] if arg in renamed else arg if any(arg.same_as(var) for var in symbolic)
                          else _param_of(arg, arguments, params) for arg in call.args[1].fields]
                value = relax.Call(call.op, [call.args[0], relax.Tuple(fields), *call.args[2:]], call.attrs, call.ty_args)
                emit = builder.emit_output if position == len(bindings) - 1 else builder.emit
                renamed[binding.var] = emit(value, name_hint=binding.var.name)
            result = renamed[bindings[-1].var]
        builder.emit_func_output(result)
    return builder.get()[GROUP_PREFIX], arguments


def _param_of(argument: relax.Expr, arguments: list[relax.Expr], params: list[relax.Var]) -> relax.Var:
    return next(param for param, known in zip(params, arguments) if known.same_as(argument))


@relax.expr_functor.mutator
class _GroupRewriter(relax.PyExprMutator):
    def __init__(self, module: tvm.IRModule):
        super().__init__(module)
        self.kinds = _Kinds(module)

    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> relax.BindingBlock:
        escaping = {binding.var for binding in block.bindings if not isinstance(binding.var, relax.DataflowVar)}
        groups = find_groups(block, self.kinds, escaping)
        if not groups:
            return super().visit_dataflow_block_(block)
        bindings = list(block.bindings)
        grouped = {index: group for group in groups for index in group}
        self.builder_._begin_dataflow_block()
        for index, binding in enumerate(bindings):
            group = grouped.get(index)
            if group is None:
                self.visit_binding(binding)
            elif index == group[-1]:
                function, arguments = _group_function([bindings[i] for i in group])
                symbol = self.builder_.add_func(function, GROUP_PREFIX)
                call = relax.Call(symbol, [self.visit_expr(arg) for arg in arguments])
                var = binding.var
                new = self.builder_.emit_output(call, name_hint=var.name) if not isinstance(var, relax.DataflowVar) else self.builder_.emit(call, name_hint=var.name)
                self.set_var_remap(var, new)
        return self.builder_._end_block()


@tvm.transform.module_pass(opt_level=0, name="GroupLookups")
def group_lookups(module: tvm.IRModule, _context) -> tvm.IRModule:
    """Each lookup of a legalized, pattern-annotated module (see the module's docstring) becomes a call
    of a primitive function, which FuseOps leaves alone and FuseTIR fuses into one kernel."""
    rewriter = _GroupRewriter(module)
    for symbol, function in list(module.functions.items()):
        if isinstance(function, relax.Function) and not (function.attrs and function.attrs.get("Primitive")):
            rewriter.builder_.update_func(symbol, rewriter.visit_expr(function))
    return rewriter.builder_.finalize()


def fuse_operators() -> tvm.transform.Pass:
    """TVM's zero pipeline (legalize, annotate op patterns, fold constants, fuse, merge the fused
    PrimFuncs), with the lookups grouped after constant folding (which turns what is left of the
    tables' row counts, read through shape_of in the id wrap-around, into constants: the build folds
    the static ones first, relax_lowering.fold_static_dim_reads) and the scalar constants written into
    the kernels that read them (scalar_constants.py)."""
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            inline_scalar_constants,
            group_lookups,
            relax.get_pipeline("zero"),
        ],
        name="reccc.FuseOperators",
    )
