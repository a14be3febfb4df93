"""Plot a `kvrelay bench engine --json` report: decode tok/s against batch, graphs vs eager (and HF).

python scripts/plot_engine_bench.py docs/bench/engine_h200.json docs/bench/engine_h200.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> None:
    report = json.loads(Path(src).read_text())
    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [r for r in m["rows"] if "skipped" not in r]
        for ctx, style in zip(sorted({r["context"] for r in rows}), ("-", "--", ":"), strict=False):
            pts = sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["batch"])
            b = [r["batch"] for r in pts]
            ax.plot(
                b,
                [r["graph_tok_s"] for r in pts],
                "o" + style,
                color="C0",
                label=f"kvrelay graphs, ctx {ctx}",
            )
            ax.plot(
                b, [r["eager_tok_s"] for r in pts], "s" + style, color="C1", label=f"kvrelay eager, ctx {ctx}"
            )
            hf = [(r["batch"], r["batch"] / (r["hf_ms"] / 1e3)) for r in pts if "hf_ms" in r]
            if hf:
                ax.plot(*zip(*hf, strict=True), "^" + style, color="C2", label=f"HF static cache, ctx {ctx}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens / s")
        ax.set_title(f"{m['model']} on {report['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
