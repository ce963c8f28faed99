"""The root of dlf's own errors: faults whose message says what is wrong and what to do.

``RegistryError`` (bad registry or model_args), ``SolverOptionError``, ``SolverError``,
``PluginError`` and ``ModelFault`` derive from it (and keep their ValueError or
RuntimeError base). On lm-eval's command line such an error is printed as its message
alone, without a traceback (``dlf_plugin.console``); ``DLF_TRACEBACK=1`` shows it.
"""


class DLFError(Exception):
    """A fault dlf explains in its message (naming the file, key, model or argument)."""
