#!/usr/bin/env python
"""Mutation check: does the test suite catch the bugs it claims to?

Each mutation below is one deliberate bug (a source snippet replaced by a broken
one). For every mutation the script copies the repository to a temporary
folder (the working tree without .git, .venv and build folders, but WITH the
built extension hipro_fast/_C*.so), applies the mutation there, runs the tests
meant to catch it in the copy (PYTHONPATH points at the copy; the script
checks that `import hipro_fast` resolves there), and reports whether they
failed. The tests are first run on an unmutated copy (the baseline): a test
that already fails proves nothing.

    .venv/bin/python scripts/mutation_check.py            # the Python mutations (~3-5 min on 2 cores)
    .venv/bin/python scripts/mutation_check.py --cpp      # + the C++ ones: each REBUILDS the extension
                                                          #   in its copy (setup.py build_ext, minutes
                                                          #   each) and runs the ctest build too
    .venv/bin/python scripts/mutation_check.py --only sgd-weight-decay amp-ignored
    .venv/bin/python scripts/mutation_check.py --list

Python mutations never rebuild: the copy reuses the compiled extension. A
mutation whose snippet is no longer in the source is reported as "snippet not
found": the code moved, update its `old` text here. Exit status: 0 when every
mutation that ran was caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "build-cmake", "__pycache__", ".pytest_cache",
                                     ".hypothesis", "runs", "*.egg-info", ".mypy_cache")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str                       # the bug, in words
    file: str                       # relative to the repository root
    old: str                        # exact text, must occur once
    new: str                        # its replacement
    tests: tuple[tuple[str, ...], ...]  # pytest argument lists; caught when any run fails
    cpp: bool = False               # needs a rebuild of the extension


# The "wrong tree of the same shape" bug: HiPro's tree keeps its shape but its
# tasks are re-dealt round-robin over the top-level groups (for the planted
# 4 x 4 and 3 x 2 trees every group then holds one task of each planted group).
_WRONG_TREE = '''            raise InvalidInputError("method 'hipro' needs a tree")
        # MUTATION: same shape, tasks re-dealt round-robin over the top-level groups
        _nested = (tree if isinstance(tree, TaskTree) else TaskTree.from_nested(tree)).to_nested()

        def _leaves(n):
            return [n] if isinstance(n, str) else [x for c in n for x in _leaves(c)]

        _flat, _m = _leaves(_nested), len(_nested)
        _dealt = iter([_flat[i] for i in sorted(range(len(_flat)), key=lambda i: (i % _m, i // _m))])

        def _fill(n):
            return next(_dealt) if isinstance(n, str) else [_fill(c) for c in n]

        tree = _fill(_nested)
'''

MUTATIONS = [
    Mutation("fit-leaves-model-sharded", "fit() leaves a multi-rank model sharded (rank-0-only use hangs)",
             "hipro_fast/method/training.py",
             "        raise\n    finally:\n        model.shard_text(0, 1)",
             "        raise",
             (("tests/distributed/test_training.py", "-k", "one_process_model_again"),)),
    Mutation("evaluate-unchecked-ranks", "evaluate() scores each rank's own data without a word",
             "hipro_fast/method/training.py",
             '        dist_group.check_agreement({"metric": metric, "data": digests}, "evaluate()")',
             "        pass",
             (("tests/distributed/test_training.py", "-k", "own_data"),)),
    Mutation("checkpoint-any-clip", "a checkpoint loads onto another CLIP without a word",
             "hipro_fast/method/checkpoint.py",
             '    if "text_tower" in saved and saved["text_tower"] != mine["text_tower"]:',
             '    if False:',
             (("tests/method/test_checkpoint.py", "-k", "another_clip"),)),
    Mutation("state-dict-any-tree", "load_state_dict takes a state of another tree with the same node ids",
             "hipro_fast/method/model.py",
             '        if theirs != model.tree.to_nested():',
             '        if False:',
             (("tests/method/test_model.py", "-k", "state_dict"),)),
    Mutation("sgd-weight-decay", "SGD ignores weight decay", "hipro_fast/method/training.py",
             "momentum=config.momentum, weight_decay=config.weight_decay)",
             "momentum=config.momentum)",
             (("tests/method/test_training.py",),)),
    Mutation("affinity-no-zscore", "transfer affinity without its z-score (raw -log loss)",
             "hipro_fast/method/affinity.py",
             "    return zscore_columns(s)\n", "    return s\n",
             (("tests/method/test_affinity.py",),)),
    Mutation("hipro-wrong-tree", "HiPro trained on a wrong tree of the same shape", "hipro_fast/method/baselines.py",
             "            raise InvalidInputError(\"method 'hipro' needs a tree\")\n", _WRONG_TREE,
             (("tests/method/test_planted.py", "-k", "right_tree"),)),
    Mutation("cache-ignores-mtime", "cache key ignores image mtimes and ctimes (size only)",
             "hipro_fast/data/feature_cache.py",
             "out.append([r.path, r.label, st.st_size, st.st_mtime_ns, st.st_ctime_ns])",
             "out.append([r.path, r.label, st.st_size, 0, 0])",
             (("tests/data/test_cache_keys.py",),)),
    Mutation("cache-ignores-preprocessing", "cache key ignores the preprocessing", "hipro_fast/data/feature_cache.py",
             '"preprocess": preprocess_repr(self.preprocess),', '"preprocess": None,',
             (("tests/data/test_cache_keys.py",),)),
    Mutation("weights-fingerprint-name-only", "the image tower's fingerprint ignores its weights (name only)",
             "hipro_fast/data/feature_cache.py",
             'return {"name": name, "visual_sha256": image_side_digest(model, refresh=True)}',
             'return {"name": name}',
             (("tests/data/test_cache_keys.py",),)),
    Mutation("draws-not-split", "parallel=\"draws\" silently runs every draw on every rank (class-sharded)",
             "hipro_fast/method/protocol.py",
             'width = group.world_size if group is not None and parallel == "draws" else 1',
             "width = 1  # MUTATION",
             (("tests/distributed/test_training.py", "-k", "protocol_draws"),)),
    Mutation("draw-gather-under-timeout", "the round's gather waits under --dist-timeout (the default group)",
             "hipro_fast/method/protocol.py",
             "waiting = dist_group.unbounded_wait_group() if width > 1 else None",
             "waiting = None  # MUTATION",
             (("tests/distributed/test_training.py", "-k", "longer_than"),)),
    Mutation("lbfgs-cold-resume", "a resumed L-BFGS run restarts its curvature memory (state not restored)",
             "hipro_fast/method/checkpoint.py",
             "            optimizer.state[p] = _lbfgs_state(tensors, p)\n",
             "            pass  # MUTATION\n",
             (("tests/method/test_checkpoint.py", "-k", "crash_in_process and lbfgs"),)),
    Mutation("lbfgs-objective-without-prior", "L-BFGS's line search compares the loss without the hierarchy prior",
             "hipro_fast/method/training.py",
             "            return sum(values) / len(values) + prior_value, values",
             "            return sum(values) / len(values), values  # MUTATION",
             (("tests/method/test_training.py", "-k", "lbfgs"),)),
    Mutation("amp-ignored", "amp= silently ignored (no autocast)", "hipro_fast/method/training.py",
             "    if dtype is None:\n        return contextlib.nullcontext()\n    return torch.autocast(",
             "    if True:  # MUTATION\n        return contextlib.nullcontext()\n    return torch.autocast(",
             (("tests/method/test_training.py",),)),
    Mutation("resume-any-validation-set", "a resume chooses its best epoch on another validation set, or none",
             "hipro_fast/method/training.py",
             '        if "val_key" in (state.extra or {}) and state.extra["val_key"] != val_key:',
             "        if False:  # MUTATION",
             (("tests/method/test_training.py", "-k", "same_validation"),)),
    Mutation("classifier-unchecked", "a corrupt or edited classifier file loads without a word",
             "hipro_fast/method/export.py",
             '        if "checksum" in meta and tensors_digest(tensors) != meta["checksum"]:',
             "        if False:  # MUTATION",
             (("tests/method/test_export.py", "-k", "hand_edited"),)),
    Mutation("affinity-one-stream", "the affinity's tasks share one sampling stream (order-dependent)",
             "hipro_fast/method/affinity.py",
             'self.gens = {t: keyed_generator(seed, f"affinity/{t}") for t in data}',
             'shared = keyed_generator(seed, "affinity")\n        self.gens = {t: shared for t in data}',
             (("tests/method/test_affinity.py", "-k", "task_order"),)),
    Mutation("init-by-node-id", "node contexts seeded by node id (position in the tree), not by their tasks",
             "hipro_fast/method/model.py", "    return keyed_generator(seed, json.dumps(key))",
             "    return keyed_generator(seed, node)",
             (("tests/method/test_model.py", "-k", "order_of_tasks"),)),
    Mutation("restarts-share-a-seed", "coop-best-of-3's restarts start from the run's own initialisation",
             "hipro_fast/method/baselines.py",
             '    return int(seed) if restart == 0 else keyed_seed(seed, f"restart/{restart}")',
             "    return int(seed)  # MUTATION",
             (("tests/method/test_baselines.py", "-k", "coop_best_of"),)),
    Mutation("selected-features-from-first", "a SelectedModel scores every task with its first candidate",
             "hipro_fast/method/selection.py",
             "            feats.update({t: theirs[t] for t in tasks})",
             "            feats.update({t: self.first.text_features()[t] for t in tasks})  # MUTATION",
             (("tests/method/test_selection.py",),)),
    Mutation("selection-resume-retrains", "hipro train --select per-task --resume starts every candidate over",
             "hipro_fast/app/pipeline.py",
             '"seed": seed, "progress": progress, "resume": bool(resume)}))',
             '"seed": seed, "progress": progress, "resume": False}))  # MUTATION',
             (("tests/app/test_cli.py", "-k", "select_per_task"),)),
    Mutation("predict-softmax-over-images", "hipro predict normalises the probabilities over the images, "
             "not over the task's classes", "hipro_fast/app/predict.py",
             "logits(task, enc.features).softmax(dim=1)", "logits(task, enc.features).softmax(dim=0)  # MUTATION",
             (("tests/app/test_predict.py",),)),
    Mutation("state-any-combine", "a state_dict of a concat model loads into a mean one (same keys and shapes)",
             "hipro_fast/method/model.py", "        if combine is not None and combine != model.combine:",
             "        if False:  # MUTATION", (("tests/method/test_model.py", "-k", "another_combination"),)),
    Mutation("resume-spec-by-spelling", "a --resume compares --spec as typed (./tasks.toml is another spec)",
             "hipro_fast/app/pipeline.py", "        if key in PATH_OPTIONS and _same_file(saved, now, key):",
             "        if False:  # MUTATION", (("tests/app/test_pipeline.py", "-k", "spelling"),)),
    Mutation("resume-relogs-epochs", "a --resume of a finished train run logs every epoch again",
             "hipro_fast/cli.py", '_training_curves(ctx, result, skip=ctx.run.logged("train_epoch"))',
             "_training_curves(ctx, result)  # MUTATION",
             (("tests/app/test_cli.py", "-k", "test_sigkill_then_resume_equals_the_uninterrupted_run"),)),
    Mutation("functional-call-ignored", "the forward reads contexts kept aside, not the registered parameters",
             "hipro_fast/method/model.py",
             "        return {n: self.contexts[_state_key(n)] for n in self._context_nodes}",
             "        if not hasattr(self, '_kept'):  # MUTATION\n"
             "            object.__setattr__(self, '_kept', {n: self.contexts[_state_key(n)] for n in self._context_nodes})\n"
             "        return self._kept",
             (("tests/method/test_model.py", "-k", "registered_parameters"),)),
    Mutation("best-of-picks-first", "coop-best-of-3 keeps restart 0 instead of the best on validation",
             "hipro_fast/method/baselines.py",
             "                chosen = choose_per_task(cands, select_by)",
             "                chosen = choose_per_task(cands, select_by) if method == \"hipro\" else {}",
             (("tests/method/test_baselines.py", "-k", "coop_best_of"),)),
    Mutation("fake-any-device", "the fake kernels accept arguments on different devices (meta among real ones)",
             "hipro_fast/ops/interface.py", "        if t.device != ref.device:", "        if False:  # MUTATION",
             (("tests/ops/test_ops.py", "-k", "meta_argument"),)),
    Mutation("checkpoint-width-unchecked", "eval / export open their run directory for a checkpoint of "
             "another text width", "hipro_fast/app/pipeline.py",
             "    if width is not None and trained_width is not None and int(trained_width) != width:",
             "    if False:  # MUTATION",
             (("tests/app/test_cli.py", "-k", "other_classes_is_refused"),)),
    Mutation("suffix-no-period", "class suffix drops the '.' (the oracle must not share the suffix code)",
             "hipro_fast/engine/prompt_forest.py",
             'text = name.replace("_", " ") + "."', 'text = name.replace("_", " ")',
             (("tests/engine/test_text_tower.py", "-k", "tiny_configs_exact or fuzz"),)),
    Mutation("suffix-keeps-underscores", "class suffix keeps underscores", "hipro_fast/engine/prompt_forest.py",
             'text = name.replace("_", " ") + "."', 'text = name + "."',
             (("tests/engine/test_text_tower.py", "-k", "tiny_configs_exact or fuzz"),)),
    Mutation("segment-table-order-checks", "segment-table parent-order / subtree_end checks dropped",
             "csrc/tree_index.h",
             "len <= num_tokens - off &&\n         seg_subtree_end(table, s) <= num_tokens && seg_parent(table, s) < s;",
             "len <= num_tokens - off;",
             (("tests/ops/test_ops.py", "-k", "malformed or rejects"), ("tests/ops/test_cpp.py",)), cpp=True),
    Mutation("segment-length-overflow", "a segment length that overflows offset + length passes the range check",
             "csrc/tree_index.h", "len <= num_tokens - off &&", "off + len <= num_tokens &&",
             (("tests/ops/test_ops.py", "-k", "malformed"),), cpp=True),
    Mutation("depth-unchecked", "a forest deeper than kMaxDepth is not refused up front",
             "csrc/tree_index.h", "if (seg_parent(table, a) >= a || ++depth > kMaxDepth) return false;",
             "if (seg_parent(table, a) >= a) return false;",
             (("tests/ops/test_ops.py", "-k", "deeper"),), cpp=True),
    Mutation("fp16-ds-rounded", "the GEMM-block backward rounds fp16's dS to fp16 (inf, then NaN)",
             "csrc/attention_blocks.cpp", "const auto ds_dtype = operand == at::kHalf ? acc : operand;",
             "const auto ds_dtype = operand;",
             (("tests/ops/test_ops.py", "-k", "fp16_backward"),), cpp=True),
    Mutation("token-in-segment-check", "token-inside-its-segment check dropped", "csrc/tree_index.h",
             "return seg >= 0 && seg < num_segments && t >= seg_offset(table, seg) &&\n"
             "         t < seg_offset(table, seg) + seg_length(table, seg);",
             "return seg >= 0 && seg < num_segments;",
             (("tests/ops/test_ops.py", "-k", "malformed or rejects"), ("tests/ops/test_cpp.py",)), cpp=True),
    Mutation("assemble-backward-overwrites", "the assembly backward keeps the last token's gradient of a "
             "context row instead of summing them", "csrc/context_rows.h",
             "acc[w - w0] += static_cast<acc_t>(grad_row[w]);",
             "acc[w - w0] = static_cast<acc_t>(grad_row[w]);",
             (("tests/ops/test_ops.py", "-k", "assemble_fuzz"),), cpp=True),
    Mutation("assemble-backward-reversed", "the assembly backward sums a context row's tokens last to first "
             "(not the order both devices share)", "csrc/context_rows.h",
             "for (int64_t j = row_start[r]; j < row_start[r + 1]; ++j) {",
             "for (int64_t j = row_start[r + 1] - 1; j >= row_start[r]; --j) {",
             (("tests/ops/test_ops.py", "-k", "assemble_fuzz"),), cpp=True),
    Mutation("tree-attention-autocast", "the CPU tree attention no longer excludes autocast around its block GEMMs",
             "csrc/cpu/tree_attention_cpu.cpp",
             "  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);\n"
             "  check_attention_args(q, k, v, segment_table, token_segment);",
             "  check_attention_args(q, k, v, segment_table, token_segment);",
             (("tests/ops/test_ops.py", "-k", "ignores_autocast"),), cpp=True),
]


def _env(copy: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(copy), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1")
    env.pop("HIPRO_FAST_REFERENCE", None)
    return env


def make_copy(parent: Path, label: str) -> Path:
    dst = parent / label
    shutil.copytree(REPO, dst, ignore=COPY_IGNORE, symlinks=True)
    return dst


def check_import_resolves(copy: Path, env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-c", "import hipro_fast; print(hipro_fast.__file__)"], cwd=copy, env=env,
                         capture_output=True, text=True)
    where = out.stdout.strip()
    if out.returncode != 0 or not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"import hipro_fast in the copy resolved to {where!r} (not {copy}): {out.stderr[-500:]}")


def rebuild(copy: Path, env: dict[str, str]) -> tuple[bool, str]:
    """setup.py build_ext --inplace in the copy (CPU kernels unless the machine has CUDA)."""
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy,
                         env={**env, "MAX_JOBS": env.get("MAX_JOBS", "2")}, capture_output=True, text=True)
    return out.returncode == 0, (out.stdout + out.stderr)[-2000:]


def run_tests(copy: Path, env: dict[str, str], tests) -> tuple[bool, str, str]:
    """(all passed, first failing test or '', last output lines) over the pytest runs."""
    for args in tests:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *args],
                             cwd=copy, env=env, capture_output=True, text=True)
        text = out.stdout + out.stderr
        if out.returncode == 1:  # tests ran and some failed
            failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", text, flags=re.M)
            return False, failed[0] if failed else "?", text[-1500:]
        if out.returncode != 0:  # collection error, no tests selected, interrupted ...
            raise RuntimeError(f"pytest {' '.join(args)} exited {out.returncode}:\n{text[-1500:]}")
    return True, "", ""


def apply(copy: Path, m: Mutation) -> bool:
    path = copy / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return False
    path.write_text(text.replace(m.old, m.new))
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpp", action="store_true", help="also run the C++ mutations (rebuilds the extension per mutation)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the tests on an unmutated copy first")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the test runs (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    a = ap.parse_args(argv)

    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {'[C++] ' if m.cpp else ''}{m.what}  ({m.file})")
        return 0
    unknown = sorted(set(a.only or []) - {m.name for m in MUTATIONS})
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; see --list")
    chosen = [m for m in MUTATIONS if not a.only or m.name in a.only]
    if not any(REPO.glob("hipro_fast/_C*.so")):
        raise SystemExit("hipro_fast/_C*.so is missing: run `make build` first (the copies reuse it)")

    work = Path(tempfile.mkdtemp(prefix="hipro-mutations-"))
    rows, all_caught, t_start = [], True, time.time()
    try:
        if not a.skip_baseline:
            base = make_copy(work, "baseline")
            env = _env(base, a.threads)
            check_import_resolves(base, env)
            suites = sorted({args for m in chosen if a.cpp or not m.cpp for args in m.tests})
            for args in suites:
                ok, failed, tail = run_tests(base, env, (args,))
                if not ok:
                    raise SystemExit(f"baseline: `pytest {' '.join(args)}` fails without any mutation "
                                     f"({failed}); fix that first:\n{tail}")
            print(f"baseline: {len(suites)} test selections pass ({time.time() - t_start:.0f} s)", flush=True)
        for m in chosen:
            t0 = time.time()
            tests = "; ".join(" ".join(args) for args in m.tests)
            if m.cpp and not a.cpp:
                rows.append((m, tests, "skipped (C++: run with --cpp, rebuilds the extension)", "", 0.0))
                continue
            copy = make_copy(work, m.name)
            env = _env(copy, a.threads)
            if not apply(copy, m):
                rows.append((m, tests, "snippet not found: update this mutation", "", 0.0))
                all_caught = False
                continue
            check_import_resolves(copy, env)
            if m.cpp:
                built, log = rebuild(copy, env)
                if not built:
                    rows.append((m, tests, "rebuild failed", log.splitlines()[-1] if log else "", time.time() - t0))
                    all_caught = False
                    continue
            try:
                passed, failed, _ = run_tests(copy, env, m.tests)
                result = "NOT caught" if passed else "caught"
            except RuntimeError as e:
                passed, failed, result = True, "", f"error: {str(e).splitlines()[0]}"
            all_caught &= not passed
            rows.append((m, tests, result, failed, time.time() - t0))
            print(f"{m.name}: {result} {failed} ({time.time() - t0:.0f} s)", flush=True)
            if not a.keep:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if a.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("| mutation | bug | tests run | result | first failing test | s |")
    print("|---|---|---|---|---|---:|")
    for m, tests, result, failed, secs in rows:
        print(f"| {m.name} | {m.what} | `{tests}` | {result} | {failed and '`' + failed + '`'} | {secs:.0f} |")
    print(f"\n{sum(r[2] == 'caught' for r in rows)} of {len(rows)} mutations caught "
          f"({time.time() - t_start:.0f} s in all)")
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
