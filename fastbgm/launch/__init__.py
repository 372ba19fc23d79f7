"""Scheduling an experiment's runs: on Slurm through submitit, or on this machine.
It only schedules: what a run is comes from :mod:`fastbgm.experiment`."""
