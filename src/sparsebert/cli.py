"""`sparsebert` command line: finetune, prune, evaluate, sparsity (and more as they land).

Our own options use dashes (``--max-train-samples``); every `transformers.TrainingArguments`
field is accepted too (``--learning_rate``, ``--num_train_epochs``, ``--max_steps``,
``--per_device_train_batch_size``, ``--report_to`` ...), overriding the recipe's
``training`` section, which overrides sparsebert's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from sparsebert.errors import SparseBertError

EPILOG = (
    "Any transformers TrainingArguments field can be given as --name value "
    "(e.g. --num_train_epochs 3 --learning_rate 5e-5 --max_steps 1000)."
)


def _data_options(p: argparse.ArgumentParser, train: bool = True) -> None:
    p.add_argument("--task", required=True,
                   help="a registered task (`sparsebert tasks` lists them), e.g. sst2 mnli stsb")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it registers extra tasks, criteria, methods or loss terms")
    p.add_argument(
        "--data-dir",
        help="folder with GLUE-format files (or task subfolders); "
        "omit to load the task from the Hugging Face hub",
    )
    if train:
        p.add_argument("--max-train-samples", type=int, help="use the first N training examples")
    p.add_argument("--max-eval-samples", type=int, help="use the first N evaluation examples")
    p.add_argument("--max-seq-length", type=int, default=128)


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="local path or hub name (default: embedded all-MiniLM-L6-v2)"
    )
    p.add_argument("--output-dir", required=True, help="where checkpoints, the model and reports go")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set schedule.end=0.8 --set lr.rewarm=false",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from the last complete checkpoint in --output-dir (or from the given one)",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --output-dir (refused without it)")
    p.add_argument("--debias", choices=["poe", "reweight", "conf-reg"],
                   help="a debiasing loss in place of the task loss (SRNets; conf-reg needs --teacher)")
    p.add_argument("--bias-probs", metavar="FILE",
                   help="the bias-only model's file (`sparsebert bias-model`)")
    _data_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsebert", description="Sparse, accurate, fast BERT-family models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser(
        "finetune", help="fine-tuning (e.g. the teacher); a sparse model keeps its zeros", epilog=EPILOG
    )
    _train_options(ft)
    ft.add_argument("--teacher", help="only with --debias conf-reg: its teacher (finetune does not distil)")
    ft.add_argument("--unlock-mask", action="store_true",
                    help="let the zeros of an already sparse model become non-zero (default: locked)")
    ft.add_argument("--recipe", default="finetune",
                    help="a recipe that does not prune: finetune (default), transfer, mlm-head")

    pr = sub.add_parser(
        "prune", help="prune while fine-tuning with a recipe (GMP* by default)", epilog=EPILOG
    )
    _train_options(pr)
    pr.add_argument("--recipe", default="gmp",
                    help="shipped recipe name (see `sparsebert recipes`) or a YAML path")
    pr.add_argument("--sparsity", type=float, help="target sparsity in [0, 1) (overrides the recipe)")
    pr.add_argument("--teacher", help="fine-tuned dense model to distil from")

    pt = sub.add_parser(
        "pretrain", help="upstream pruning: GMP* during masked-LM training (`prune` with recipe "
        "gmp-upstream on an MLM task, e.g. --task mlm-general)", epilog=EPILOG
    )
    _train_options(pt)
    pt.add_argument("--recipe", default="gmp-upstream", help="shipped recipe name or a YAML path")
    pt.add_argument("--sparsity", type=float, help="target sparsity in [0, 1) (overrides the recipe)")
    pt.add_argument("--teacher", help="the dense masked-LM model to distil from (masked positions, T = 5.5)")

    os_ = sub.add_parser("oneshot", help="prune a fine-tuned model in one shot, no training "
                         "(sparsegpt, wanda, magnitude, obert), evaluate and save it")
    os_.add_argument("model", help="a model fine-tuned on --task (local path or hub name)")
    _data_options(os_, train=False)
    os_.add_argument("--criterion", required=True,
                     help="sparsegpt (layer-wise reconstruction) or a registered criterion: "
                     "magnitude, wanda, obert")
    os_.add_argument("--sparsity", type=float, help="exact fraction pruned (not needed with --pattern)")
    os_.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4 (keep 2 of every 4 weights)")
    os_.add_argument("--allocation", choices=["global", "uniform", "per-row"],
                     help="default: the criterion's own (wanda: per-row), else uniform")
    os_.add_argument("--targets", nargs="+", default=["encoder-linears"],
                     help="what to prune (presets or regexes)")
    os_.add_argument("--calibration-samples", type=int, default=128, help="training examples to calibrate on")
    os_.add_argument("--calibration-batch-size", type=int, default=16)
    os_.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a criterion option, e.g. block_size=64 (obert), damp=0.01 (sparsegpt)")
    os_.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    os_.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    os_.add_argument("--output-dir", required=True, help="where the pruned model and reports go")
    os_.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")

    ev = sub.add_parser("evaluate", help="evaluate a saved model on a task")
    ev.add_argument("model")
    _data_options(ev, train=False)
    ev.add_argument("--split", default="validation")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--runtime", choices=("torch", "sparse", "sparse-int8"), default="torch",
                    help="run the model as saved (torch), or on the sparse CPU runtime in float32 "
                         "(sparse) or INT8 (sparse-int8): the accuracy of what you deploy")

    sp = sub.add_parser("sparsity", help="per-layer sparsity report of any saved model")
    sp.add_argument("model")
    sp.add_argument(
        "--targets",
        nargs="+",
        default=["encoder-linears"],
        help="presets (encoder-linears embeddings pooler classifier all-2d) or regexes",
    )
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ex = sub.add_parser("export", help="compressed sparse checkpoint or ONNX export of a saved model")
    ex.add_argument("model")
    ex.add_argument("--format", choices=["compressed", "onnx"], default="compressed")
    ex.add_argument("--out", required=True, help="output directory (config and tokenizer are copied)")
    ex.add_argument("--fp16", action="store_true", help="store the non-zero values in fp16")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset")

    be = sub.add_parser("bench", help="CPU latency: dense PyTorch vs sparse runtime vs ONNX Runtime")
    be.add_argument("model", nargs="?", default=None, help="saved model (default: embedded MiniLM)")
    be.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    be.add_argument("--seqs", type=int, nargs="+", default=[128])
    be.add_argument("--threads", type=int, default=2)
    be.add_argument("--repeats", type=int, default=10)
    be.add_argument("--runtimes", nargs="+", default=None,
                    help="torch sparse onnxruntime deepsparse (default: all that are installed)")
    be.add_argument("--out", default="bench_results", help="folder for bench.json and bench.md")
    be.add_argument("--int8", action="store_true",
                    help="also the sparse INT8 runtime and the dense INT8 baselines "
                         "(ONNX Runtime and PyTorch dynamic quantisation)")

    ve = sub.add_parser("verify", help="check a saved model, checkpoint or export for corruption")
    ve.add_argument("path", help="model / checkpoint / export folder (or one .safetensors file)")
    ve.add_argument("--json", action="store_true", help="print JSON instead of a report")

    bm = sub.add_parser("bias-model", help="fit a bias-only model: out-of-fold probabilities of the "
                        "training set for --debias, accuracy in distribution and on the OOD sets")
    bm.add_argument("--task", required=True, help="a classification task, e.g. mnli mnli-dev-split qqp fever")
    bm.add_argument("--data-dir", help="folder with the task's files (omit: the hub)")
    bm.add_argument("--kind", required=True, choices=["hypothesis-only", "overlap", "claim-only"])
    bm.add_argument("--output", required=True, help="FILE.safetensors (or .json) for --bias-probs")
    bm.add_argument("--folds", type=int, default=5, help="k of the out-of-fold predictions")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--max-train-samples", type=int, help="use the first N training examples")
    bm.add_argument("--max-eval-samples", type=int, help="use the first N examples of each evaluation set")
    bm.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import MODULE first")

    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("tasks", help="list the registered tasks")
    return parser


def _run_export(ns: argparse.Namespace) -> int:
    from sparsebert.export import export_model
    from sparsebert.models import resolve_model_path

    report = export_model(resolve_model_path(ns.model), ns.out, format=ns.format, fp16=ns.fp16,
                          opset=ns.opset)
    print(json.dumps(report, indent=2, default=str))
    return 0


def _run_bench(ns: argparse.Namespace) -> int:
    import os

    from sparsebert.models import resolve_model_path
    from sparsebert.preflight import check_positive
    from sparsebert.runtime.bench import benchmark_model, write_json, write_markdown

    for name in ("batches", "seqs"):
        for value in getattr(ns, name):
            check_positive(f"--{name}", value)
    check_positive("--threads", ns.threads)
    check_positive("--repeats", ns.repeats)

    result = benchmark_model(resolve_model_path(ns.model), batches=ns.batches, seqs=ns.seqs,
                             threads=ns.threads, repeats=ns.repeats, runtimes=ns.runtimes,
                             progress=lambda msg: print(msg, file=sys.stderr, flush=True), int8=ns.int8)
    os.makedirs(ns.out, exist_ok=True)
    write_json(result, os.path.join(ns.out, "bench.json"))
    md = write_markdown(result, os.path.join(ns.out, "bench.md"), title=f"sparsebert bench {ns.model or ''}")
    print(open(md).read())
    return 0


def _training_overrides(rest: list[str]) -> dict:
    """Parse leftover ``--field value`` pairs as TrainingArguments fields, keeping only given ones."""
    if not rest:
        return {}
    from transformers import HfArgumentParser, TrainingArguments

    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in rest if a.startswith("--")}
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(given - known)
    if unknown:
        raise SparseBertError(
            f"unknown option(s) --{', --'.join(unknown)}: not a sparsebert option nor a "
            "TrainingArguments field (see `sparsebert prune --help`)"
        )
    parser = HfArgumentParser(TrainingArguments)
    try:
        (ta,) = parser.parse_args_into_dataclasses(args=rest + ["--output_dir", "unused"])
    except SystemExit:
        raise SparseBertError(f"could not parse training arguments {' '.join(rest)}") from None
    return {name: getattr(ta, name) for name in given}


def _run_training(ns: argparse.Namespace, rest: list[str]) -> int:
    from sparsebert.pipeline import DataOptions, train_and_prune
    from sparsebert.recipe import load_recipe

    overrides = list(ns.set)
    from sparsebert.debias import debias_from_cli

    debias, implied = debias_from_cli(ns)
    overrides += implied
    if ns.command in ("prune", "pretrain") and ns.sparsity is not None:
        overrides.append(f"sparsity={ns.sparsity}")
    recipe = load_recipe(ns.recipe, overrides)
    if ns.command == "pretrain":
        from sparsebert.tasks import get_task

        if get_task(ns.task).kind != "masked-lm":
            raise SparseBertError(
                f"pretrain trains a masked LM: '{ns.task}' is a {get_task(ns.task).kind} task; use a "
                "masked-LM text task (mlm-general, mlm-pubmed; `sparsebert tasks`) or `sparsebert prune`"
            )
    if ns.command == "finetune":
        from sparsebert.methods.base import METHODS

        if METHODS.get(recipe.method).prunes:
            raise SparseBertError(
                f"recipe '{ns.recipe}' prunes (method {recipe.method}): run it with `sparsebert prune`"
            )
    data = DataOptions(ns.task, ns.data_dir, ns.max_train_samples, ns.max_eval_samples, ns.max_seq_length)
    info = train_and_prune(
        ns.model,
        data,
        recipe,
        ns.output_dir,
        teacher_path=getattr(ns, "teacher", None),
        training_overrides=_training_overrides(rest),
        resume=ns.resume,
        unlock_mask=getattr(ns, "unlock_mask", False),
        overwrite=ns.overwrite,
        debias=debias,
    )
    summary = {k: info[k] for k in ("task", "target_sparsity", "train_steps", "wall_seconds")}
    summary["method"] = info["method"]["name"]
    summary["measured_sparsity"] = info["sparsity"]["target_sparsity"]
    summary["metrics"] = info["metrics"]
    if len(info["eval_sets"]) > 1:
        summary["eval_sets"] = info["eval_sets"]
    if info.get("teacher_metrics"):
        summary["teacher_metrics"] = info["teacher_metrics"]
    print(json.dumps(summary, indent=2))
    line = teacher_comparison(info)
    if line:  # on stderr: stdout stays one JSON document
        print(line, file=sys.stderr)
    return 0


def teacher_comparison(info: dict) -> str | None:
    """One line: the teacher's and the trained model's main metric side by side."""
    from sparsebert.tasks.base import get_task

    theirs = info.get("teacher_metrics") or {}
    key = f"eval_{get_task(info['task']).main_metric}"
    if key not in theirs or key not in info["metrics"]:
        return None
    t, s = float(theirs[key]), float(info["metrics"][key])
    if abs(t) <= 1.0 and abs(s) <= 1.0:  # fractions (accuracy, F1); SQuAD reports percentages
        t, s = 100 * t, 100 * s
    return (f"{key[5:]}: teacher {t:.2f} | this model {s:.2f} ({s - t:+.2f} points) at "
            f"{100 * info['sparsity']['target_sparsity']:.1f}% sparsity")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    try:
        if getattr(ns, "plugin", None):
            from sparsebert.registry import load_plugins

            load_plugins(ns.plugin)
        if ns.command in ("finetune", "prune", "pretrain"):
            return _run_training(ns, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if ns.command == "oneshot":
            from sparsebert.oneshot import run_from_cli

            return run_from_cli(ns)
        if ns.command == "evaluate":
            from sparsebert.pipeline import DataOptions, check_data_options, evaluate_saved
            from sparsebert.preflight import check_positive

            data = DataOptions(ns.task, ns.data_dir, None, ns.max_eval_samples, ns.max_seq_length, ns.split)
            check_data_options(data)
            check_positive("--batch-size", ns.batch_size)
            print(json.dumps(evaluate_saved(ns.model, data, ns.batch_size, ns.runtime), indent=2))
            return 0
        if ns.command == "sparsity":
            from transformers.utils import logging as hf_logging

            from sparsebert.export import load_any
            from sparsebert.report import format_report, sparsity_report

            hf_logging.set_verbosity_error()  # the report, not a load report of unused heads
            model = load_any(ns.model)  # a saved model folder, a compressed export or a hub name
            report = sparsity_report(model, ns.targets)
            print(json.dumps(report, indent=2) if ns.json else format_report(report))
            return 0
        if ns.command == "export":
            return _run_export(ns)
        if ns.command == "bench":
            return _run_bench(ns)
        if ns.command == "verify":
            from sparsebert.verify import verify_path

            result = verify_path(ns.path)
            print(json.dumps(result.to_dict(), indent=2) if ns.json else result.format())
            if not result.ok:
                raise SparseBertError(f"{len(result.problems)} problem(s) in {ns.path} (listed above)")
            return 0
        if ns.command == "bias-model":
            from sparsebert.bias_models import run_from_cli as run_bias_model

            return run_bias_model(ns)
        if ns.command == "recipes":
            from sparsebert.recipe import available_recipes

            print("\n".join(available_recipes()))
            return 0
        if ns.command == "tasks":
            from sparsebert.tasks import TASKS

            for name in TASKS.names():
                task = TASKS.get(name)
                print(f"{name:<16} {task.kind:<24} {', '.join(e.name for e in task.eval_sets())}")
            return 0
    except SparseBertError as err:
        print(f"sparsebert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if getattr(ns, "output_dir", None):
            from sparsebert.pipeline import last_checkpoint_hint

            hint = last_checkpoint_hint(ns.output_dir)
        print(f"sparsebert: interrupted{hint or ' (no complete checkpoint yet)'}", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
