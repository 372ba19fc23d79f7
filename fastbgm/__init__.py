"""fastbgm: a fast, faithful engine for "Bad Global Minima Exist and SGD Can Reach Them".

Data flows one way: dataset files -> ``fastbgm.data`` (loader) -> ``fastbgm.trainer``
-> ``fastbgm.experiment`` -> ``fastbgm.launch`` -> ``fastbgm.report``.
Importing the package is cheap: nothing heavy (ffcv, submitit) is imported here, and
the launcher and what Slurm runs beside the trainers (an allocation's driver, a job's
batch-script teardown) import no torch unless they ask the trainer's rules about GPUs:
``fastbgm.data``, ``fastbgm.models`` and ``fastbgm.trainer`` import what a name needs
when it is first used.
"""

__version__ = "0.1.0"
