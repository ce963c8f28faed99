"""dlf: Dynamic Logit Fusion (weak-to-strong logit fusion) as an lm-eval model.

Kept free of heavy imports: this module is imported at interpreter start-up by
the ``dlf_plugin.pth`` hook (see :mod:`dlf_plugin.startup`).
"""

__version__ = "0.1.0"
