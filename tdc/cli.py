"""The `tdc` command line.

Errors print as one line on stderr and exit non-zero; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import __version__
from .errors import TdcError

ELIDE_ABOVE = 64     # tdc dump prints constants of more elements in short (ResNet-50's made 187 MB of text)
MODEL_HELP = "FILE.py[:NAME] (a Python file with @tdc.model functions), FILE.tdc (IR text) or FILE.onnx"


def _add_model(p: argparse.ArgumentParser):
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="batch size to trace the model at (default: the model's own)")
    p.add_argument("--bind", action="append", default=[], metavar="NAME=FILE.npy|V,V,...",
                   help="ONNX models: the value of a graph input that sets a shape (a Reshape's shape, "
                        "reduction axes), fixed at import; repeatable")


def _add_training(p: argparse.ArgumentParser):
    from .runtime.trainer import add_optimizer_arguments
    add_optimizer_arguments(p)


def add_conv_algo_arguments(p: argparse.ArgumentParser) -> None:
    """--conv-algo and --autotune, for every command that compiles a graph (run, train, dump, compile)."""
    from .ops.conv import CONV_ALGOS
    p.add_argument("--conv-algo", default="auto", choices=CONV_ALGOS, metavar="ALGO",
                   help="convolution algorithm for every layer that does not choose one in the model: "
                        + "|".join(CONV_ALGOS) + " (default auto: the cost model picks per layer; winograd: "
                        "F(2x2,3x3) or F(4x4,3x3); a layer the algorithm cannot compute keeps the best legal one)")
    p.add_argument("--autotune", action="store_true",
                   help="time the candidate algorithms of each convolution on first compile instead of using the "
                        "cost model (cached per layer shape, dtype and machine in ~/.cache/tdc/autotune.json)")


def add_sparse_argument(p: argparse.ArgumentParser) -> None:
    """--sparse, for the commands that take inference weights (run, compile, dump)."""
    p.add_argument("--sparse", default="auto", metavar="MODE",
                   help="pruned linear and conv2d layers as CSR products, for inference with --weights: auto (default: where "
                        "the backend's cost model says the sparse kernel is faster), on (every layer with zeros in "
                        "its weight) or off")


def apply_sparse(args, graph, params, backend: str, training: bool = False):
    """(graph, params, decisions): the inference graph with the layers --sparse picks as sparse_linear
    or sparse_conv2d."""
    from .passes.sparsify import MODES, sparsify
    if args.sparse not in MODES:
        raise TdcError(f"--sparse must be one of {', '.join(MODES)}, not {args.sparse!r}")
    if args.sparse == "off" or (args.sparse == "auto" and (training or not args.weights)):
        return graph, params, []
    if training:
        raise TdcError("--sparse on is for inference: a training step updates the weights a CSR layer was built from")
    if not args.weights:
        raise TdcError("--sparse on needs the pruned weights: give --weights FILE")
    target = None
    if args.sparse == "auto":
        if backend == "reference":     # no kernels to price: the reference computes densely either way
            return graph, params, []
        from .backends import get_target
        target = get_target(backend)
    return sparsify(graph, params, target, args.sparse)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """--quantize int8 and its calibration, for the commands that take inference weights (run,
    compile, dump)."""
    from .runtime.quantize import DEFAULT_CALIBRATION_SAMPLES
    p.add_argument("--quantize", metavar="int8",
                   help="post-training int8 quantization of the linear and conv2d layers of --weights (per-channel "
                        "weights, per-tensor activations over ranges from --calibrate, or the ranges tdc train "
                        "--qat saved with the weights); weight sharing (kmeans:K) is tdc compress's")
    p.add_argument("--calibrate", metavar="DATA",
                   help="with --quantize int8: data as tdc train --data takes it; the activation ranges are "
                        "the min and max over the first --calibrate-samples samples of its training split "
                        "(given with QAT weights, it recalibrates instead of using their ranges)")
    p.add_argument("--calibrate-samples", type=int, metavar="N",
                   help=f"with --calibrate: how many samples (default {DEFAULT_CALIBRATION_SAMPLES})")


def _qat_range_names(names) -> list[str]:
    from .passes.quantize import OBSERVED, RANGE_SUFFIXES
    return [k for k in names if k.endswith(RANGE_SUFFIXES) or k == OBSERVED]


def load_inference_weights(args, graph, src) -> dict:
    """The params of --weights (or the model's own), plus any activation ranges tdc train --qat
    saved with them (which --quantize int8 reads; without it they are ignored, unreported)."""
    from .ir.weights import CHECKPOINT_STATE, load_npz, load_weights
    if not args.weights:
        return src.params
    data = load_npz(args.weights)
    if any(k.startswith(CHECKPOINT_STATE) for k in data):
        data = {k[len(CHECKPOINT_STATE):]: v for k, v in data.items() if k.startswith(CHECKPOINT_STATE)}
    known = {a.name for a in graph.args}
    ranges = {k: data[k] for k in _qat_range_names(data) if k not in known}
    unused = [k for k in data if k not in known and k not in ranges]
    params = load_weights(args.weights, graph, warn=None if unused else (lambda message: None))
    return {**params, **ranges}


def apply_quantize(args, graph, params, backend: str, training: bool = False, partitioned: bool = False):
    """(graph, params, how): with --quantize int8, the int8 graph (tdc/passes/quantize.py) over
    the ranges QAT saved in --weights or calibrated on --calibrate; else the graph unchanged
    (how None) and params without QAT's ranges."""
    from .passes.quantize import learned_ranges, observed, quantize_int8
    floats = None if params is None else {k: v for k, v in params.items() if k not in _qat_range_names(params)}
    if args.quantize is None:
        if args.calibrate is not None or args.calibrate_samples is not None:
            raise TdcError("--calibrate and --calibrate-samples go with --quantize int8")
        return graph, floats, None
    if args.quantize.startswith("kmeans"):
        raise TdcError(f"--quantize {args.quantize}: k-means weight sharing is tdc compress's (its compressed "
                       "model file is then --weights here); tdc run, compile and dump take --quantize int8")
    if args.quantize != "int8":
        raise TdcError(f"--quantize must be int8, not {args.quantize!r}")
    if training:
        raise TdcError("--quantize int8 is for inference: a training step updates float weights "
                       "(quantization-aware training is tdc train --qat)")
    if partitioned:
        raise TdcError("--quantize int8 applies to one-process inference, not partitioned graphs")
    if args.sparse == "on":
        raise TdcError("--quantize int8 and --sparse on exclude each other: the int8 kernels are dense")
    if not args.weights:
        raise TdcError("--quantize int8 needs the trained weights: give --weights FILE")
    if not observed(graph):
        raise TdcError(f"--quantize int8: {graph.name} has no linear or conv2d layer with param weights to quantize")
    ranges = None if args.calibrate else learned_ranges(graph, params)
    if ranges is None:
        if not args.calibrate:
            raise TdcError("--quantize int8 needs activation ranges: give --calibrate DATA (or weights from "
                           "tdc train --qat, which hold them)")
        from .runtime.data import fit_to_model, load_data
        from .runtime.quantize import DEFAULT_CALIBRATION_SAMPLES, calibrate
        n = args.calibrate_samples if args.calibrate_samples is not None else DEFAULT_CALIBRATION_SAMPLES
        if n < 1:
            raise TdcError(f"--calibrate-samples must be >= 1, got {n}")
        if len(graph.inputs) != 1:
            raise TdcError(f"--calibrate feeds one input; {graph.name} takes {len(graph.inputs)}")
        data = load_data(args.calibrate)
        x = fit_to_model(data.x_train[:n], graph.inputs[0].type, f"{data.name} calibration")
        ranges = calibrate(graph, floats, x, backend)
        how = f"calibrated on {len(x)} samples of {data.name}"
    else:
        how = "over the ranges learned by quantization-aware training"
    qg, qp = quantize_int8(graph, floats, ranges)
    return qg, qp, how


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tdc", description="tdc: compile tensor dataflow models (Python DSL, IR text) and run or train them.",
        epilog="Run `tdc COMMAND --help` for a command's options. Examples:\n"
               "  tdc dump examples/lenet.py\n"
               "  tdc dump examples/lenet.py --after autodiff\n"
               "  tdc run examples/mlp.py --random-inputs --seed 1\n"
               "  tdc train examples/digits.py --epochs 10",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"tdc {__version__}")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("dump", help="print a model's IR, optionally after compiler passes",
                       description="Print a model at any stage of the compile: the IR as traced, after any pass, "
                                   "the kernel plan and memory plan the backends render, or their code.\n"
                                   "  inference pipeline: bnfold,fold,simplify,cse,dce,conv_algo,fuse\n"
                                   "  training pipeline:  loss,autodiff,optimizer,fold,simplify,cse,dce, then the "
                                   "inference pipeline\n"
                                   "  with --ranks N:     loss,[sync_batchnorm,]autodiff,data_parallel,optimizer,...\n"
                                   "  with --prune S:     loss,autodiff,optimizer,prune,...",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(d)
    g = d.add_mutually_exclusive_group()
    g.add_argument("--after", metavar="PASS", help="run the pipeline up to the first PASS and print the result "
                   "(a training pass such as autodiff selects the training pipeline)")
    g.add_argument("--all", action="store_true", help="print every stage: as traced, after every pass, the kernel "
                   "plan and the memory plan")
    d.add_argument("--train", action="store_true", help="the training step (alone: as the training passes leave it)")
    d.add_argument("--backend", default="llvm", choices=("llvm", "numba"),
                   help="whose compile to show (convolution algorithms are priced per backend; default: llvm, "
                        "as for run and train)")
    d.add_argument("--plan", action="store_true", help="print the kernel plan: each kernel, what it computes and "
                   "where its results live")
    _add_training(d)
    d.add_argument("--format", choices=("text", "dot"), default="text", help="IR text or Graphviz DOT")
    d.add_argument("--full-constants", action="store_true",
                   help=f"print every value of constants of more than {ELIDE_ABOVE} elements (by default they "
                        "print in short: dtype, shape, a hash and a few values); the text then parses back exactly")
    d.add_argument("--rank", type=int, metavar="R",
                   help="with --ranks N --parallel model|pipeline|tensor|spatial: rank R's program (the nodes it "
                        "runs, with its sends, receives and collectives)")
    d.add_argument("--partition", action="store_true",
                   help="with --parallel model|pipeline|tensor|spatial: how the step was partitioned and why (the cost "
                        "model's stages against an equal-layer split, the split layers, the rows per rank)")
    d.add_argument("--memory", action="store_true",
                   help="print the memory table (weights, activations, gradients, optimizer state; peak "
                        "before and after planning) of the graph after the pipeline")
    d.add_argument("--source", action="store_true", help="print the Numba source generated for the graph")
    d.add_argument("--llvm", action="store_true", help="print the LLVM IR generated for the graph")
    d.add_argument("--asm", action="store_true", help="print the optimised machine code for this CPU")
    d.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    d.add_argument("--weights", metavar="FILE", help="params of the inference graph (with --sparse: which layers "
                   "are pruned enough to run as CSR products; the dump lists every layer's density and choice)")
    add_sparse_argument(d)
    add_quantize_arguments(d)
    add_conv_algo_arguments(d)
    from .runtime.launch import add_parallel_arguments
    add_parallel_arguments(d)

    r = sub.add_parser("run", help="run a model on inputs and print or save its outputs",
                       description="Run a model's inference graph. Params come from --weights or are "
                                   "initialised from --seed.")
    _add_model(r)
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input array")
    r.add_argument("--random-inputs", action="store_true", help="feed seeded random inputs of the right shapes")
    r.add_argument("--save-inputs", metavar="DIR", help="write the inputs used as DIR/NAME.npy")
    r.add_argument("--seed", type=int, default=0, help="seed for param initialisation and random inputs")
    r.add_argument("--weights", metavar="FILE.npz", help="params (and state) saved by tdc")
    r.add_argument("--backend", default="llvm", choices=("llvm", "numba", "reference"),
                   help="llvm (native code, compiled in about a second; the default), numba (generated Numba "
                        "source; its first compile takes up to a minute) or reference (the numpy interpreter)")
    r.add_argument("--output", action="append", default=[], metavar="[NAME=]FILE.npy",
                   help="save an output (the first one when NAME is not given)")
    r.add_argument("--profile", action="store_true",
                   help="llvm backend: run the model again for about half a second and print each kernel's ops, "
                        "time per call, share, GFLOP/s, GB/s and fraction of the host's FMA peak")
    add_sparse_argument(r)
    add_quantize_arguments(r)
    add_conv_algo_arguments(r)

    sub.add_parser("ops", help="list the ops tdc knows, with their attributes")

    k = sub.add_parser("cache", help="show or clear what tdc keeps on disk (compiled kernels, the C runtime, rates)",
                       description="tdc keeps what it builds or measures once per machine in $TDC_CACHE_DIR "
                                   "(default ~/.cache/tdc): generated Numba modules and Numba's compiled kernels, the "
                                   "LLVM backend's C runtime builds, autotuning decisions and target rates. It never "
                                   "deletes them itself; they are rebuilt on demand after --clear.")
    kg = k.add_mutually_exclusive_group()
    kg.add_argument("--info", action="store_true", help="list the cache's parts and their sizes (the default)")
    kg.add_argument("--clear", action="store_true", help="delete the cache (it is rebuilt when needed)")

    c = sub.add_parser("compile", help="compile a model to a native executable (no Python at run time)",
                       description="Compile a model (inference, or with --train its training step) through LLVM\n"
                                   "to a bundle directory:\n"
                                   "  model.o        the generated code\n"
                                   "  model.h        the entry point, buffer sizes, inputs, outputs and weights\n"
                                   "  model.weights  params and state (unless --embed-weights)\n"
                                   "  model          a native executable; `OUT/model --help` lists its inputs",
                       epilog="Example:\n  tdc compile examples/lenet.py --batch 1 -o out/lenet\n"
                              "  out/lenet/model --input x=img.npy --output y.npy\n\n"
                              "Each bundle holds its own copy of OpenBLAS (libscipy_openblas.so, about 25 MB), found\n"
                              "through an $ORIGIN rpath, so the directory can be moved or copied to another machine.\n"
                              "--shared-blas links the one installed with tdc instead (no copy; the bundle then needs\n"
                              "this installation). `tdc cache --info` shows what tdc keeps in ~/.cache/tdc.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(c)
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="the bundle directory to write")
    c.add_argument("--weights", metavar="FILE", help="params (and state) saved by tdc (.npz, or a .weights file "
                   "from a native training run); default: initialised from --seed")
    c.add_argument("--seed", type=int, default=0, help="seed for param initialisation")
    c.add_argument("--embed-weights", action="store_true", help="put the weights inside the object file")
    c.add_argument("--shared-blas", action="store_true",
                   help="link the installed OpenBLAS instead of copying it into the bundle (saves 25 MB per bundle; "
                        "the bundle can then not move to another machine)")
    c.add_argument("--name", help="C name of the entry point, NAME_run (default: the model's name)")
    c.add_argument("--profile", action="store_true",
                   help="time every kernel: the executable's --profile then prints each one's ops, time per call, "
                        "share, GFLOP/s, GB/s and fraction of the host's FMA peak (two clock reads per kernel)")
    c.add_argument("--train", action="store_true",
                   help="compile the training step: the executable runs --steps steps over data files "
                        "and writes the updated weights")
    _add_training(c)
    sg = c.add_argument_group("the learning-rate schedule of a training executable (applied to its lr input)")
    sg.add_argument("--schedule", default="constant", choices=("constant", "step", "cosine"),
                    help="constant (default), step (x gamma every --step-size steps), or cosine (to 0 over --steps)")
    sg.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warm-up steps (default 0)")
    sg.add_argument("--step-size", type=int, default=0, metavar="STEPS",
                    help="step schedule: decay every STEPS steps (default: a third of the steps after the warm-up)")
    sg.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor (default 0.1)")
    add_sparse_argument(c)
    add_quantize_arguments(c)
    add_conv_algo_arguments(c)
    from .runtime.launch import add_parallel_arguments
    add_parallel_arguments(c)

    e = sub.add_parser("export", help="write a model as an ONNX file (opset 17)",
                       description="Write a model's inference graph as an ONNX file that onnxruntime and other "
                                   "frameworks load: params, consts and state become initializers.",
                       epilog="Examples:\n  tdc export examples/lenet.py --weights trained.npz -o lenet.onnx\n"
                              "  tdc export examples/mlp.py --dynamic-batch -o mlp.onnx   # any batch size",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(e)
    e.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the file to write (atomically)")
    e.add_argument("--weights", metavar="FILE", help="params (and state) saved by tdc; default: initialised from --seed "
                   "(or an ONNX model's own)")
    e.add_argument("--seed", type=int, default=0, help="seed for param initialisation")
    e.add_argument("--dynamic-batch", action="store_true",
                   help="make the inputs' leading dim (and the outputs' that have it) the symbolic 'batch', so the "
                        "file runs at any batch size; a graph that fixes the batch in a shape is an error")

    from .runtime.trainer import add_train_arguments
    t = sub.add_parser("train", help="train a model on a data set",
                       description="Train a model: the training step (forward, loss, backward and "
                                   "optimizer update) is one compiled graph.")
    add_train_arguments(t)
    add_conv_algo_arguments(t)

    from .runtime.deep_compression import add_compress_arguments
    z = sub.add_parser("compress", help="Deep Compression: prune, share weights by k-means, Huffman-code",
                       description="Compress a trained model as Deep Compression does (Han et al. 2016): prune "
                                   "and retrain, share the surviving weights among K centroids and retrain them, "
                                   "Huffman-code the codes and index gaps. Prints the per-layer table and the "
                                   "accuracy before and after; writes a compressed model file that tdc run and "
                                   "tdc compile take as --weights.")
    add_compress_arguments(z)
    return ap


def dump_pipelines(args, parallel):
    """(inference, training) pipelines exactly as the compiled backends run them for the target
    of --backend: the training one is the loss, autodiff and optimizer passes, then the same
    compile pipeline."""
    from .backends import get_target
    from .lower.pipeline import compile_pipeline
    from .passes.manager import Pipeline
    from .runtime.trainer import optimizer_from, prune_from
    from .passes.training import training_pipeline

    compile_ = compile_pipeline(get_target(args.backend), args.conv_algo, args.autotune)
    training = training_pipeline(args.loss, optimizer_from(args), parallel=parallel,
                                 prune=prune_from(args) is not None)
    return compile_, Pipeline(training.passes + compile_.passes), len(training.passes)


def cmd_dump(args) -> int:
    from .ir.dot import to_dot
    from .ir.printer import print_graph
    from .lower.memplan import memory_report, plan_memory
    from .lower.plan import build_plan, describe_plan
    from .passes.conv_algo import request_conv_algo
    from .passes.manager import PassContext, Pipeline
    from .runtime.loader import Source

    if args.output:
        from .files import check_output_file
        check_output_file(args.output, "-o")
    from .backends import get_target
    from .passes.partition import Partition
    from .runtime.launch import parallel_config
    src = Source(args.model, bind=args.bind)
    parallel = parallel_config(args)
    partitioned = isinstance(parallel, Partition)
    if partitioned:
        parallel.target = get_target(args.backend)
    elif args.rank is not None or args.partition:
        raise TdcError("--rank and --partition show a partitioned step: add --ranks N --parallel "
                       "model|pipeline|tensor|spatial")
    inference, training, n_train = dump_pipelines(args, parallel)
    names_inf = [p.name for p in inference.passes]
    names_train = [p.name for p in training.passes]
    if args.after and args.after not in names_train:
        raise TdcError(f"unknown pass {args.after!r}; the inference pipeline is {','.join(names_inf)} and the "
                       f"training pipeline is {','.join(names_train)}")
    train = args.train or (args.after is not None and args.after not in names_inf)
    pipeline = training if train else inference
    if args.ranks > 1 and not train and not partitioned:
        raise TdcError("--ranks with data parallelism applies to the training step: add --train")
    if args.prune is not None and not train:
        raise TdcError("--prune adds masks to the training step: add --train")
    graph = src.training_graph(args.batch, parallel) if train else \
        src.graph(src.split_batch(args.batch, parallel) if partitioned else args.batch)
    short = None if args.full_constants else ELIDE_ABOVE
    fmt = (lambda g: to_dot(g)) if args.format == "dot" else (lambda g: print_graph(g, short))
    chunks = []
    if args.quantize is not None or args.calibrate is not None or args.calibrate_samples is not None:
        graph, _, quantized = apply_quantize(args, graph, load_inference_weights(args, graph, src) if args.weights
                                             else {}, args.backend, training=train, partitioned=partitioned)
        chunks.append(f"// int8: {quantized}")
    elif args.weights and not partitioned:
        from .passes.sparsify import report
        graph, _, decisions = apply_sparse(args, graph, load_inference_weights(args, graph, src), args.backend,
                                           training=train)
        if args.sparse != "off" and not train:
            chunks.append(report(decisions))
    elif args.sparse not in ("auto", "on", "off"):
        apply_sparse(args, graph, {}, args.backend)      # the one-line error for a bad --sparse
    if partitioned and not train and not args.after and not args.all:
        from .passes.training import partitioned_inference
        graph, pipeline = partitioned_inference(graph, parallel), inference
    per_rank = partitioned and (args.memory or args.rank is not None or args.partition or args.plan or args.llvm)

    def step_graph():
        """The graph a backend is given: the training step, or the model (with --conv-algo asked)."""
        g = Pipeline(training.passes[:n_train]).run(graph) if train else graph
        return request_conv_algo(g, args.conv_algo)

    if per_rank:          # a partitioned step: each rank's program
        step = Pipeline(training.passes[:n_train]).run(graph) if train else graph
        chunks = _partition_chunks(args, src, parallel, step, inference, fmt, train)
    elif args.memory or args.plan or args.source or args.llvm or args.asm:
        lowered = pipeline.run(graph)
        if args.plan:
            from .backends import get_target
            chunks.append(describe_plan(build_plan(lowered, get_target(args.backend).loop_dtypes),
                                        plan_memory(lowered)))
        if args.memory:
            chunks.append(memory_report(lowered))
        if args.source:   # the executable's kernels and driver (Numba compiles them only when first run)
            from .backends.numba import NumbaExecutable
            chunks.append(NumbaExecutable(step_graph(), autotune=args.autotune, eager=False).source())
        if args.llvm or args.asm:
            from .backends.llvm.bundle import assembly, llvm_ir
            chunks.append(assembly(step_graph(), args.autotune) if args.asm
                          else llvm_ir(step_graph(), autotune=args.autotune))
    elif args.all:
        from .backends import get_target
        chunks.append(f"// ----- DSL: {src.name} as traced -----\n{fmt(graph)}")
        ctx = PassContext(dump_after="all", dump=lambda name, g: chunks.append(f"// ----- after {name} -----\n{fmt(g)}"))
        lowered = pipeline.run(graph, ctx)
        memory = plan_memory(lowered)
        chunks.append(f"// ----- lowered: the kernel plan the {args.backend} backend renders -----\n"
                      + describe_plan(build_plan(lowered, get_target(args.backend).loop_dtypes), memory))
        chunks.append(f"// ----- lowered: the memory plan -----\n{memory_report(lowered, memory)}")
    elif args.after:
        upto = [p.name for p in pipeline.passes].index(args.after) + 1
        chunks.append(fmt(Pipeline(pipeline.passes[:upto]).run(graph)))
    elif train:
        chunks.append(fmt(Pipeline(training.passes[:n_train]).run(graph)))
    else:
        chunks.append(fmt(graph))
    text = "\n".join(c.rstrip("\n") + "\n" for c in chunks)
    if args.output:
        from .files import atomic_write
        atomic_write(args.output, lambda f: f.write(text.encode()))
    else:
        sys.stdout.write(text)
    return 0


def _partition_chunks(args, src, parallel, step, compile_pipeline, fmt, train: bool) -> list[str]:
    """What `tdc dump --ranks K --parallel S` shows of one rank's program or of every rank's:
    --partition the cost model's choice; --rank R the program; --memory each rank's memory table
    and what each rank holds; --plan and --llvm the compiled program."""
    from .lower.memplan import memory_report, plan_memory
    from .lower.plan import build_plan, describe_plan
    from .lower.ranks import rank_program, world_of
    from .passes.training import add_loss, partition_report
    from .backends import get_target
    chunks = []
    if args.partition:
        forward = src.graph(src.split_batch(args.batch, parallel), training=train)
        chunks.append(partition_report(add_loss(forward, args.loss) if train else forward, parallel, train))
    world = world_of(step)
    if args.rank is not None and not 0 <= args.rank < world:
        raise TdcError(f"--rank {args.rank}: the step runs on ranks 0 to {world - 1}")
    ranks = [args.rank] if args.rank is not None else range(world)
    footprint = []
    for r in ranks:
        prog = rank_program(step, r, world).graph
        if args.memory or args.plan or args.llvm:
            lowered = compile_pipeline.run(prog)
            plan = plan_memory(lowered)
            if args.memory:
                chunks.append(f"// ----- rank {r} -----\n" + memory_report(lowered, plan))
            if args.plan:
                chunks.append(describe_plan(build_plan(lowered, get_target(args.backend).loop_dtypes), plan))
            if args.llvm:
                from .backends.llvm.bundle import llvm_ir
                chunks.append(llvm_ir(prog, autotune=args.autotune))
            held = sum(a.type.nbytes for a in lowered.args if a.kind != "input")
            footprint.append((r, held, plan.arena_bytes))
        elif args.rank is not None or not args.partition:
            chunks.append(f"// ----- rank {r} -----\n" + fmt(prog))
    if args.memory and len(footprint) > 1:
        lines = [f"what each rank holds ({parallel.strategy} on {world} ranks; 1 MB = 2^20 bytes)",
                 f"{'rank':>4} {'params+state MB':>16} {'arena MB':>9} {'total MB':>9}"]
        for r, held, arena in footprint:
            lines.append(f"{r:>4} {held / 2**20:>16.3f} {arena / 2**20:>9.3f} {(held + arena) / 2**20:>9.3f}")
        chunks.append("\n".join(lines))
    return chunks


def _summary(name: str, x: np.ndarray) -> str:
    from .ir.types import TensorType
    head = np.array2string(x.reshape(-1)[:6], precision=5, separator=", ")
    s = f"{name}: {TensorType.of(x)}"
    if x.size and x.dtype.kind in "fiu":
        s += f"  min {x.min():.6g}  mean {x.mean():.6g}  max {x.max():.6g}"
    return s + f"  first {head}"


def cmd_run(args) -> int:
    from .backends import compile
    from .files import atomic_write, check_output_dir, check_output_file
    from .runtime.inputs import random_inputs, read_input, run_in_batches
    from .runtime.loader import Source

    src = Source(args.model, bind=args.bind)
    graph = src.graph(args.batch)
    out_names = [n for n, _ in graph.outputs]
    outputs = {}
    for item in args.output:                # checked before any work
        name, sep, path = item.partition("=")
        if not sep:
            name, path = out_names[0], item
        if name not in out_names:
            raise TdcError(f"--output {item}: {src.name} has no output {name!r}; it has {', '.join(out_names)}")
        if name in outputs:
            raise TdcError(f"--output {name} is given twice")
        check_output_file(path, f"--output {name}")
        outputs[name] = path
    if args.save_inputs:
        check_output_dir(args.save_inputs, "--save-inputs")
    expected = ", ".join(f"{a.name}: {a.type}" for a in graph.inputs)
    by_name = {a.name: a for a in graph.inputs}
    given = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TdcError(f"--input {item!r}: expected NAME=FILE.npy")
        if name not in by_name:
            raise TdcError(f"--input {name}: {src.name} has no input {name!r}; it takes {expected}")
        if name in given:
            raise TdcError(f"--input {name} is given twice")
        given[name] = read_input(path, by_name[name])
    if args.random_inputs:
        given = {**random_inputs(graph, args.seed), **given}
    missing = [a.name for a in graph.inputs if a.name not in given]
    if missing:
        raise TdcError(f"missing input {', '.join(missing)}; {src.name} takes {expected} "
                       "(give --input NAME=FILE.npy or --random-inputs)")
    params = load_inference_weights(args, graph, src)   # without --weights: an ONNX file's initializers
    graph, params, quantized = apply_quantize(args, graph, params, args.backend)
    if quantized:
        print(f"int8: {quantized}")
    else:
        graph, params, _ = apply_sparse(args, graph, params, args.backend)
    from .runtime.trainer import compile_progress
    if args.profile and args.backend != "llvm":
        raise TdcError(f"--profile times the llvm backend's kernels, not the {args.backend} backend's")
    exe = compile(graph, backend=args.backend, params=params, seed=args.seed, conv_algo=args.conv_algo,
                  autotune=args.autotune, progress=compile_progress(src.name), profile=args.profile)
    results, batches = run_in_batches(exe, graph, given)
    if batches > 1:
        print(f"ran {batches} batches of {graph.inputs[0].type.shape[0]} (the last one padded)")
    if args.save_inputs:
        os.makedirs(args.save_inputs, exist_ok=True)
        for a in graph.inputs:
            arr = np.asarray(given[a.name])
            atomic_write(os.path.join(args.save_inputs, a.name + ".npy"), lambda f, arr=arr: np.save(f, arr))
    for name, x in results.items():
        print(_summary(name, x))
    for name, path in outputs.items():
        atomic_write(path, lambda f, x=results[name]: np.save(f, x))
    if args.profile:
        from .runtime.profile import host_peak, profile_table, run_profiled
        one_batch = given if batches == 1 else random_inputs(graph, args.seed)
        run_profiled(exe, one_batch)
        print(profile_table(exe.kernel_times(), host_peak()))
    return 0


def cmd_compile(args) -> int:
    from .backends.llvm.bundle import LrSchedule, write_bundle
    from .passes.conv_algo import request_conv_algo
    from .runtime.trainer import optimizer_from
    from .passes.training import training_pipeline
    from .runtime.loader import Source

    from .runtime.launch import parallel_config
    from .passes.partition import Partition
    parallel = parallel_config(args)
    partitioned = isinstance(parallel, Partition)
    if args.prune is not None:
        raise TdcError("--prune recomputes its masks between epochs in tdc train; a native training step has no "
                       "such loop: prune with tdc train, then compile its --save-weights")
    if parallel is not None and not args.train and not partitioned:
        raise TdcError("--ranks N with data parallelism is for training steps: add --train (or partition the "
                       "inference graph with --parallel model|pipeline|tensor|spatial)")
    from .runtime.staged import staged
    if staged(parallel):
        raise TdcError("--ps and --compress run on tdc train's staged runtime (compiled stages with MPI messages "
                       "between them); a native executable takes plain data parallelism (--ranks N)")
    if partitioned:
        from .backends import get_target
        parallel.target = get_target("llvm")
    src = Source(args.model, bind=args.bind)
    if args.train:
        graph = training_pipeline(args.loss, optimizer_from(args), parallel=parallel).run(
            src.training_graph(args.batch, parallel))
    elif partitioned:
        from .passes.training import partitioned_inference
        graph = partitioned_inference(src.graph(src.split_batch(args.batch, parallel)), parallel)
    else:
        graph = src.graph(args.batch)
    params = load_inference_weights(args, graph, src)
    graph, params, quantized = apply_quantize(args, graph, params, "llvm", training=args.train, partitioned=partitioned)
    if partitioned and args.sparse == "on":
        raise TdcError("--sparse on applies to one-process inference bundles, not partitioned ones")
    if not partitioned and not quantized:
        graph, params, _ = apply_sparse(args, graph, params, "llvm", training=args.train)
    b = write_bundle(request_conv_algo(graph, args.conv_algo), args.output, params=params, seed=args.seed,
                     name=args.name or src.name, embed_weights=args.embed_weights, training=args.train,
                     autotune=args.autotune, copy_blas=not args.shared_blas, profile=args.profile,
                     schedule=LrSchedule(args.schedule, args.warmup, args.step_size, args.gamma) if args.train else None)
    kind = "training step" if args.train else "int8 inference" if quantized else "inference"
    if partitioned:
        kind += f" partitioned over {parallel.ranks} ranks ({parallel.strategy}): run it with mpiexec -n {parallel.ranks}"
    elif parallel is not None:
        kind += f" of one of {parallel.ranks} data-parallel ranks: run it with mpiexec -n {parallel.ranks}"
    print(f"wrote {b.directory}/: model ({kind}), model.h, model.o"
          + ("" if b.weights is None else ", model.weights") + f"; run {b.executable} --help")
    return 0


def cmd_export(args) -> int:
    from .files import check_output_file
    from .onnx import save
    from .runtime.loader import Source
    check_output_file(args.output, "-o")
    src = Source(args.model, bind=args.bind)
    graph = src.graph(args.batch)
    params = load_inference_weights(args, graph, src)
    save(graph, args.output, params=params, seed=args.seed, dynamic_batch=args.dynamic_batch)
    batch = "any batch ('batch')" if args.dynamic_batch else ", ".join(f"{a.name}: {a.type}" for a in graph.inputs)
    print(f"wrote {args.output}: {src.name} as ONNX (opset 17), inputs {batch}")
    return 0


def cmd_ops(args) -> int:
    from .ir.opdef import REQUIRED, all_ops
    for name, op in sorted(all_ops().items(), key=lambda kv: (kv[1].family, kv[0])):
        attrs = ", ".join(f"{k}" if a.default is REQUIRED else f"{k}={a.default!r}" for k, a in op.attrs.items())
        print(f"{op.family:12s} {name}({attrs})  {op.doc}")
    return 0


def cmd_cache(args) -> int:
    import shutil
    from pathlib import Path

    from .files import cache_dir
    root = Path(cache_dir())
    # Numba also caches the hand-written kernels beside their source, in the installed package
    kernels = Path(__file__).parent / "backends" / "numba" / "__pycache__"
    numba_files = [p for p in kernels.glob("*") if p.suffix in (".nbi", ".nbc")] if kernels.exists() else []
    if args.clear:
        freed = _size(root) + sum(p.stat().st_size for p in numba_files)
        shutil.rmtree(root, ignore_errors=True)
        for p in numba_files:
            p.unlink(missing_ok=True)
        print(f"cleared {root} and Numba's kernel cache in {kernels}: {freed / 2**20:.1f} MB freed")
        return 0
    print(f"tdc cache: {root} (set TDC_CACHE_DIR to move it)")
    parts = [(root / "numba", "generated Numba modules and their compiled code"),
             (root / "llvm", "the LLVM backend's C runtime, one build per source version and CPU"),
             (root / "autotune.json", "convolution algorithms measured with --autotune"),
             (root / "targets.json", "cost-model rates calibrated on this machine")]
    total = 0
    for path, what in parts:
        size = _size(path)
        total += size
        print(f"  {path.name:<15} {size / 2**20:8.1f} MB  {what}")
    hand = sum(p.stat().st_size for p in numba_files)
    print(f"  {'(package)':<15} {hand / 2**20:8.1f} MB  Numba's cache of tdc's hand-written kernels, in {kernels}")
    print(f"  {'total':<15} {(total + hand) / 2**20:8.1f} MB  (tdc cache --clear deletes it all; it is rebuilt on demand)")
    return 0


def _size(path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv      # before or after the command: `tdc dump X --debug` too
    try:
        ap = build_parser()
        args = ap.parse_args([a for a in argv if a != "--debug"])
        args.debug = debug
        if not args.command:
            ap.print_help()
            return 2
        if args.command == "train":
            from .runtime.trainer import cmd_train
            return cmd_train(args, argv)
        if args.command == "compress":
            from .runtime.deep_compression import cmd_compress
            return cmd_compress(args)
        return {"dump": cmd_dump, "run": cmd_run, "ops": cmd_ops, "compile": cmd_compile,
                "cache": cmd_cache, "export": cmd_export}[args.command](args)
    except TdcError as e:
        if debug:
            raise
        print(f"tdc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tdc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `tdc dump ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:   # a bug in tdc: still one line unless --debug
        if debug:
            raise
        print(f"tdc: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
