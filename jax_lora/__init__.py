"""jax_lora: LoRA (arXiv 2106.09685) for JAX and Flax."""

from .config import INITS as INITS
from .config import LoraConfig as LoraConfig
from .linen import LoraWrapped as LoraWrapped
from .linen import disabled as disabled
from .linen import init_lora as init_lora
from .linen import wrap as wrap
from .merge import merge as merge
from .merge import unmerge as unmerge
from .optim import optimizer as optimizer
from .optim import trainable_mask as trainable_mask
from .report import ParamReport as ParamReport
from .report import param_report as param_report

__version__ = "0.1.0"

__all__ = [
    "INITS",
    "LoraConfig",
    "LoraWrapped",
    "ParamReport",
    "disabled",
    "init_lora",
    "merge",
    "optimizer",
    "param_report",
    "trainable_mask",
    "unmerge",
    "wrap",
]
