"""jax_lora: LoRA (arXiv 2106.09685) for JAX and Flax.

`AdapterCheckpointer` / `Restored` (orbax + tensorstore, ~30 MB and ~1 s to import) and the PEFT
file functions load on first use (PEP 562), so that ``import jax_lora`` stays light; ``from
jax_lora import AdapterCheckpointer`` and ``jax_lora.AdapterCheckpointer`` work as before.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .adapters import MultiLoraWrapped as MultiLoraWrapped
from .adapters import adapter_ids as adapter_ids
from .adapters import adapter_names as adapter_names
from .adapters import adapters_state as adapters_state
from .adapters import add_adapter as add_adapter
from .adapters import combine_adapters as combine_adapters
from .adapters import delete_adapter as delete_adapter
from .adapters import export_peft_adapters as export_peft_adapters
from .adapters import import_peft_adapters as import_peft_adapters
from .adapters import set_active_adapters as set_active_adapters
from .config import INITS as INITS
from .config import LoraConfig as LoraConfig
from .linen import LoraWrapped as LoraWrapped
from .linen import init_lora as init_lora
from .linen import wrap as wrap
from .merge import merge as merge
from .merge import unmerge as unmerge
from .nnx import load_lora as load_lora
from .nnx import lora_state as lora_state
from .optim import optimizer as optimizer
from .optim import trainable_mask as trainable_mask
from .quant import QArray as QArray
from .quant import dequantize as dequantize
from .quant import quantize as quantize
from .report import ParamReport as ParamReport
from .report import param_report as param_report
from .switch import disabled as disabled
from .switch import set_enabled as set_enabled
from .variants import convert_to_lora as convert_to_lora
from .variants import init_from_weights as init_from_weights

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from .checkpoint import AdapterCheckpointer as AdapterCheckpointer
    from .checkpoint import Restored as Restored
    from .peft import export_peft as export_peft
    from .peft import import_peft as import_peft

_LAZY = {  # public name -> the submodule that defines it, imported on first access
    "AdapterCheckpointer": "checkpoint",
    "Restored": "checkpoint",
    "export_peft": "peft",
    "import_peft": "peft",
}


def __getattr__(name: str) -> Any:
    if name in ("checkpoint", "peft"):  # the submodules, as attributes (they were before)
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jax_lora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"checkpoint", "peft"})


__all__ = [
    "INITS",
    "AdapterCheckpointer",
    "LoraConfig",
    "LoraWrapped",
    "MultiLoraWrapped",
    "ParamReport",
    "QArray",
    "Restored",
    "adapter_ids",
    "adapter_names",
    "adapters_state",
    "add_adapter",
    "combine_adapters",
    "convert_to_lora",
    "delete_adapter",
    "dequantize",
    "disabled",
    "export_peft",
    "export_peft_adapters",
    "import_peft",
    "import_peft_adapters",
    "init_from_weights",
    "init_lora",
    "load_lora",
    "lora_state",
    "merge",
    "optimizer",
    "param_report",
    "quantize",
    "set_active_adapters",
    "set_enabled",
    "trainable_mask",
    "unmerge",
    "wrap",
]
