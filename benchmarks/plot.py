"""Plot of ratio-to-floor per problem and provider: one panel per family and mode."""

from __future__ import annotations

from pathlib import Path


def _problem_label(row: dict) -> str:
    return f"{row['M']}x{row['K']}x{row['N']}\nr{row['r']} {row['dtype']}"


def plot_ratios(rows: list[dict], path: Path, title: str) -> Path | None:
    """Grouped bars of ``ratio_to_floor`` (the floor's 1.0 drawn as a line); returns the
    PNG's path, or None when no row has a ratio or matplotlib is not installed (said)."""
    try:
        import matplotlib
    except ImportError:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib), no {path}")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.get("ratio_to_floor") and row["provider"] != "floor"]
    panels = list(dict.fromkeys((row["family"], row["mode"]) for row in rows))
    if not panels:
        return None
    colors = {
        name: f"C{index % 10}"
        for index, name in enumerate(dict.fromkeys(row["provider"] for row in rows))
    }
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for axis, (family, mode) in zip(axes[:, 0], panels, strict=True):
        panel = [row for row in rows if (row["family"], row["mode"]) == (family, mode)]
        labels = list(dict.fromkeys(_problem_label(row) for row in panel))
        names = list(dict.fromkeys(row["provider"] for row in panel))
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            ratio = {
                _problem_label(row): float(row["ratio_to_floor"])
                for row in panel
                if row["provider"] == name
            }
            positions = [
                i + (index - (len(names) - 1) / 2) * width
                for i, label in enumerate(labels)
                if label in ratio
            ]
            axis.bar(
                positions,
                [ratio[label] for label in labels if label in ratio],
                width,
                label=name,
                color=colors[name],
            )
        axis.axhline(1.0, color="black", linewidth=0.8)
        if max(float(row["ratio_to_floor"]) for row in panel) > 10:
            axis.set_yscale("log")  # interpreted Triton on CPU runs 1000x the floor
        axis.set_xticks(range(len(labels)), labels, fontsize=7)
        axis.set_ylabel("time / floor time")
        axis.set_title(f"{family}: {mode}", fontsize=9)
        axis.legend(fontsize=7, ncol=4)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
