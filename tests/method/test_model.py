"""HiProModel: contexts per node, prompt semantics through the forest, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

import hipro_fast as hf
from hipro_fast.errors import InvalidInputError
from tests import oracle

TASKS = {"a": ["dog", "cat"], "b": ["car", "bus", "bike"], "c": ["pizza"]}


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["w64_h4_l2_gelu"]


@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_text_features_follow_the_path_semantics(tiny, tokenizer, combine):
    model = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx={"root": 3, "root/0": 2}, combine=combine,
                          tokenizer=tokenizer, seed=1)
    assert set(model.ctx) == {"root", "root/0", "task/a", "task/b", "task/c"}
    assert model.ctx["task/a"].shape == (16, 64) and model.ctx["root"].shape == (3, 64)
    feats = model.text_features()
    ctx = {n: p.detach() for n, p in model.ctx.items()}
    paths = {t: model.tree.path(t) for t in TASKS}
    expected = oracle.task_features(tiny, tokenizer, ctx, paths, TASKS, combine)
    for t in TASKS:
        torch.testing.assert_close(feats[t], expected[t], atol=1e-5, rtol=0)
        torch.testing.assert_close(feats[t].norm(dim=-1), torch.ones(len(TASKS[t])))


def test_zero_ctx_nodes_and_zero_shot_template(tiny, tokenizer):
    n_phrase = len(tokenizer.encode("a photo of a"))
    model = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx={"root": n_phrase, **{f"task/{t}": 0 for t in TASKS}},
                          ctx_init="a photo of a", tokenizer=tokenizer)
    assert list(model.ctx) == ["root"]
    assert model.num_trainable_parameters() == n_phrase * 64
    feats = model.text_features()
    with torch.no_grad():
        ref = F.normalize(tiny.encode_text(tokenizer([f"a photo of a {c}." for c in TASKS["b"]])), dim=-1)
    torch.testing.assert_close(feats["b"], ref, atol=1e-5, rtol=0)


def test_logits_and_gradients_reach_every_path_context(tiny, tokenizer):
    model = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=2, tokenizer=tokenizer)
    img = F.normalize(torch.randn(4, 24), dim=-1)
    logits = model.logits("b", img)
    assert logits.shape == (4, 3)
    logits.sum().backward()
    touched = {n for n, p in model.ctx.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"root", "root/0", "task/b"}


def test_only_contexts_are_parameters(tiny, tokenizer):
    model = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx=4, tokenizer=tokenizer)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 4
    assert all(not p.requires_grad for p in tiny.parameters())


def test_context_state_round_trip_and_mismatch(tiny, tokenizer):
    m1 = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx=4, tokenizer=tokenizer, seed=1)
    m2 = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx=4, tokenizer=tokenizer, seed=2)
    m2.load_context_state(m1.context_state())
    for n in m1.ctx:
        torch.testing.assert_close(m1.ctx[n], m2.ctx[n])
    m3 = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=4, tokenizer=tokenizer)
    with pytest.raises(hf.TreeError, match="node 'root/0'"):
        m1.load_context_state(m3.context_state())
    m4 = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx=5, tokenizer=tokenizer)
    with pytest.raises(hf.TreeError, match=r"node 'root': checkpoint context \(5, 64\)"):
        m1.load_context_state(m4.context_state())


@pytest.mark.parametrize("tasks,tree,match,exc", [
    ({"a": ["x", "x"]}, ["a"], "task 'a' has duplicate class name 'x'", hf.TaskSpecError),
    ({"a": []}, ["a"], "task 'a' has no classes", hf.TaskSpecError),
    ({}, [], "no tasks", hf.TaskSpecError),
    ({"a": ["x"], "b": ["y"]}, ["a"], "task 'b' is missing from the tree", hf.TreeError),
    ({"a": ["x"]}, ["a", "ghost"], "unknown task 'ghost'", hf.TreeError),
    ({"a": ["x"]}, ["a", "a"], "task 'a' appears twice", hf.TreeError),
])
def test_bad_tasks_and_trees(tiny, tokenizer, tasks, tree, match, exc):
    with pytest.raises(exc, match=match):
        hf.HiProModel(tiny, tasks, tree, tokenizer=tokenizer)


def test_feature_dim_and_task_errors(tiny, tokenizer):
    model = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx=2, tokenizer=tokenizer)
    with pytest.raises(hf.TaskSpecError, match=r"task 'a': image features must be \[N, 24\], got \(3, 7\)"):
        model.logits("a", torch.randn(3, 7))
    with pytest.raises(hf.TaskSpecError, match="unknown task 'zzz'"):
        model.logits("zzz", torch.randn(3, 24))
    with pytest.raises(TypeError, match=r"task must be a task name \(str\), got Tensor \(arguments swapped"):
        model.logits(torch.randn(3, 24), "a")
    img = F.normalize(torch.randn(3, 24), dim=-1)
    with torch.no_grad():
        feats = model.text_features()
    torch.testing.assert_close(model.logits("a", img, feats), model.logits("a", img).detach(), rtol=0, atol=0)
    for bad, got in (({"b": feats["b"]}, "no entry"), ({"a": feats["b"]}, r"shape \(3, 24\)"),
                     ({"a": "x"}, "str")):
        with pytest.raises(InvalidInputError, match=rf"text_features\['a'\] should be a \[2, 24\] tensor .*got {got}"):
            model.logits("a", img, bad)


def test_overflowing_prompt_names_the_task(tiny, tokenizer):
    # concat: root 40 + leaf 40 contexts in one prompt overflow the 77 tokens
    with pytest.raises(hf.ForestError, match="task 'a', class 'dog'"):
        hf.HiProModel(tiny, {"a": ["dog"]}, ["a"], n_ctx=40, combine="concat", tokenizer=tokenizer)
    # mean: each node's prompt stands alone, so only one node's 80 contexts overflow
    hf.HiProModel(tiny, {"a": ["dog"]}, ["a"], n_ctx=40, combine="mean", tokenizer=tokenizer)
    with pytest.raises(hf.ForestError, match="task 'a', class 'dog'"):
        hf.HiProModel(tiny, {"a": ["dog"]}, ["a"], n_ctx={"root": 2, "task/a": 80}, combine="mean",
                      tokenizer=tokenizer)


def test_load_clip_local_file_and_mismatch(tmp_path, tiny):
    from safetensors.torch import save_file

    full = hf.load_clip("ViT-B-16")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in full.model.state_dict().items()}, str(path))
    again = hf.load_clip("ViT-B-16", pretrained=path)
    torch.testing.assert_close(again.model.text_projection, full.model.text_projection)
    model, tok = hf.data.clip_loading.clip_parts(again)
    assert model is again.model and tok is again.tokenizer
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(bad))
    with pytest.raises(hf.WeightsMismatchError, match="does not match"):
        hf.load_clip("ViT-B-16", pretrained=bad)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        hf.load_clip("ViT-B-16", pretrained=tmp_path / "nope.pt")


@pytest.mark.parametrize("pair", [("big_dog", "big dog"), ("Dog", "dog"), ("hot  dog", "hot dog")])
def test_classes_that_tokenise_identically_are_rejected_naming_both(tiny, tokenizer, pair):
    """Before: accepted, with identical text features (one class never predicted)."""
    a, b = pair
    tasks = {"pets": ["cat", a, b], "other": ["x", "y"]}
    suffix = hf.engine.prompt_forest.class_suffix_tokens
    assert suffix(tokenizer, a) == suffix(tokenizer, b)  # the premise: the prompts are the same tokens
    with pytest.raises(hf.errors.TaskSpecError) as e:
        hf.HiProModel(tiny, tasks, list(tasks), n_ctx=2, tokenizer=tokenizer)
    msg = str(e.value)
    assert "'pets'" in msg and repr(a) in msg and repr(b) in msg and "\n" not in msg
    with pytest.raises(hf.errors.TaskSpecError, match="tokenise identically"):
        hf.method.model.validate_tasks(tasks, tokenizer)
    # the same two names in different tasks are fine; without a tokenizer only exact duplicates are checked
    hf.HiProModel(tiny, {"t1": ["cat", a], "t2": ["cat", b]}, ["t1", "t2"], n_ctx=2, tokenizer=tokenizer)
    assert hf.method.model.validate_tasks(tasks) == tasks


def test_state_dict_round_trip_names_its_contexts_and_refuses_another_models(tiny, tokenizer):
    tree = [["a", "b"], "c"]

    def build(seed, tasks=TASKS, tree=tree):
        return hf.HiProModel(tiny, tasks, tree, n_ctx=2, combine="mean", tokenizer=tokenizer, seed=seed,
                             path_weights="learned")

    src = build(1)
    state = src.state_dict()
    learned = ["contexts.root", "contexts.root/0", "contexts.task/a", "contexts.task/b", "contexts.task/c",
               "path_weight_logits.path/a", "path_weight_logits.path/b", "path_weight_logits.path/c"]
    assert sorted(state) == sorted(learned + ["layout"])
    assert all(torch.is_tensor(v) for v in state.values())  # safetensors can hold it
    learned_values = [state[k] for k in learned]
    with torch.no_grad():
        want = src.text_features()
    for assign in (False, True):  # assign=True swaps the parameters: the forward must read the new ones
        model = build(2)
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=assign)
        assert all(p is q for p, q in zip(model.learnable().values(), model.parameters()))
        with torch.no_grad():
            got = model.text_features()
        for t in TASKS:
            torch.testing.assert_close(got[t], want[t], rtol=0, atol=0)
    # the positional keys of hipro_fast before named keys still load: by position, said
    legacy = build(2)
    with pytest.warns(UserWarning, match="loaded by position, its node names cannot be checked"):
        legacy.load_state_dict({f"_params.{i}": v.clone() for i, v in enumerate(learned_values)})
    for n, p in legacy.learnable().items():
        assert torch.equal(p.detach(), src.learnable()[n].detach()), n
    # ... and with their names (the layout of 11f2d9f), by name
    named = build(2)
    names = list(src.learnable())
    named.load_state_dict({**{f"_params.{i}": v.clone() for i, v in enumerate(learned_values)},
                           "_extra_state": {"learnable": [[n, list(src.learnable()[n].shape)] for n in names]}})
    for n, p in named.learnable().items():
        assert torch.equal(p.detach(), src.learnable()[n].detach()), n
    # another tree with the same node ids and shapes (internal ids are positional): refused, nothing loaded
    for options in ({"path_weights": "uniform"}, {"combine": "concat", "path_weights": "uniform"}):
        one = hf.HiProModel(tiny, TASKS, tree, n_ctx=2, tokenizer=tokenizer, seed=1, **options)
        other = hf.HiProModel(tiny, TASKS, [["a", "c"], "b"], n_ctx=2, tokenizer=tokenizer, seed=2, **options)
        assert sorted(k for k in one.state_dict() if k != "layout") == sorted(k for k in other.state_dict() if k != "layout")
        before = {n: p.detach().clone() for n, p in other.learnable().items()}
        with pytest.raises(InvalidInputError, match=r"a model with another tree: \[\['a', 'b'\], 'c'\]"):
            other.load_state_dict(one.state_dict())
        for n, p in other.learnable().items():
            assert torch.equal(p.detach(), before[n]), n
    renamed = build(2, tasks={"a": TASKS["a"], "b": TASKS["b"], "d": TASKS["c"]}, tree=[["a", "b"], "d"])
    with pytest.raises(InvalidInputError, match=r"another tree: \[\['a', 'b'\], 'c'\]"):
        renamed.load_state_dict(state)
    with pytest.raises(InvalidInputError, match="it has 'contexts.task/c', which this model does not"):
        renamed.load_state_dict({k: v for k, v in state.items() if k != "layout"}, strict=False)
    # inside a parent module the keys carry its prefix; a parent state without HiPro keys is torch's to judge
    parent_src, parent_dst = torch.nn.ModuleDict({"h": src}), torch.nn.ModuleDict({"h": build(3)})
    parent_dst.load_state_dict(parent_src.state_dict())
    torch.testing.assert_close(parent_dst["h"].text_features()["a"], want["a"], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        parent_dst.load_state_dict({})
    assert sorted(parent_dst.load_state_dict({}, strict=False).missing_keys) == sorted("h." + k for k in state)
    # a "." in a task name cannot be a module path separator: escaped in the key, reversibly
    dotted = {"v1.0": TASKS["a"], "100%": TASKS["b"]}
    d1, d2 = build(1, tasks=dotted, tree=list(dotted)), build(2, tasks=dotted, tree=list(dotted))
    assert "contexts.task/v1%2E0" in d1.state_dict() and "path_weight_logits.path/100%25" in d1.state_dict()
    d2.load_state_dict(d1.state_dict())
    assert all(torch.equal(d2.learnable()[n], p) for n, p in d1.learnable().items())
    # a hand-built tree may name a node like a ParameterDict attribute
    from hipro_fast.method.tree import TreeNode

    nodes = {"root": TreeNode("root", None, ["update", "_keys"]), "update": TreeNode("update", "root", ["task/a"]),
             "_keys": TreeNode("_keys", "root", ["task/b", "task/c"])}
    nodes.update({f"task/{t}": TreeNode(f"task/{t}", p, task=t) for t, p in
                  (("a", "update"), ("b", "_keys"), ("c", "_keys"))})
    odd = hf.HiProModel(tiny, TASKS, hf.TaskTree(nodes), n_ctx=1, tokenizer=tokenizer)
    odd.eval()
    twin = hf.HiProModel(tiny, TASKS, hf.TaskTree(nodes), n_ctx=1, tokenizer=tokenizer, seed=4)
    twin.load_state_dict(odd.state_dict())
    assert torch.equal(twin.ctx["update"], odd.ctx["update"]) and torch.equal(twin.ctx["_keys"], odd.ctx["_keys"])


def test_a_state_of_another_combination_is_refused_and_older_layouts_still_load(tiny, tokenizer):
    from hipro_fast.method.model import json_tensor

    def build(combine, seed):
        return hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=2, combine=combine, tokenizer=tokenizer,
                             seed=seed, path_weights="uniform")

    concat, mean = build("concat", 1), build("mean", 2)
    assert sorted(concat.state_dict()) == sorted(mean.state_dict())  # same keys and shapes: only layout tells
    before = {n: p.detach().clone() for n, p in mean.learnable().items()}
    with pytest.raises(InvalidInputError, match="a model with combine='concat', this model's is 'mean'"):
        mean.load_state_dict(concat.state_dict())
    assert all(torch.equal(p.detach(), before[n]) for n, p in mean.learnable().items())  # nothing loaded
    # a state from before the combination was recorded (layout = the tree alone) loads, checked by tree
    old = {**concat.state_dict(), "layout": json_tensor([["a", "b"], "c"])}
    twin = build("concat", 3)
    twin.load_state_dict(old)
    assert all(torch.equal(twin.learnable()[n], p) for n, p in concat.learnable().items())
    with pytest.raises(InvalidInputError, match="another tree"):
        twin.load_state_dict({**old, "layout": json_tensor([["a", "c"], "b"])})


def test_the_forward_reads_the_registered_parameters_as_the_module_holds_them(tiny, tokenizer):
    """functional_call's swapped tensors and parametrizations reach the forward
    (it looks the contexts up in the ParameterDicts at each call, instead of
    reading tensors it kept aside, which would make them silently no-ops);
    torch.func.grad through the fused ops is refused by name, not zeros."""
    from torch.func import functional_call, grad
    from torch.nn.utils import parametrize

    from hipro_fast.errors import UnsupportedAutogradError

    model = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=2, tokenizer=tokenizer, path_weights="learned")
    img = F.normalize(torch.randn(4, 24, generator=torch.Generator().manual_seed(0)), dim=-1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    swapped = {k: v + 0.5 for k, v in params.items()}
    twin = copy.deepcopy(model)  # the reference: the swapped values loaded for real
    with torch.no_grad():
        before = model.logits("a", img)
        for k, p in twin.named_parameters():
            p.copy_(swapped[k])
        want = twin.logits("a", img)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.logits("a", x)

    wrapped = Logits(model)
    with torch.no_grad():
        got = functional_call(wrapped, {"m." + k: v for k, v in swapped.items()}, (img,))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, before)
        torch.testing.assert_close(model.logits("a", img), before, rtol=0, atol=0)  # the model itself unchanged

    class Zero(torch.nn.Module):
        def forward(self, t):
            return torch.zeros_like(t)

    parametrize.register_parametrization(model.contexts, "root", Zero())
    try:
        with torch.no_grad():
            zeroed = model.logits("a", img)
        assert torch.count_nonzero(model.ctx["root"]) == 0 and not torch.equal(zeroed, before)
    finally:
        parametrize.remove_parametrizations(model.contexts, "root", leave_parametrized=False)
    torch.testing.assert_close(model.logits("a", img).detach(), before, rtol=0, atol=0)

    if hf.build_info()["cpu"]:
        with pytest.raises(UnsupportedAutogradError, match="torch.func.grad"):
            grad(lambda p: functional_call(wrapped, p, (img,)).logsumexp(1).sum())(
                {"m." + k: v for k, v in params.items()})


def test_a_model_pickled_before_the_contexts_were_looked_up_by_name_unpickles(tiny, tokenizer):
    import pickle

    model = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=2, tokenizer=tokenizer, path_weights="learned")
    state = model.__getstate__().copy()
    # what such a pickle held: the tensors by node and task in plain dicts, no name lists
    nodes, tasks = state.pop("_context_nodes"), state.pop("_path_weight_tasks")
    state["ctx"], state["path_logits"] = dict(model.ctx), dict(model.path_logits)
    old = hf.HiProModel.__new__(hf.HiProModel)
    old.__setstate__(state)
    assert list(old.ctx) == nodes and list(old.path_logits) == tasks and "ctx" not in old.__dict__
    img = F.normalize(torch.randn(2, 24), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(old.logits("b", img), model.logits("b", img), rtol=0, atol=0)
        again = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(again.logits("b", img), model.logits("b", img), rtol=0, atol=0)


def test_a_conversion_that_replaces_the_parameters_moves_the_forward_too(tiny, tokenizer):
    own = copy.deepcopy(tiny)
    model = hf.HiProModel(own, TASKS, [["a", "b"], "c"], n_ctx=2, tokenizer=tokenizer)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert all(p is q for p, q in zip(model.learnable().values(), model.parameters()))
    assert all(p.dtype == torch.float64 for p in model.ctx.values())


def test_a_float64_model_scores_in_float64(tiny, tokenizer):
    own = copy.deepcopy(tiny)  # .double() converts the tower it is given, shared by the module's tests
    model = hf.HiProModel(own, TASKS, [["a", "b"], "c"], n_ctx=2, tokenizer=tokenizer).double()
    img = F.normalize(torch.randn(3, 24, dtype=torch.float64), dim=-1)
    logits = model.logits("b", img)
    assert logits.dtype == torch.float64 and logits.shape == (3, 3)
    with torch.no_grad():
        feats = model.text_features()["b"]
    torch.testing.assert_close(logits, model.logit_scale.double() * img @ feats.t(), rtol=1e-6, atol=0)
    acc = hf.evaluate(model, {"b": (img, torch.tensor([0, 1, 2]))})
    assert 0.0 <= acc["b"] <= 1.0


def _context_by_content(model):
    """node context keyed by what the node stands for: (leaf?, its tasks)."""
    return {(model.tree.nodes[n].task is not None, tuple(sorted(model.tree.tasks_under(n)))): p.detach()
            for n, p in model.ctx.items()}


def test_the_order_of_tasks_and_groups_does_not_change_the_model(tiny, tokenizer):
    """The same tasks, listed and grouped in another order, start from the same
    contexts node by node and give the same features task by task."""
    a = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=3, tokenizer=tokenizer, seed=5)
    swapped = {t: TASKS[t] for t in ["c", "b", "a"]}
    b = hf.HiProModel(tiny, swapped, ["c", ["b", "a"]], n_ctx=3, tokenizer=tokenizer, seed=5)
    assert a.tree.tasks != b.tree.tasks  # really another order
    ctx_a, ctx_b = _context_by_content(a), _context_by_content(b)
    assert ctx_a.keys() == ctx_b.keys()
    for key in ctx_a:
        torch.testing.assert_close(ctx_b[key], ctx_a[key], atol=0, rtol=0)
    fa, fb = a.text_features(), b.text_features()
    for t in TASKS:
        torch.testing.assert_close(fb[t], fa[t], atol=1e-6, rtol=0)
    # a task's leaf starts alike in another tree (CoOp per task's flat one) ...
    flat = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx=3, tokenizer=tokenizer, seed=5)
    for t in TASKS:
        torch.testing.assert_close(flat.ctx[f"task/{t}"].detach(), a.ctx[f"task/{t}"].detach(), atol=0, rtol=0)
    # a group holding every task (a user's tree) does not start as a copy of the root
    nested = hf.HiProModel(tiny, TASKS, [list(TASKS)], n_ctx=3, tokenizer=tokenizer, seed=5)
    assert set(nested.ctx) == {"root", "root/0", *(f"task/{t}" for t in TASKS)}
    assert not torch.equal(nested.ctx["root"], nested.ctx["root/0"])
    torch.testing.assert_close(nested.ctx["root"].detach(), a.ctx["root"].detach(), atol=0, rtol=0)
    # ... while nodes, and seeds, differ from each other
    c = hf.HiProModel(tiny, TASKS, [["a", "b"], "c"], n_ctx=3, tokenizer=tokenizer, seed=6)
    assert not torch.equal(c.ctx["task/a"], a.ctx["task/a"])
    values = list(ctx_a.values())
    assert all(not torch.equal(x, y) for i, x in enumerate(values) for y in values[i + 1:])
