"""timm's model API on vitkern.ViT and vitkern's models in timm's registry, checked
side by side with timm's VisionTransformer through the timm library functions that
timm's train.py / validate.py / benchmark.py call."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from conftest import SUBPROCESS_CWD, assert_close_rel, subprocess_env  # noqa: E402

import vitkern  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def registered():
    return vitkern.register_timm_models()


def pair(gen: torch.Generator | None = None, **kw):
    """A timm VisionTransformer (from timm's factory) and a vitkern.ViT with the same weights (eval mode)."""
    t = timm.create_model("vit_small_patch16_224", **{**TINY, "num_classes": 10, **kw}).eval()
    if gen is not None:  # non-trivial tokens and biases
        with torch.no_grad():
            for p in t.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return t, vitkern.ViT.from_timm(t).eval()


def sp_vit(**kw):
    m = vitkern.ViT(**{**TINY, "depth": 3, "num_classes": 10, "spatial_prior": True, "sp_layers": 2, **kw})
    with torch.no_grad():  # a non-trivial spatial prior (w2 = 0 at init is plain attention)
        for blk in m.blocks[:2]:
            blk.attn.spatial_relation.w2.normal_(std=0.3)
    return m.eval()


def assert_same(a, b, what):
    """Nested lists/tuples/dicts of tensors, compared leaf by leaf."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: {len(a)} items vs {len(b)}"
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same(u, v, f"{what}[{i}]")
    else:
        assert_close_rel(a, b, TOL, what)


# ----------------------------------------------------------------------------- pretrained_cfg
def test_pretrained_cfg_and_data_config_match_timm_vit():
    from timm.data import create_transform, resolve_data_config

    for m in (vitkern.ViT(**TINY), sp_vit()):
        cfg = m.pretrained_cfg
        assert m.default_cfg is cfg
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
        assert (cfg["crop_pct"], cfg["interpolation"]) == (0.9, "bicubic")
        assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == m.num_classes
        assert (cfg["classifier"], cfg["first_conv"]) == ("head", "patch_embed.proj")
        m.get_submodule(cfg["first_conv"]), m.get_submodule(cfg["classifier"])  # names exist
    # What validate.py / train.py build from it: identical to timm's ViT.
    ours = timm.create_model("vitkern_vit_small_patch16_224", **TINY)
    theirs = timm.create_model("vit_small_patch16_224", **TINY)
    dc = resolve_data_config({}, model=ours)
    assert dc == resolve_data_config({}, model=theirs)
    assert dc["mean"] == (0.5, 0.5, 0.5) and dc["crop_pct"] == 0.9 and dc["interpolation"] == "bicubic"
    assert repr(create_transform(**dc)) == repr(create_transform(**resolve_data_config({}, model=theirs)))
    assert resolve_data_config({}, model=vitkern.ViT(**TINY))["input_size"] == (3, 32, 32)
    # Converted timm weights keep their preprocessing; named models carry their name.
    assert vitkern.ViT.from_timm(theirs).pretrained_cfg == theirs.pretrained_cfg
    assert vitkern.create_model("vit_tiny_patch16_224", **TINY).pretrained_cfg["architecture"] == "vit_tiny_patch16_224"


# ----------------------------------------------------------------------------- grad checkpointing
@pytest.mark.parametrize("kind", ["vit", "sp_vit"])
def test_grad_checkpointing_same_gradients_and_recomputes(kind):
    kw = dict(drop_path_rate=0.2, reg_tokens=1)
    m = (sp_vit(**kw) if kind == "sp_vit" else vitkern.ViT(**TINY, num_classes=10, **kw)).train()
    x = torch.randn(3, 3, 32, 32)
    calls = []
    m.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads():
        torch.manual_seed(0)  # same drop-path draws
        m.zero_grad()
        m(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads()
    assert len(calls) == 1
    calls.clear()
    m.set_grad_checkpointing()
    assert m.grad_checkpointing
    got = grads()
    assert len(calls) == 2, "checkpointing recomputes the block in the backward"
    for n in ref:
        assert_close_rel(got[n], ref[n], 1e-6, n)
    m.set_grad_checkpointing(False)
    calls.clear()
    grads()
    assert len(calls) == 1


# ----------------------------------------------------------------------------- layer decay
def _groups(model, **kw):
    from timm.optim import create_optimizer_v2

    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, **kw)
    return sorted(
        (round(g.get("lr_scale", 1.0), 12), g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
        for g in opt.param_groups
    )


def test_layer_decay_groups_match_timm_vit():
    t, m = pair(depth=3, reg_tokens=1)
    ours, theirs = _groups(m, layer_decay=0.65), _groups(t, layer_decay=0.65)
    assert ours == theirs
    assert len({g[0] for g in ours}) == 3 + 2  # stem, one per block, norm + head
    assert _groups(m) == _groups(t)  # without layer decay: decay / no-decay split


def test_layer_decay_groups_sp_vit():
    m = sp_vit()
    groups = _groups(m, layer_decay=0.65)
    scale_of = {n: g[0] for g in groups for n in g[2]}
    assert len(set(scale_of.values())) == 3 + 2
    for i in range(2):  # the relation MLP decays with its block
        assert scale_of[f"blocks.{i}.attn.spatial_relation.w1"] == scale_of[f"blocks.{i}.attn.qkv.weight"]
    no_decay = {n for g in groups if g[1] == 0.0 for n in g[2]}
    assert {"blocks.0.attn.spatial_relation.b1", "blocks.0.attn.spatial_relation.b2", "pos_embed"} <= no_decay
    assert "blocks.0.attn.spatial_relation.w1" not in no_decay


# ----------------------------------------------------------------------------- classifier
def test_get_and_reset_classifier_match_timm(gen):
    t, m = pair(gen)
    assert m.get_classifier() is m.head
    x = torch.randn(2, 3, 32, 32, generator=gen)
    for args in [(0,), (0, "avg"), (0, "")]:
        t.reset_classifier(*args)
        m.reset_classifier(*args)
        with torch.no_grad():
            assert_close_rel(m(x), t(x), TOL, f"reset_classifier{args}")
    m.reset_classifier(7, "token")
    assert m.get_classifier().weight.shape == (7, 64) and m(x).shape == (2, 7)
    assert m.num_classes == 7 and m.config["num_classes"] == 7  # save_model/load_model rebuild it
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, "map")
    with pytest.raises(ValueError, match="num_classes"):
        m.reset_classifier(-1)


# ----------------------------------------------------------------------------- intermediates
FI_CASES = [
    dict(),
    dict(indices=1),
    dict(indices=[0, -1], norm=True),
    dict(return_prefix_tokens=True, output_fmt="NLC"),
    dict(indices=[0], stop_early=True, intermediates_only=True),
    dict(output_dict=True, return_prefix_tokens=True, norm=True),
    dict(output_dict=True, intermediates_only=True),
]


@pytest.mark.parametrize("kw", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_forward_intermediates_match_timm(kw, gen):
    t, m = pair(gen, depth=3, **kw)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    assert m.feature_info == t.feature_info
    with torch.no_grad():
        for case in FI_CASES:
            assert_same(m.forward_intermediates(x, **case), t.forward_intermediates(x, **case), f"{kw} {case}")
        for case in [dict(), dict(n=2, reshape=True, norm=True, return_prefix_tokens=True), dict(n=[0, 2])]:
            assert_same(m.get_intermediate_layers(x, **case), t.get_intermediate_layers(x, **case), f"gil {case}")
    with pytest.raises(ValueError, match="indices"):
        m.forward_intermediates(x, indices=[5])
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_matches_timm(gen):
    t, m = pair(gen, depth=3)
    assert m.prune_intermediate_layers([0, 1]) == t.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(m.blocks) == 2 and m.feature_info == t.feature_info[:2]
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert_same(m.forward_intermediates(x), t.forward_intermediates(x), "pruned")
        assert_close_rel(m(x), t(x), TOL, "pruned forward (head removed)")
    # The recorded constructor arguments describe the pruned model.
    rebuilt = vitkern.ViT(**m.config)
    rebuilt.load_state_dict(m.state_dict())


def test_features_only_backbone_matches_timm(gen):
    kw = dict(TINY, depth=3, features_only=True, out_indices=(0, 2))
    t = timm.create_model("vit_small_patch16_224", **kw).eval()
    m = timm.create_model("vitkern_vit_small_patch16_224", **kw).eval()
    m.load_state_dict(t.state_dict())
    assert m.feature_info.channels() == t.feature_info.channels() == [64, 64]
    assert m.feature_info.reduction() == t.feature_info.reduction() == [8, 8]
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert_same(m(x), t(x), "features_only")


def test_sp_vit_intermediates_late_class_token(gen):
    m = sp_vit(reg_tokens=1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC", norm=True)
        assert_close_rel(final, feats, 1e-6, "final features")
        # The last block runs on [cls, reg, patches]: its normed output is the final features.
        assert_close_rel(inter[2][0], feats[:, 2:], 1e-6, "patches after the plain block")
        assert_close_rel(inter[2][1], feats[:, :2], 1e-6, "prefix after the plain block")
        # The SP blocks see the patches alone; their prefix is the tokens yet to be inserted.
        _, raw = m.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC")
        late = torch.cat([m.cls_token, m.reg_token], dim=1).expand(2, -1, -1)
        for i in range(2):
            assert raw[i][0].shape == (2, 16, 64)
            assert torch.equal(raw[i][1], late)
        # NCHW is the same tokens laid out on the grid; stop_early gives the same blocks.
        nchw = m.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        for i in range(2):
            assert torch.equal(nchw[i], raw[i][0].reshape(2, 4, 4, 64).permute(0, 3, 1, 2))
        assert_same(m.get_intermediate_layers(x, n=[1]), [raw[1][0]], "get_intermediate_layers")
    # Pruned inside the SP blocks: the class token is inserted after the last block.
    assert m.prune_intermediate_layers([1], prune_head=False) == [1]
    assert m(x).shape == (2, 10)
    with torch.no_grad():
        assert_close_rel(m.forward_features(x)[:, 2:], m.norm(raw[1][0]), 1e-6, "pruned SP-ViT")


# ----------------------------------------------------------------------------- set_input_size
def test_set_input_size_matches_timm(gen):
    t, m = pair(gen, reg_tokens=1)
    x = torch.randn(2, 3, 48, 64, generator=gen)
    t.set_input_size((48, 64))
    m.set_input_size((48, 64))
    with torch.no_grad():
        assert_close_rel(m(x), t(x), TOL, "img_size 48x64")
    t.set_input_size(patch_size=(16, 16))
    m.set_input_size(patch_size=16)
    with torch.no_grad():
        assert_close_rel(m(x), t(x), TOL, "patch 16")
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(1, 3, 32, 32))
    assert m.config["img_size"] == (48, 64) and m.config["patch_size"] == (16, 16)
    with pytest.raises(ValueError, match="divisible"):
        m.set_input_size(50)
    # dynamic_img_size: intermediates on the input's own grid.
    t, m = pair(gen, dynamic_img_size=True)
    x = torch.randn(2, 3, 40, 56, generator=gen)
    with torch.no_grad():
        assert_same(m.forward_intermediates(x), t.forward_intermediates(x), "dynamic_img_size 40x56")
    # SP-ViT: the relation MLP works on any grid, only the position embedding is resampled.
    sp = sp_vit()
    sp.set_input_size(48)
    assert sp.pos_embed.shape == (1, 36, 64) and sp(torch.randn(1, 3, 48, 48)).shape == (1, 10)


# ----------------------------------------------------------------------------- registry
def test_registration_is_explicit_and_covers_every_model(registered):
    # A fresh process: import vitkern alone neither imports timm nor registers anything.
    # Nor transformers or safetensors: vitkern.interop imports them inside the functions that need them.
    code = (
        "import sys, vitkern\n"
        "heavy = [m for m in ('timm', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, f'import vitkern imported {heavy}'\nprint('OK')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SUBPROCESS_CWD,
        env=subprocess_env(),
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert registered == vitkern.register_timm_models()  # idempotent
    assert sorted(timm.list_models("vitkern_*")) == sorted(registered)
    assert sorted(registered) == sorted("vitkern_" + n for n in vitkern.list_models())


@pytest.mark.parametrize("name", vitkern.list_models())
def test_timm_create_model_every_name(name):
    small = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    m = timm.create_model("vitkern_" + name, num_classes=5, **small)
    ref = vitkern.create_model(name, num_classes=5, **small)
    assert isinstance(m, vitkern.ViT) and m.pretrained_cfg["architecture"] == "vitkern_" + name
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert m.spatial_prior == name.startswith("sp_") and m.sp_layers == (1 if m.spatial_prior else 0)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_pretrained_loading_path(tmp_path, gen):
    from timm.models import build_model_with_cfg, load_pretrained

    t, _ = pair(gen)
    path = tmp_path / "vit_tiny.pth"
    torch.save(t.state_dict(), path)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    overlay = dict(file=str(path), num_classes=10)
    # Same classes: every weight loads, the logits are timm's.
    m = timm.create_model("vitkern_vit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    assert m.num_classes == 10
    with torch.no_grad():
        assert_close_rel(m.eval()(x), t(x), TOL, "pretrained logits")
    # Other classes: the head is dropped and re-initialised, the rest loads — as for timm's ViT.
    kw = dict(pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **TINY)
    ours = timm.create_model("vitkern_vit_small_patch16_224", **kw).eval()
    theirs = timm.create_model("vit_small_patch16_224", **kw).eval()
    assert ours.head.weight.shape == theirs.head.weight.shape == (3, 64)
    with torch.no_grad():
        assert_close_rel(ours.forward_features(x), theirs.forward_features(x), TOL, "re-headed features")
    # train.py --pretrained-path: num_classes=-1 forces the head adaptation.
    ft = timm.create_model(
        "vitkern_vit_small_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=-1),
        num_classes=10,
        **TINY,
    )
    assert not torch.equal(ft.head.weight, t.head.weight)
    assert torch.equal(ft.blocks[1].mlp.fc2.weight, t.blocks[1].mlp.fc2.weight)
    # The library functions themselves, and a checkpoint at another image size (pos_embed resampled).
    m2 = build_model_with_cfg(
        vitkern.ViT, "vitkern_vit_small_patch16_224", False, **{**TINY, "img_size": 48, "num_classes": 10}
    )
    load_pretrained(m2, pretrained_cfg={**m2.pretrained_cfg, **overlay}, num_classes=10)
    t.set_input_size((48, 48))
    x48 = torch.randn(2, 3, 48, 48, generator=gen)
    with torch.no_grad():
        assert_close_rel(m2.eval()(x48), t(x48), TOL, "load_pretrained at 48 px")


def test_load_checkpoint_of_train_py(tmp_path, gen):
    from timm.models import load_checkpoint

    sp = sp_vit()
    path = tmp_path / "checkpoint.pth.tar"  # what timm's CheckpointSaver writes
    torch.save({"epoch": 1, "arch": "vitkern_sp_vit_small_patch16_224", "state_dict": sp.state_dict()}, path)
    kw = dict(TINY, depth=3, sp_layers=2, mlp_ratio=4.0, num_classes=10)
    m = timm.create_model("vitkern_sp_vit_small_patch16_224", **kw)
    load_checkpoint(m, str(path))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert_close_rel(m.eval()(x), sp(x), TOL, "load_checkpoint")
        m2 = timm.create_model("vitkern_sp_vit_small_patch16_224", checkpoint_path=str(path), **kw).eval()
        assert_close_rel(m2(x), sp(x), TOL, "create_model(checkpoint_path=)")


def test_distillation_tasks_side_by_side(gen):
    from timm.task import FeatureDistillationTask, LogitDistillationTask

    teacher = timm.create_model("vit_small_patch16_224", **TINY, num_classes=10).eval()
    t, m = pair(gen)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    for cls, extra in [(LogitDistillationTask, dict(temperature=2.0)), (FeatureDistillationTask, {})]:
        losses = []
        for student in (m, t):
            task = cls(student_model=student, teacher_model=teacher, verbose=False, **extra)
            out = task(x, y)
            out["loss"].backward()
            losses.append(out["loss"].detach())
        assert torch.isfinite(losses[0])
        assert_close_rel(losses[0], losses[1], TOL, cls.__name__)
    # A vitkern teacher: its normalisation is read from its pretrained_cfg.
    task = LogitDistillationTask(student_model=t, teacher_model=vitkern.ViT.from_timm(teacher), verbose=False)
    assert task.teacher.mean_kd.flatten().tolist() == [0.5, 0.5, 0.5]
    assert torch.isfinite(task(x, y)["loss"])


def test_timm_run_runs_a_script_with_models_registered(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, timm\n"
        "m = timm.create_model(sys.argv[1], img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)\n"
        "print('RAN', type(m).__module__, __name__, sys.argv[1:])\n"
    )
    cmd = [sys.executable, "-m", "vitkern.timm_run", str(script), "vitkern_vit_tiny_patch16_224"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=SUBPROCESS_CWD, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RAN vitkern.models.vit __main__ ['vitkern_vit_tiny_patch16_224']" in res.stdout
    from vitkern import timm_run

    with pytest.raises(SystemExit, match="no such script"):
        timm_run.main([str(tmp_path / "missing.py")])


def test_save_and_load_after_reset_classifier_and_set_input_size(tmp_path, gen):
    pytest.importorskip("safetensors")
    m = sp_vit()
    m.reset_classifier(3, "avg")
    m.set_input_size((48, 64))
    path = tmp_path / "m.safetensors"
    vitkern.save_model(m, path)
    loaded = vitkern.load_model(path).eval()
    assert (loaded.num_classes, loaded.global_pool, loaded.patch_embed.img_size) == (3, "avg", (48, 64))
    x = torch.randn(2, 3, 48, 64, generator=gen)
    with torch.no_grad():
        assert_close_rel(loaded(x), m(x), 1e-6, "round trip")
