"""The figures of the paper's experiments, each drawn from a sweep's runs with the claim it tests.

Every figure function takes the report entry of the sweep file (which stages feed it), the
sweep's runs (`selfreplay.experiments.sweep.Run`, summaries loaded) and the folder for the PNG, and returns
a `Figure`: the image, a caption stating the claim with the measured numbers, the table behind
it and a `Finding` (the paper's result, this sweep's, reproduced or not). Each is built from named
parts: the runs it selects, what it computes from them, the plot, and the caption and finding.
One module per experiment: `methods`, `capacity`, `grid`, `learning_rate`, `continual`; `coefficient`
draws c and the replay KL of runs held to a budget (replay.coeff=auto), or returns None where
no run was; `pretraining` draws a single pretraining run; `common` holds what they share.
"""

from selfreplay.experiments.figures.capacity import (
           mix_frontier_figure,
           model_size_figure,
           tokens_per_param_figure,
)
from selfreplay.experiments.figures.coefficient import coefficient_figure
from selfreplay.experiments.figures.common import Figure, Finding, fmt, markdown_table
from selfreplay.experiments.figures.continual import continual_figure
from selfreplay.experiments.figures.grid import grid_figure
from selfreplay.experiments.figures.learning_rate import learning_rate_figure
from selfreplay.experiments.figures.methods import methods_figure
from selfreplay.experiments.figures.pretraining import pretraining_figure

FIGURES = {"methods": methods_figure, "tokens_per_param": tokens_per_param_figure, "model_size": model_size_figure,
           "mix_frontier": mix_frontier_figure, "learning_rate": learning_rate_figure, "continual": continual_figure,
           "replay_coefficient": coefficient_figure, "grid": grid_figure}

__all__ = ["FIGURES", "Figure", "Finding", "fmt", "markdown_table", "pretraining_figure"]
