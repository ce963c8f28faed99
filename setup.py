"""Only what setup.cfg cannot declare: the start-up hook file and the bundled data.

lm-eval 0.4.13 reads no plugin entry points, so the install drops ``dlf_plugin.pth``
(one line, ``import dlf_plugin.startup``) into site-packages; it registers the model
name ``dlf`` when lm-eval loads its models. setuptools cannot place a .pth for both
regular and editable installs declaratively, hence this build_py. A regular install
also copies registry/, tasks/ and models/ into the package (``dlf_plugin/_bundled``);
an editable one reads them from the checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "dlf_plugin.pth"
PTH_LINE = "import dlf_plugin.startup\n"
BUNDLED = ("registry", "tasks", "models")


class BuildWithStartupHook(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = Path(self.get_finalized_command("install").install_lib)
        else:
            target = Path(self.build_lib)
            here = Path(__file__).resolve().parent
            for folder in BUNDLED:
                if (here / folder).is_dir():
                    shutil.copytree(
                        here / folder,
                        target / "dlf_plugin" / "_bundled" / folder,
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    )
        target.mkdir(parents=True, exist_ok=True)
        (target / PTH_NAME).write_text(PTH_LINE)


setup(cmdclass={"build_py": BuildWithStartupHook})
