"""The chart of a tools/bench.py report: per model, each engine's median latency relative to
onnxruntime's at every batch (log scale, 1 = onnxruntime), so the README's tables can be seen at once."""

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on build machines
import matplotlib.pyplot as plt  # noqa: E402


def write_chart(report: dict, path: Path) -> Path:
    models = report["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(max(6, 5 * len(models)), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        batches = [result["batch"] for result in model["batches"]]
        engines = [name for name in model["batches"][0]["ratio_to_onnxruntime"]]
        width = 0.8 / max(1, len(engines))
        for index, engine in enumerate(engines):
            ratios = [result["ratio_to_onnxruntime"][engine] for result in model["batches"]]
            positions = [b + (index - (len(engines) - 1) / 2) * width for b in range(len(batches))]
            axis.bar(positions, ratios, width, label=engine)
        axis.axhline(1.0, color="black", linewidth=1)
        axis.set_yscale("log")
        for formatter in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
            formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        axis.set_xticks(range(len(batches)), [str(b) for b in batches])
        axis.set_xlabel("batch")
        axis.set_ylabel("median latency / onnxruntime's")
        axis.set_title(model["model"]["name"])
        axis.legend(fontsize="small")
    figure.suptitle(f"reccc vs onnxruntime on {report['machine']['cpu_model']} ({report['threads']['onnxruntime_intra_op']} threads)", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
