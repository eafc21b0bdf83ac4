"""Every well-known training trick as a composable plug-in on one Hugging Face Accelerate loop."""

# First: silences the known-harmless library messages (listed in framework/console.py) before any library can print.
import framework.console  # noqa: F401  isort: skip
from framework.backend import Backend
from framework.config import TrainerConfig, parse_config, run_main
from framework.errors import ConfigError, FrameworkError, IncompatibleError, LaunchError
from framework.nn.hf_attention import register_when_transformers_loads
from framework.loop import Trainer
from framework.state import TrainState
from framework.task import ClassificationTask, Task
from framework.technique import Technique, register

__all__ = [
    "Backend", "ClassificationTask", "ConfigError", "FrameworkError", "IncompatibleError", "LaunchError", "Task",
    "Technique", "TrainState", "Trainer", "TrainerConfig", "parse_config", "register", "run_main",
]

# attn_implementation="framework_chunked" for transformers models: registered now if transformers' modeling code is
# loaded, else by a one-shot import hook when it loads (importing transformers here would cost ~2 s; see the module).
register_when_transformers_loads()
