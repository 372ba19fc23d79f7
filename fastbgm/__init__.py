"""fastbgm: a fast, faithful engine for "Bad Global Minima Exist and SGD Can Reach Them".

Data flows one way: dataset files -> ``fastbgm.data`` (loader) -> ``fastbgm.trainer``
-> ``fastbgm.experiment`` -> ``fastbgm.launch`` -> ``fastbgm.report``.
Importing the package is cheap: nothing heavy (ffcv, submitit) is imported here.
"""

__version__ = "0.1.0"
