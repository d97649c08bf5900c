"""Training stages of the synthetic math study on a `fwm data` workdir (experiments/synthetic_math.py).

The same stages, variants and model as experiments/synthetic_search_train.py (read its docstring), on the
arithmetic world's corpora, except stage 0: the arithmetic world has no documents (its manifest holds no
`pretrain` corpus), so mid-training starts from scratch:

  fwm data  --config experiments/synthetic_math.py --workdir $DATA
  fwm train --config experiments/synthetic_math_train.py:mid_train_plain --config.data.manifest=$DATA --workdir $RUN/mid_plain
  fwm train --config experiments/synthetic_math_train.py:mid_train_wm --config.data.manifest=$DATA --workdir $RUN/mid_wm
  fwm train --config experiments/synthetic_math_train.py:sft_full --config.data.manifest=$DATA \
      --config.init.source=orbax:$RUN/mid_wm/checkpoints --workdir $RUN/mid_wm_sft_full   # and from mid_plain
"""
import importlib.util
import os

from fwm.configlib import ConfigError

_SEARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_search_train.py")


def get_config(arg=None):
    # One definition of the stages: experiment files are loaded by path, not imported as a package.
    spec = importlib.util.spec_from_file_location("synthetic_search_train", _SEARCH)
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    if "pretrain" in (arg or "pretrain").split(","):
        raise ConfigError("experiments/synthetic_math_train.py: the arithmetic world has no documents, so no stage 0 "
                          "(pretrain); start with mid_train_plain or mid_train_wm (init.source scratch)")
    return search.get_config(arg, where="experiments/synthetic_math_train.py")
