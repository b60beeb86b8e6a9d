"""Everything is in pyproject.toml; this adds the one thing it cannot: a ``.pth`` file beside the packages.

``moelora-lm-eval.pth`` arms ``moelora_lm_eval_plugin`` at start-up so that plain
``lm_eval --model moelora`` works on lm-eval releases without entry-point discovery (docs/lm_eval.md).
It goes into regular wheels (build_py) and editable ones (``pip install -e``).
"""

import inspect
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "moelora-lm-eval.pth"
PTH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


cmdclass = {"build_py": BuildPyWithPth}

try:  # setuptools >= 64: everything left in the unpacked editable wheel is installed as it is
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        # a private hook (setuptools 64-84): take its arguments by name, and add nothing if they change
        def _run_build_commands(self, *args, **kwargs):
            result = super()._run_build_commands(*args, **kwargs)
            names = inspect.signature(super()._run_build_commands).parameters
            unpacked = {**dict(zip(names, args)), **kwargs}.get("unpacked_wheel")
            if unpacked is not None:
                shutil.copyfile(PTH_SOURCE, os.path.join(unpacked, PTH))
            return result

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:
    pass

setup(cmdclass=cmdclass)
