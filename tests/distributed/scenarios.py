"""Training scenarios run twice: under torchrun with 2 processes
(`python tests/distributed/scenarios.py OUT`, via torch.distributed.run) and in
the test process (one process); the tests compare the two.

Each scenario returns {name: tensor}; the worker saves rank 0's (and checks
that every rank ended with the same contexts)."""
from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from tests.helpers_training import make_model, tiny_clip, toy_data, TASKS, TREE  # noqa: E402

# 20 SGD steps: AdamW's normalised update would magnify the ranks' fp32 summation order past the bound
STEPS = dict(optimizer="sgd", epochs=4, steps_per_epoch=5, batch_size=5, lr=0.05, seed=7)
STOP_AT = (2, 0)  # the interrupted run raises here (after the checkpoint of epoch 1)


class Interrupt(Exception):
    pass


def _state(prefix: str, res, model) -> dict[str, torch.Tensor]:
    from hipro_fast.method.training import evaluate

    out = {f"{prefix}/final/{k}": v.detach().cpu() for k, v in res.final_state.items()}
    acc = evaluate(model, toy_data(seed=3, noise=1.0))
    out[f"{prefix}/test_acc"] = torch.tensor([acc[t] for t in TASKS], dtype=torch.float64)
    out[f"{prefix}/val_mean"] = torch.tensor([h["val_mean"] for h in res.history], dtype=torch.float64)
    out[f"{prefix}/loss"] = torch.tensor([h["loss"] for h in res.history], dtype=torch.float64)
    return out


def scenario_mean(ckdir: str | None = None) -> dict[str, torch.Tensor]:
    """combine mean + learned path weights + parent prior (every learned tensor kind)."""
    from hipro_fast.method.training import fit

    model = make_model(combine="mean", path_weights="learned", parent_prior=0.1)
    res = fit(model, toy_data(seed=1), toy_data(seed=2, noise=1.0), checkpoint_dir=ckdir, **STEPS)
    return _state("mean", res, model)


def scenario_mean_model():
    """scenario_mean's trained model (what after_fit_on_rank_0_alone trains)."""
    from hipro_fast.method.training import fit

    model = make_model(combine="mean", path_weights="learned", parent_prior=0.1)
    fit(model, toy_data(seed=1), toy_data(seed=2, noise=1.0), **STEPS)
    return model


def scenario_concat() -> dict[str, torch.Tensor]:
    from hipro_fast.method.training import fit

    model = make_model(combine="concat")
    # the full batch: the global batch is each task's whole training set
    res = fit(model, toy_data(seed=1), toy_data(seed=2, noise=1.0), **{**STEPS, "batch_size": "full"})
    return _state("concat", res, model)


def scenario_lbfgs() -> dict[str, torch.Tensor]:
    """L-BFGS: the line search compares the global objective (the hierarchy prior
    included), so every rank takes the same steps as one process."""
    from hipro_fast.method.training import fit

    model = make_model(combine="mean", path_weights="learned", parent_prior=0.1)
    res = fit(model, toy_data(seed=1), toy_data(seed=2, noise=1.0), optimizer="lbfgs", batch_size="full",
              epochs=3, steps_per_epoch=4, seed=7)
    return _state("lbfgs", res, model)


def scenario_baselines() -> dict[str, torch.Tensor]:
    """compare(): zero-shot (evaluation only), CoOp per task / shared, two-level, hipro, coop-best-of-3."""
    from hipro_fast.method.baselines import compare
    from hipro_fast.method.training import TrainConfig

    clip, tok = tiny_clip()
    cfg = TrainConfig(optimizer="sgd", epochs=2, steps_per_epoch=3, batch_size=5, lr=0.05)
    table = compare(clip, TASKS, toy_data(seed=1), toy_data(seed=3, noise=1.0), val=toy_data(seed=2, noise=1.0),
                    seeds=(1,), tree=TREE, n_ctx=2, train_config=cfg, tokenizer=tok)
    return {f"compare/{m}": torch.tensor([r["task_acc"][t] for t in TASKS], dtype=torch.float64)
            for m, r in table.to_dict()["methods"].items()}


@contextlib.contextmanager
def compare_preceded_by(before):
    """protocol.compare with before(kw) called first (to record, fail or stall a draw)."""
    from hipro_fast.method import protocol

    real_compare = protocol.compare

    def wrapped(*args, **kw):
        before(kw)
        return real_compare(*args, **kw)

    protocol.compare = wrapped
    try:
        yield
    finally:
        protocol.compare = real_compare


def scenario_protocol(ckdir: str | None = None, parallel: str = "draws") -> dict[str, torch.Tensor]:
    """run_protocol over 2 shot counts x 3 seeds (6 draws: with parallel="draws",
    3 rounds on 2 ranks), per-task selection on; the on_run order and which
    rank trained which draw are recorded. Keys: protocol[-classes]/..."""
    import torch.distributed as dist

    from hipro_fast.distributed import group
    from hipro_fast.method import protocol
    from hipro_fast.method.training import TrainConfig
    from tests.helpers_training import few_shot_pool

    clip, tok = tiny_clip()
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, optimizer="adamw", batch_size=4, lr=0.05, checkpoint_dir=ckdir)
    seen: list[tuple[int, int]] = []
    trained: list[tuple[int, int, int]] = []  # (rank, seed, 1 if it ran as a world of one)

    def record(kw):
        rank = dist.get_rank() if dist.is_initialized() else 0
        trained.append((rank, kw["seeds"][0], int(group.current() is None)))

    with compare_preceded_by(record):
        res = protocol.run_protocol((clip, tok), TASKS, few_shot_pool(per_class=10), toy_data(seed=5), shots=(1, 2),
                                    seeds=(0, 1, 2), methods=["coop-per-task", "two-level", "hipro"], tree=TREE,
                                    n_ctx=2, train_config=cfg, on_run=lambda k, s, t: seen.append((k, s)),
                                    parallel=parallel)
    everyone = [trained]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, trained)
    name = "protocol" if parallel == "draws" else f"protocol-{parallel}"
    out = {f"{name}/on_run": torch.tensor(seen, dtype=torch.float64),
           f"{name}/trained": torch.tensor([t for part in everyone for t in part], dtype=torch.float64)}
    for (k, s), table in res.runs.items():
        for m, r in table.results.items():
            out[f"{name}/{k}/{s}/{m}"] = torch.tensor([r.task_acc[t] for t in TASKS], dtype=torch.float64)
    return out


def protocol_failure() -> str:
    """A draw that raises on one rank (seed 1: rank 1's): what each rank is told."""
    from hipro_fast.errors import DistributedError
    from hipro_fast.method import protocol
    from hipro_fast.method.training import TrainConfig
    from tests.helpers_training import few_shot_pool

    clip, tok = tiny_clip()

    def fail_seed_1(kw):
        if kw["seeds"][0] == 1:
            raise RuntimeError("boom")

    try:
        with compare_preceded_by(fail_seed_1):
            protocol.run_protocol((clip, tok), TASKS, few_shot_pool(per_class=10), toy_data(seed=5), shots=(1,),
                                  seeds=(0, 1), methods=["coop-per-task"], n_ctx=2,
                                  train_config=TrainConfig(epochs=1, steps_per_epoch=1, optimizer="adamw",
                                                           batch_size=4))
    except DistributedError as e:
        return f"told: {e}"
    except RuntimeError as e:
        return f"own: {e}"
    return "no error"


def interrupted(ckdir: str) -> None:
    """The mean scenario, stopped by an exception at STOP_AT (every rank raises there)."""
    from hipro_fast.method.training import fit

    def stop(info):
        if (info["epoch"], info["step"]) == STOP_AT:
            raise Interrupt()

    model = make_model(combine="mean", path_weights="learned", parent_prior=0.1)
    try:
        fit(model, toy_data(seed=1), toy_data(seed=2, noise=1.0), checkpoint_dir=ckdir, callback=stop, **STEPS)
    except Interrupt:
        return
    raise AssertionError("the interrupted run was not interrupted")


def resumed(ckdir: str) -> dict[str, torch.Tensor]:
    from hipro_fast.method.training import fit

    model = make_model(combine="mean", path_weights="learned", parent_prior=0.1)
    res = fit(model, toy_data(seed=1), toy_data(seed=2, noise=1.0), checkpoint_dir=ckdir, resume=True, **STEPS)
    return _state("resumed", res, model)


def after_fit_on_rank_0_alone(work: str) -> dict[str, torch.Tensor]:
    """fit() and evaluate() in the group, then what a script does on rank 0 only:
    text features and export_classifier (collectives while the model was left
    sharded: rank 0 waited for rank 1 until the timeout). Then evaluate() given
    each rank's own data, refused on every rank. Rank 0's features out."""
    import torch.distributed as dist

    from hipro_fast.method.export import export_classifier
    from hipro_fast.method.training import evaluate

    model = scenario_mean_model()
    alone = [None]
    if dist.get_rank() == 0:  # after fit()
        alone[0] = {f"alone/{t}": f.detach().clone() for t, f in model.text_features().items()}
        # the contexts they came from (what the two-rank training reached, equal to one process's
        # only up to the summation order of the gradients)
        alone[0].update({f"alone/ctx/{n}": p.detach().clone() for n, p in model.context_state().items()})
    dist.barrier()
    evaluate(model, toy_data(seed=3, noise=1.0))
    if dist.get_rank() == 0:  # after evaluate()
        export_classifier(model, os.path.join(work, "alone.safetensors"))
    dist.broadcast_object_list(alone, src=0)  # every rank returns the same keys (the final all_gather)
    out = dict(alone[0])
    try:
        evaluate(model, toy_data(seed=10 + dist.get_rank(), noise=1.0))
        told = "evaluated"
    except Exception as e:  # noqa: BLE001 - reported to the test
        told = f"{type(e).__name__}: {e}"
    out[f"alone/own_data/{dist.get_rank()}"] = torch.tensor(list(told.encode()), dtype=torch.uint8)
    return out


def main(argv: list[str]) -> None:
    """OUT WORKDIR: run every scenario in this (torchrun) process group; rank 0 writes OUT."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from hipro_fast.distributed import group

    torch.set_num_threads(1)
    out_path, work = argv[0], argv[1]
    info = group.init_from_env("cpu", timeout_s=60)
    assert info is not None and info.world_size > 1, "run me under torchrun with 2+ processes"
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(scenario_mean())
    alone = after_fit_on_rank_0_alone(work)
    own_data = {k: v for k, v in alone.items() if k.startswith("alone/own_data/")}
    everyone_told = [None] * info.world_size
    dist.all_gather_object(everyone_told, own_data)
    for told in everyone_told:
        alone.update(told)
    tensors.update(alone)
    tensors.update(scenario_concat())
    tensors.update(scenario_lbfgs())
    tensors.update(scenario_baselines())
    tensors.update(scenario_protocol(os.path.join(work, "protocol")))
    tensors.update(scenario_protocol(parallel="classes"))
    told = protocol_failure()
    told_everyone = [None] * info.world_size
    dist.all_gather_object(told_everyone, told)
    for r, text in enumerate(told_everyone):
        tensors[f"protocol_failure/{r}"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    # Interrupted with 2 ranks, resumed with 2 here (the test resumes a copy with 1).
    interrupted(os.path.join(work, "ckpt2"))
    dist.barrier()
    if info.rank == 0:
        import shutil

        shutil.copytree(os.path.join(work, "ckpt2"), os.path.join(work, "ckpt2-for-1"))
    dist.barrier()
    tensors.update(resumed(os.path.join(work, "ckpt2")))
    # Every rank holds the same contexts (they are replicated).
    mine = torch.cat([v.reshape(-1).double() for k, v in sorted(tensors.items())])
    everyone = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    same = all(torch.equal(everyone[0], e) for e in everyone[1:])
    if info.rank == 0:
        tensors["ranks_agree"] = torch.tensor([float(same)])
        tensors["world_size"] = torch.tensor([float(info.world_size)])
        save_file({k: v.contiguous() for k, v in tensors.items()}, out_path)
    group.shutdown()


SLOW_DRAW_TIMEOUT_S, SLOW_DRAW_SLEEP_S = 5.0, 12.0


def slow_draw(argv: list[str]) -> None:
    """OUT: a process group whose collectives time out after 5 s, and a draw
    (seed 1, rank 1's) that takes 12 s longer than the other: rank 0 waits for
    it in the round's gather, which must not be bound by that timeout. Rank 0
    writes the protocol's accuracies to OUT."""
    import time

    from safetensors.torch import save_file

    from hipro_fast.distributed import group
    from hipro_fast.method import protocol
    from hipro_fast.method.training import TrainConfig
    from tests.helpers_training import few_shot_pool

    torch.set_num_threads(1)
    info = group.init_from_env("cpu", timeout_s=SLOW_DRAW_TIMEOUT_S)
    assert info is not None and info.world_size == 2

    def stall_seed_1(kw):
        if kw["seeds"][0] == 1:
            time.sleep(SLOW_DRAW_SLEEP_S)

    clip, tok = tiny_clip()
    with compare_preceded_by(stall_seed_1):
        res = protocol.run_protocol((clip, tok), TASKS, few_shot_pool(per_class=10), toy_data(seed=5), shots=(1,),
                                    seeds=(0, 1), methods=["coop-per-task"], n_ctx=2,
                                    train_config=TrainConfig(epochs=1, steps_per_epoch=1, optimizer="adamw",
                                                             batch_size=4))
    if info.rank == 0:
        save_file({f"{s}": torch.tensor([t["coop-per-task"].mean]) for (_, s), t in res.runs.items()}, argv[0])
    group.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "--slow-draw":
        slow_draw(sys.argv[2:])
    else:
        main(sys.argv[1:])
