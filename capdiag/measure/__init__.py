"""Measure: the shared measurements checks are made of.

Probes of a forward (``probe``: precision, tolerances, activation scale), ablations (``ablation``),
attention capture (``attention``), gradients (``gradients``), BatchNorm statistics (``batchnorm``),
pretrained weights (``pretrained``), the fitted copy trained on one batch (``training``, ``optim``,
``fitting``), caption quality (``quality``, ``metrics``), generate() against the forward
(``agreement``), the labels of a prompted captioner's batch (``prompted``), and localization: traces of
what a model computes (``trace``), where a property breaks (``violations``, ``localize``,
``gradient_path``) and traced causes (``origins``). Each takes a model or a
``Subject`` and returns numbers or a ``Location``; none of them decides a verdict.
"""
