"""fusionlens.experiments: the papers' reproductions on the built-in world, apart from the library.

The harnesses here import the library (``decompose``, ``evaluate``, ``prune``, ``train``) and nothing in the library
imports them; only the command line (``fusionlens reproduce``, ``fusionlens prune``) and the demo do.

* :mod:`~fusionlens.experiments.lmd` -- the LMD paper's tables (``fusionlens reproduce lmd``);
* :mod:`~fusionlens.experiments.altermoma` and :mod:`~fusionlens.experiments.altermoma_report` -- AlterMOMA's
  pruning tables (``fusionlens reproduce altermoma``);
* :mod:`~fusionlens.experiments.reference_models` -- the reference models both prune or explain, made once and
  cached; :mod:`~fusionlens.experiments.reference` -- their loss, example inputs and checkpoints.
"""
