"""``hipro``: from image folders to a trained HiPro model.

    hipro cache    --spec tasks.toml          encode + cache image features
    hipro affinity --spec tasks.toml          task-affinity matrix + heatmap
    hipro tree     --spec tasks.toml          task tree from the affinity + dendrogram
    hipro train    --spec tasks.toml          train HiPro, evaluate, checkpoint
    hipro eval     --spec tasks.toml --checkpoint ckpt
    hipro compare  --spec tasks.toml          HiPro vs. baselines table
    hipro export   --checkpoint ckpt --out classifier
    hipro bench    [bench options]            text-engine benchmark (hipro_fast.bench.cpu;
                                              with --device cuda: hipro_fast.bench.gpu)
    hipro demo                                all of the above on the bundled benchmark

Every command writes a run directory (``--run-dir``, default
``runs/<timestamp>-<command>``) holding config.json (the resolved
configuration), metrics.jsonl, checkpoints/, PNG figures and report.md.
Failures exit non-zero with one line ``hipro: error: <reason>`` (``--debug``
shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .app import pipeline, plots, report
from .bench import gpu as bench_gpu
from .bench import cpu as bench
from .data.feature_cache import default_cache_dir
from .data.tasks_spec import load_spec
from .engine.prompt_forest import COMBINE_MODES, DEFAULT_COMBINE
from .errors import CliError, HiproError
from .method import affinity as aff
from .method import export

__all__ = ["main", "build_parser", "DEMO_DEFAULTS"]

# Demo settings: small enough for a few minutes on 2 CPU cores with hipro-tiny-clip.
DEMO_DEFAULTS = {"shots": 16, "seeds": [0], "epochs": 10, "n_ctx": 4, "affinity_steps": 30}


# ------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, spec: bool = True, data: bool = True) -> None:
    g = p.add_argument_group("common options")
    if spec:
        g.add_argument("--spec", help="multi-task spec (TOML); see hipro_fast.data.tasks_spec")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw, splits and initialisation")
    if data:
        g.add_argument("--shots", type=int, default=16,
                       help="K training images per class (1/2/4/8/16; 0 = the whole training split)")
        g.add_argument("--skip-bad-images", action="store_true",
                       help="skip (and count) images that cannot be decoded instead of failing")
        g.add_argument("--aug-views", type=int, default=0,
                       help="K augmented views per training image (random resized crop + flip), each "
                            "used as a training sample; 0 = plain features")
        g.add_argument("--batch-size", type=int, default=128, help="images per encoding batch")
        g.add_argument("--workers", type=int, default=None, help="data-loading workers (default: 0 on CPU)")
    g.add_argument("--model", default="hipro-tiny-clip", help="open_clip model name (default: hipro-tiny-clip)")
    g.add_argument("--pretrained", default=None, help="weights file (.pt/.safetensors) or open_clip tag")
    g.add_argument("--model-config", default=None,
                   help="open_clip model config JSON to register (its file stem becomes the model name)")
    g.add_argument("--run-dir", default=None, help="output folder (default: runs/<timestamp>-<command>)")
    g.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default: $HIPRO_CACHE_DIR or ~/.cache/hipro_fast)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _train_opts(p: argparse.ArgumentParser, tree: bool = True) -> None:
    g = p.add_argument_group("training")
    if tree:
        g.add_argument("--tree", default="auto",
                       help="auto (from the task affinity), flat, a tree.json file or a JSON nested list")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (TrainConfig default if unset)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (TrainConfig default if unset)")
    g.add_argument("--train-batch-size", type=int, default=None, help="training batch size")
    g.add_argument("--n-ctx", type=int, default=None, help="context tokens per tree node (default 16)")
    g.add_argument("--combine", choices=list(COMBINE_MODES), default=DEFAULT_COMBINE,
                   help="how a task combines its path contexts (default %(default)s, see README ablation)")
    g.add_argument("--ctx-init", default=None, help='initialise contexts from a phrase, e.g. "a photo of a"')


def _affinity_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("affinity / tree")
    g.add_argument("--affinity-method", default=None,
                   help="transfer (default), lookahead or gradcos (see hipro_fast.method.affinity)")
    g.add_argument("--affinity-steps", type=int, default=None, help="optimiser steps of the affinity estimate")
    g.add_argument("--levels", type=int, default=None, help="tree levels below the root")
    g.add_argument("--threshold", type=float, default=None, help="affinity threshold for merging")
    g.add_argument("--linkage", default="average", help="agglomerative linkage")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`hipro: error: ...`, exit status 2)."""

    def error(self, message: str):
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"hipro: error: {' '.join(message.split())}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="hipro", description="Hierarchical prompt learning (HiPro) on a frozen CLIP.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("cache", help="encode and cache image features")
    _common(p)

    p = sub.add_parser("affinity", help="task-affinity matrix and heatmap")
    _common(p)
    _affinity_opts(p)

    p = sub.add_parser("tree", help="task tree from the affinity, and dendrogram")
    _common(p)
    _affinity_opts(p)
    p.add_argument("--affinity", default=None, help="affinity.json from `hipro affinity` (else computed)")

    p = sub.add_parser("train", help="train HiPro, evaluate on the test splits, save a checkpoint")
    _common(p)
    _train_opts(p)
    _affinity_opts(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    _common(p)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory from `hipro train` (<run>/checkpoints) or its best.json")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")

    p = sub.add_parser("compare", help="HiPro vs. baselines on the same features")
    _common(p)
    _train_opts(p)
    _affinity_opts(p)
    p.add_argument("--methods", default=None, help="comma list (default: hipro_fast.method.baselines defaults)")
    p.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")

    p = sub.add_parser("export", help="export a checkpoint as a standalone classifier")
    _common(p, spec=False, data=False)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory from `hipro train` (<run>/checkpoints) or its best.json")
    p.add_argument("--out", default=None,
                   help="output .safetensors path (default: <run-dir>/classifier.safetensors)")

    p = sub.add_parser("bench", help="text-engine benchmark (options go to hipro_fast.bench.cpu)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled benchmark")
    _common(p, spec=False)
    _train_opts(p, tree=False)
    _affinity_opts(p)
    p.add_argument("--data-dir", default=None,
                   help="where to export the bundled images (default: <cache-dir>/bundled-seed<seed>)")
    p.add_argument("--methods", default=None, help="comma list of baseline methods")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: 0)")
    p.set_defaults(shots=DEMO_DEFAULTS["shots"])
    return ap


# ------------------------------------------------------------------ helpers
class _Ctx:
    """What every command needs: the run, the model, the features."""

    def __init__(self, args, command: str):
        self.args = args
        self.pipeline = pipeline
        self.progress = not getattr(args, "no_progress", False)
        self.device = pipeline.resolve_device(args.device)
        cfg = {k: v for k, v in vars(args).items() if k not in ("func", "debug")}
        cfg["device_resolved"] = self.device
        cfg["command"] = command
        self.run = pipeline.Run(args.run_dir, command, cfg)
        self.config = cfg
        self._clip = None
        self._feats = None
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    @property
    def cache_dir(self) -> Path:

        d = getattr(self.args, "cache_dir", None)
        return Path(d) if d else default_cache_dir() / "features"

    def clip(self):
        if self._clip is None:
            a = self.args
            self._clip = self.pipeline.load_model(a.model, a.pretrained, self.device, a.model_config, a.seed)
            self.config["model_resolved"] = {"name": self._clip.name, "pretrained": self._clip.pretrained}
            self.run.write_config(self.config)
        return self._clip

    def spec(self):

        if not getattr(self.args, "spec", None):
            raise CliError("--spec is required (a TOML multi-task spec)")
        return load_spec(self.args.spec)

    def features(self, spec=None, splits=("train", "val", "test")):
        if self._feats is None:
            a = self.args
            spec = spec or self.spec()
            clip = self.clip()
            self._feats = self.pipeline.cache_features(
                clip, spec, shots=a.shots or None, seed=a.seed, cache_dir=self.cache_dir, device=self.device,
                views=a.aug_views, skip_bad_images=a.skip_bad_images, progress=self.progress,
                batch_size=a.batch_size, num_workers=a.workers, splits=splits, log=self.run.log)
            f = self._feats
            counts: dict[str, int] = {}
            for s in f.status.values():
                counts[s] = counts.get(s, 0) + 1
            n_skip = sum(len(v) for v in f.skipped.values())
            self.say(f"features: {len(spec.tasks)} tasks, cache " +
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
                     (f", skipped {n_skip} bad images" if n_skip else ""))
            self._data_section(f)
        return self._feats

    def _data_section(self, f) -> None:
        rows = f.summary_rows()
        lines = ["| task | classes | train | val | test | cache | skipped |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['classes']} | {r['train']} | {r['val']} | {r['test']} | "
                         f"{r['cache']} | {r['skipped']} |")
        shots = f"{f.shots} shots per class" if f.shots else "all training images"
        self.run.report.add("Data", f"{shots}, seed {f.seed}.\n\n" + "\n".join(lines))
        self.run.write_json("data.json", rows)

    def train_overrides(self) -> dict[str, Any]:
        a = self.args
        return {"epochs": getattr(a, "epochs", None), "lr": getattr(a, "lr", None),
                "batch_size": getattr(a, "train_batch_size", None)}

    def finish(self) -> None:
        self.run.log("done", seconds=round(time.time() - self.t0, 2))
        path = self.run.report.write()
        self.say(f"run directory: {self.run.dir}  (report: {path.name})")


def _affinity(ctx: _Ctx):
    a = ctx.args
    ctx.say("task affinity ...")
    return ctx.pipeline.compute_affinity(ctx.clip(), ctx.features(), a.affinity_method, progress=ctx.progress,
                                         steps=a.affinity_steps)


def _affinity_and_tree(ctx: _Ctx, write_tree: bool = True):
    """Compute affinity + tree, with figures and report sections."""
    a = ctx.args
    matrix, names = _affinity(ctx)
    _save_affinity(ctx, matrix, names)
    tree = ctx.pipeline.build_tree(matrix, names, a.levels, a.threshold, a.linkage)
    if write_tree:
        _save_tree(ctx, tree, matrix, names)
    return matrix, names, tree


def _save_affinity(ctx: _Ctx, matrix, names) -> None:
    a = ctx.args
    aff.save_affinity_json(matrix, names, ctx.run.path("affinity.json"),
                           method=a.affinity_method or aff.DEFAULT_METHOD,
                           config={"steps": a.affinity_steps, "shots": a.shots, "seed": a.seed})

    png = plots.plot_affinity_heatmap(matrix, names, ctx.run.path("affinity.png"))
    ctx.run.report.add_figure("Task affinity", png, "Higher = the tasks help each other more "
                                                    "(symmetrised; the diagonal is ignored by the tree builder).")
    ctx.run.log("affinity", tasks=list(names), matrix=matrix.tolist())


def _save_tree(ctx: _Ctx, tree, matrix=None, names=None) -> None:

    ctx.run.path("tree.json").write_text(tree.to_json())
    png = plots.plot_dendrogram(tree, ctx.run.path("dendrogram.png"), matrix=matrix, names=names,
                              linkage=getattr(ctx.args, "linkage", "average"))
    ctx.run.report.add_figure("Task tree", png, "```\n" + tree.render() + "\n```")
    ctx.run.log("tree", tree=tree.to_nested())
    ctx.say("task tree:\n" + tree.render())


def _resolve_tree(ctx: _Ctx, spec: str):
    feats = ctx.features()
    if spec == "auto":
        if len(feats.tasks) < 3:
            tree = ctx.pipeline.load_tree("flat", list(feats.tasks))
            _save_tree(ctx, tree)
            return tree
        return _affinity_and_tree(ctx)[2]
    tree = ctx.pipeline.load_tree(spec, list(feats.tasks))
    _save_tree(ctx, tree)
    return tree


def _log_fit(ctx: _Ctx, result, tag: str = "train") -> list[dict]:
    """Record a FitResult's history as metrics lines; returns the history."""
    hist = getattr(result, "history", None) or []
    rows = []
    for i, h in enumerate(hist):
        rec = dict(h) if isinstance(h, dict) else {"value": h}
        rec.setdefault("epoch", i + 1)
        rows.append(rec)
        ctx.run.log(f"{tag}_epoch", **rec)
    return rows


def _accuracy_section(ctx: _Ctx, results: dict[str, dict[str, float]], heading: str, fname: str) -> None:

    png = plots.plot_accuracy_bars(results, ctx.run.path(fname))
    ctx.run.report.add_figure(heading, png)
    ctx.run.report.add(heading + " (table, %)", report.accuracy_table(results))


def _fmt_acc(acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / len(acc) if acc else float("nan")
    return "  ".join(f"{t} {v * 100:.1f}" for t, v in acc.items()) + f"  | mean {mean * 100:.1f}"


def _ckpt_path(ctx: _Ctx) -> Path:
    return ctx.run.dir / "checkpoints"


# ------------------------------------------------------------------ commands
def cmd_cache(ctx: _Ctx) -> int:
    feats = ctx.features()
    for r in feats.summary_rows():
        ctx.say(f"  {r['task']}: {r['classes']} classes, train {r['train']}, val {r['val']}, test {r['test']} "
                f"[{r['cache']}]" + (f", skipped {r['skipped']}" if r["skipped"] else ""))
    ctx.finish()
    return 0


def cmd_affinity(ctx: _Ctx) -> int:
    matrix, names = _affinity(ctx)
    _save_affinity(ctx, matrix, names)
    ctx.say(f"affinity written to {ctx.run.dir / 'affinity.json'}")
    ctx.finish()
    return 0


def cmd_tree(ctx: _Ctx) -> int:
    a = ctx.args
    if a.affinity:
        import json

        p = Path(a.affinity)
        if not p.is_file():
            raise FileNotFoundError(f"affinity file not found: {p}")
        try:
            matrix, names, _ = aff.load_affinity_json(p)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not an affinity.json from `hipro affinity` ({type(e).__name__}: {e})") from None
        tree = ctx.pipeline.build_tree(matrix, names, a.levels, a.threshold, a.linkage)
        _save_tree(ctx, tree, matrix, names)
    else:
        _affinity_and_tree(ctx)
    ctx.finish()
    return 0


def _train_and_eval(ctx: _Ctx, tree):
    a = ctx.args
    feats = ctx.features()
    ctx.say(f"training HiPro on {len(feats.tasks)} tasks ...")
    model, result = ctx.pipeline.train_hipro(
        ctx.clip(), feats, tree, n_ctx=a.n_ctx or 16, combine=a.combine, ctx_init=a.ctx_init, seed=a.seed,
        device=ctx.device, train_overrides=ctx.train_overrides(), checkpoint_dir=_ckpt_path(ctx),
        progress=ctx.progress)
    hist = _log_fit(ctx, result)

    png = plots.plot_curves(hist, ctx.run.path("training.png"), keys=("loss", "val_mean"))
    if png:
        ctx.run.report.add_figure("Training", png)
    ckpt = ctx.pipeline.save_model(model, _ckpt_path(ctx), {"spec": str(a.spec), "model": ctx.clip().name,
                                                            "seed": a.seed, "shots": a.shots}, result)
    ctx.run.log("checkpoint", path=str(ckpt))
    acc = ctx.pipeline.evaluate_model(model, feats.test)
    ctx.run.log("eval", split="test", accuracy=acc, mean=sum(acc.values()) / len(acc))
    ctx.run.write_json("test_accuracy.json", acc)
    ctx.say("test accuracy (%): " + _fmt_acc(acc))
    ctx.say(f"checkpoint: {ckpt}")
    return model, acc


def cmd_train(ctx: _Ctx) -> int:
    tree = _resolve_tree(ctx, ctx.args.tree)
    model, acc = _train_and_eval(ctx, tree)
    _accuracy_section(ctx, {"HiPro": acc}, "Test accuracy", "accuracy.png")
    ctx.finish()
    return 0


def cmd_eval(ctx: _Ctx) -> int:
    a = ctx.args
    feats = ctx.features(splits=(a.split,))
    model = ctx.pipeline.load_model_checkpoint(a.checkpoint, ctx.clip(), ctx.device)
    ctx.pipeline.check_model_matches(model, feats.tasks, where=f"spec {a.spec}")
    data = {"test": feats.test, "val": feats.val, "train": feats.train}[a.split]
    if not data:
        raise CliError(f"no {a.split} split in the spec")
    acc = ctx.pipeline.evaluate_model(model, data)
    ctx.run.log("eval", split=a.split, accuracy=acc, mean=sum(acc.values()) / len(acc), checkpoint=a.checkpoint)
    ctx.run.write_json(f"{a.split}_accuracy.json", acc)
    _accuracy_section(ctx, {Path(a.checkpoint).stem: acc}, f"{a.split} accuracy", "accuracy.png")
    ctx.say(f"{a.split} accuracy (%): " + _fmt_acc(acc))
    ctx.finish()
    return 0


def _seeds(s: str | None, default: Sequence[int]) -> list[int]:
    if not s:
        return list(default)
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--seeds {s!r}: expected a comma list of integers") from None


def _compare(ctx: _Ctx, tree, seeds: Sequence[int]):
    a = ctx.args
    feats = ctx.features()
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    ctx.say(f"comparing {', '.join(methods) if methods else 'all methods'} over seeds {list(seeds)} ...")
    table = ctx.pipeline.run_compare(ctx.clip(), feats, methods=methods, seeds=seeds, tree=tree, n_ctx=a.n_ctx,
                                     combine=a.combine, train_overrides=ctx.train_overrides(),
                                     progress=ctx.progress)
    md = table.to_markdown()
    ctx.run.path("comparison.md").write_text(md + "\n")
    results = ctx.pipeline.table_results(table)
    if results:
        ctx.run.write_json("comparison.json", results)

        png = plots.plot_accuracy_bars(results, ctx.run.path("accuracy.png"))
        ctx.run.report.add_figure("Per-task test accuracy", png)
    ctx.run.report.add("Comparison", md)
    ctx.run.log("compare", table=md, results=results)
    print(md, flush=True)
    return table


def cmd_compare(ctx: _Ctx) -> int:
    tree = _resolve_tree(ctx, ctx.args.tree)
    _compare(ctx, tree, _seeds(ctx.args.seeds, [ctx.args.seed]))
    ctx.finish()
    return 0


def cmd_export(ctx: _Ctx) -> int:
    a = ctx.args
    model = ctx.pipeline.load_model_checkpoint(a.checkpoint, ctx.clip(), ctx.device)
    out = Path(a.out) if a.out else ctx.run.path("classifier.safetensors")
    res = export.export_classifier(model, out)
    out = Path(res) if isinstance(res, (str, Path)) else out
    ctx.run.log("export", path=str(out), checkpoint=a.checkpoint)
    ctx.say(f"classifier written to {out}")
    ctx.finish()
    return 0


def cmd_demo(ctx: _Ctx) -> int:
    a = ctx.args

    data_dir = Path(a.data_dir) if a.data_dir else (
        Path(a.cache_dir) if a.cache_dir else default_cache_dir()) / f"bundled-seed{a.seed}"
    ctx.say(f"exporting the bundled benchmark to {data_dir} ...")
    spec_path = ctx.pipeline.export_bundled(data_dir, seed=a.seed)
    a.spec = str(spec_path)
    a.epochs = a.epochs if a.epochs is not None else DEMO_DEFAULTS["epochs"]
    a.n_ctx = a.n_ctx if a.n_ctx is not None else DEMO_DEFAULTS["n_ctx"]
    if a.affinity_steps is None:
        a.affinity_steps = DEMO_DEFAULTS["affinity_steps"]
    seeds = _seeds(a.seeds, DEMO_DEFAULTS["seeds"])
    ctx.config.update({"spec": a.spec, "epochs": a.epochs, "n_ctx": a.n_ctx, "seeds": seeds,
                       "affinity_steps": a.affinity_steps, "data_dir": str(data_dir)})
    ctx.run.write_config(ctx.config)
    ctx.say(f"demo settings: {a.shots} shots, seeds {seeds}, {a.epochs} epochs, n_ctx {a.n_ctx}, "
            f"affinity steps {a.affinity_steps}, model {a.model}, device {ctx.device}")
    ctx.run.report.title = "hipro demo (bundled benchmark)"
    ctx.run.report.add("Settings", f"{a.shots} shots per class, seeds {seeds}, {a.epochs} epochs, "
                                   f"{a.n_ctx} context tokens per node, {a.affinity_steps} affinity steps, "
                                   f"model `{a.model}`, device `{ctx.device}`.")
    ctx.features()
    _, _, tree = _affinity_and_tree(ctx)
    _compare(ctx, tree, seeds)
    ctx.say(f"demo took {time.time() - ctx.t0:.0f} s")
    ctx.finish()
    return 0


COMMANDS = {"cache": cmd_cache, "affinity": cmd_affinity, "tree": cmd_tree, "train": cmd_train, "eval": cmd_eval,
            "compare": cmd_compare, "export": cmd_export, "demo": cmd_demo}


# ------------------------------------------------------------------ entry point
def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith("'"):
        msg = f"missing key {msg}"
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    msg = " ".join(msg.split()) or type(e).__name__
    known = (HiproError, ValueError, OSError, NotImplementedError, KeyError)
    if not isinstance(e, known):
        msg = f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"
    return msg


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    print(f"hipro: warning: {text}", file=sys.stderr, flush=True)


def _bench_device(argv: list[str]) -> str:
    """The value of `--device X` / `--device=X` in the bench arguments ("cpu" when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cpu"


def _without_device(argv: list[str]) -> list[str]:
    """The CPU benchmark has no --device option: drop `--device cpu`."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--device":
            skip = True
        elif not arg.startswith("--device="):
            out.append(arg)
    return out


def _bench(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    try:
        if _bench_device(argv).startswith("cuda"):  # `hipro bench --device cuda ...`
            return int(bench_gpu.main(argv) or 0)
        return int(bench.main(_without_device(argv)) or 0)
    except SystemExit as e:  # its argparse: --help or a usage error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("hipro: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        print(f"hipro: error: {_one_line(e)}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the benchmark has its own parser
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    debug = bool(getattr(args, "debug", False))
    old_show = warnings.showwarning
    ctx = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            for mod in ("torch", "open_clip", "timm", "torchvision"):
                warnings.filterwarnings("ignore", module=mod)
            ctx = _Ctx(args, args.command)
            return int(COMMANDS[args.command](ctx) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("hipro: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line
        if ctx is not None:
            try:
                ctx.run.log("error", type=type(e).__name__, message=str(e))
            except OSError:
                pass
        if debug:
            raise
        print(f"hipro: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":
    sys.exit(main())
