"""Training stages of the synthetic math study on a `fwm data` workdir (experiments/synthetic_math.py).

The same stages, variants and chain as experiments/synthetic_search_train.py (read its docstring), on the
arithmetic world's corpora:

  fwm data  --config experiments/synthetic_math.py --workdir $DATA
  fwm train --config experiments/synthetic_math_train.py:pretrain --config.data.manifest=$DATA --workdir $RUN/stage0
  fwm train --config experiments/synthetic_math_train.py:mid_train_wm --config.data.manifest=$DATA \
      --config.init.source=orbax:$RUN/stage0/checkpoints --workdir $RUN/mid_wm
  ...
"""
import importlib.util
import os

_SEARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_search_train.py")


def get_config(arg=None):
    # One definition of the stages: experiment files are loaded by path, not imported as a package.
    spec = importlib.util.spec_from_file_location("synthetic_search_train", _SEARCH)
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    config = search.get_config(arg, where="experiments/synthetic_math_train.py")
    return config
