"""Train a small SP-ViT and a plain ViT of the same size on scikit-learn's bundled
digits (1,797 8x8 grey-scale images, nothing downloaded) and compare them.

    python examples/train_digits.py                 # 3 seeds x 40 epochs, a few minutes on 2 CPU cores
    python examples/train_digits.py --epochs 2 --seeds 0 --out /tmp/digits   # smoke run

Writes to --out (default examples/results/): learning_curves.png (training loss and
test accuracy per epoch, both models, mean over seeds), omega_maps.png (the learned
spatial prior Omega of every SP-SA layer and head, as a (2gh-1) x (2gw-1) map of the
factor each relative offset multiplies the attention logit by), results.json and
results.md (test accuracy per seed, mean and std).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vitkern

MODEL = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero-padded), the standard small-image augmentation."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 512]).argmax(-1) for i in range(0, len(x), 512)])
    model.train()
    return (pred == y).float().mean().item()


def train(kind: str, seed: int, epochs: int, batch: int, progress, lr: float = 2e-3, shift_aug: bool = False) -> dict:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_data(seed)
    sp = dict(spatial_prior=True, sp_layers=MODEL["depth"] - 2, sp_hidden=32) if kind == "sp_vit" else {}
    model = vitkern.ViT(**MODEL, **sp, no_embed_class=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x_tr) + batch - 1) // batch)
    warmup = max(1, steps // 20)  # linear warm-up over 5 % of the steps, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    curve = {"loss": [], "test_acc": []}
    for _epoch in range(epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(perm), batch):
            b = perm[i : i + batch]
            xb = augment(x_tr[b], gen) if shift_aug else x_tr[b]
            loss = F.cross_entropy(model(xb), y_tr[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(b), count + len(b)
            progress.update(1)
        curve["loss"].append(total / count)
        curve["test_acc"].append(accuracy(model, x_te, y_te))
        progress.set_postfix(model=kind, seed=seed, acc=f"{curve['test_acc'][-1]:.3f}")
    omega = None
    if kind == "sp_vit":
        grid = model.patch_embed.grid_size
        omega = [blk.attn.omega(grid).detach().numpy().tolist() for blk in model.blocks[: model.sp_layers]]
    return {"kind": kind, "seed": seed, "test_acc": curve["test_acc"][-1], "curve": curve, "omega": omega}


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, color in (("vit", "tab:blue"), ("sp_vit", "tab:red")):
        rs = [r for r in runs if r["kind"] == kind]
        for key, ax in (("loss", axes[0]), ("test_acc", axes[1])):
            curves = np.array([r["curve"][key] for r in rs])
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), color=color, label=f"{'SP-ViT' if kind == 'sp_vit' else 'ViT'}")
            if len(rs) > 1:
                ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss (label smoothing 0.1)", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean, min-max over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)

    omega = next(r["omega"] for r in runs if r["kind"] == "sp_vit")
    layers, heads = len(omega), len(omega[0])
    fig, axes = plt.subplots(layers, heads, figsize=(2.2 * heads, 2.2 * layers), squeeze=False)
    for li in range(layers):
        for h in range(heads):
            m = np.array(omega[li][h])
            ax = axes[li][h]
            im = ax.imshow(m, cmap="RdBu_r", vmin=min(m.min(), 2 - m.max()), vmax=max(m.max(), 2 - m.min()))
            gh, gw = (m.shape[0] + 1) // 2, (m.shape[1] + 1) // 2
            ax.set_xticks([0, gw - 1, m.shape[1] - 1], [f"{1 - gw}", "0", f"{gw - 1}"])
            ax.set_yticks([0, gh - 1, m.shape[0] - 1], [f"{1 - gh}", "0", f"{gh - 1}"])
            ax.set_title(f"layer {li} head {h}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("learned spatial prior Omega[h, dy, dx] (x: dx, y: dy; 1 = plain attention)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "omega_maps.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--shift-aug", action="store_true", help="random one-pixel shifts (off: they hurt at 8x8 px)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    n_train = len(load_data(0)[1])
    steps = len(args.seeds) * 2 * args.epochs * ((n_train + args.batch - 1) // args.batch)
    start = time.time()
    runs = []
    with tqdm(total=steps, unit="step", desc="digits") as progress:
        for seed in args.seeds:
            for kind in ("vit", "sp_vit"):
                runs.append(train(kind, seed, args.epochs, args.batch, progress, args.lr, args.shift_aug))
    wall = time.time() - start
    summary = {}
    for kind in ("vit", "sp_vit"):
        accs = [r["test_acc"] for r in runs if r["kind"] == kind]
        summary[kind] = {"per_seed": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs))}
    params = {
        k: sum(p.numel() for p in vitkern.ViT(**MODEL, **sp, no_embed_class=True).parameters())
        for k, sp in (("vit", {}), ("sp_vit", dict(spatial_prior=True, sp_layers=MODEL["depth"] - 2)))
    }
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "wall_s": wall,
        "summary": summary,
        "params": params,
        "runs": runs,
        "model": MODEL,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Digits (sklearn, 1,347 train / 450 test images, 8x8 px, patch 2 -> 4x4 grid), {args.epochs} epochs, "
        f"seeds {args.seeds}, {wall:.0f} s on {torch.get_num_threads()} threads",
        "",
        "| model | parameters | test accuracy per seed | mean ± std |",
        "|---|---|---|---|",
    ]
    for kind, name in (("vit", "ViT (depth 4, dim 64, 4 heads)"), ("sp_vit", "SP-ViT (same, 2 SP-SA layers)")):
        s = summary[kind]
        lines.append(
            f"| {name} | {params[kind]:,} | {', '.join(f'{a:.4f}' for a in s['per_seed'])} | "
            f"{s['mean']:.4f} ± {s['std']:.4f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(runs, args.out)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
