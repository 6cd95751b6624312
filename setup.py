"""Build hook: the template's own files ship in the wheel as mlops/_template, for `mlops init`
(mlops/scaffold.py). An editable install reads them from the checkout instead."""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithTemplate(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        sys.path.insert(0, str(ROOT))
        from mlops.scaffold import template_files

        out = Path(self.build_lib) / "mlops" / "_template"
        for name in template_files(ROOT):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, out / name)


setup(cmdclass={"build_py": BuildPyWithTemplate})
