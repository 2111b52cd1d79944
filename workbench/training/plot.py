"""Draw a training run log (run-log.json): loss curve with held-out loss, and expert load balance per MoE layer."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run_log(log_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on build machines
    import matplotlib.pyplot as plt

    try:
        log = json.loads(Path(log_path).read_text())
        records, evals = log["records"], log["evals"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{log_path}: not a readable training run log ({e})") from None
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_bal) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_loss.plot(steps, [r["loss"] for r in records], label="train (mean over each logged window)", lw=1)
    ax_loss.plot([e["step"] for e in evals], [e["held_out_loss"] for e in evals], "o-", ms=3,
                 label="held out")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("next-token loss (nats)")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    for layer in records[0]["max_over_mean_load"]:
        ax_bal.plot(steps, [r["max_over_mean_load"][layer] for r in records], lw=1, label=f"layer {layer}")
    ax_bal.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_bal.set_xlabel("step")
    ax_bal.set_ylabel("busiest expert load / mean load")
    ax_bal.set_title("routed-expert load balance per MoE layer")
    ax_bal.set_yscale("log")
    ax_bal.grid(alpha=0.3)
    ax_bal.legend()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m workbench.training.plot", description=__doc__)
    p.add_argument("run_log", type=Path)
    p.add_argument("png", type=Path)
    args = p.parse_args(argv)
    print(plot_run_log(args.run_log, args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
