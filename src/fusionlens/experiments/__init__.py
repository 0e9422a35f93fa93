"""fusionlens.experiments: the papers' reproductions on the built-in world, apart from the library.

The harnesses here import the library (``decompose``, ``evaluate``, ``prune``, ``train``) and nothing in the library
imports them; only the command line (``fusionlens reproduce``, ``fusionlens prune``, ``fusionlens kitti``), the demo
and ``benchmarks/`` do (``tests/test_layering.py`` holds that).

* :mod:`~fusionlens.experiments.lmd` and :mod:`~fusionlens.experiments.lmd_report` -- the LMD paper's tables
  (``fusionlens reproduce lmd``);
* :mod:`~fusionlens.experiments.altermoma` and :mod:`~fusionlens.experiments.altermoma_report` -- AlterMOMA's
  pruning tables (``fusionlens reproduce altermoma``);
* :mod:`~fusionlens.experiments.kitti` -- AlterMOMA's KITTI tables on the world's KITTI export;
* :mod:`~fusionlens.experiments.cells` -- the one cell store: a JSON file per measurement, never recomputed;
* :mod:`~fusionlens.experiments.reference_models` -- the one cache of reference models (trained once, continued
  when cut off, refused when made with other settings); :mod:`~fusionlens.experiments.reference` -- their loss,
  example inputs and checkpoints.
"""
