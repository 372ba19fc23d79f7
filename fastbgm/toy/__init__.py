"""The paper's Figure 1 on a CPU in seconds: ``python -m fastbgm.toy --out DIR``.

``run_toy(ToyConfig(seed=0))`` trains the adversarial init on the 2-D confusion set
and stage 2 from both inits in each mode; ``write_figure`` draws the decision
boundaries; ``toy_summary`` is the JSON beside the figure (see ``experiment``).
"""

from .experiment import ToyConfig, ToyResult, ToyRun, run_toy
from .figure import write_figure
from .summary import seed_statistics, toy_summary

__all__ = ["ToyConfig", "ToyResult", "ToyRun", "run_toy", "write_figure", "seed_statistics", "toy_summary"]
