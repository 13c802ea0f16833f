"""Analysis of runs: tables and pictures, evaluation of checkpoints, speed, sweeps, tuning.

Dependencies point one way: ``tools`` -> ``analysis`` -> ``engine``; the engine never
imports from here.
"""
