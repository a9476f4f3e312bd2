"""deltatune: adapt pre-trained models to new tasks and make them small, measuring every choice.

    handle = deltatune.apply(model, deltatune.methods.make_config("lora", {"r": 8}))
    deltatune.save_adapter(handle, "out/")
"""
from deltatune.errors import DeltatuneError
from deltatune.methods import MethodConfig, MethodHandle, apply, make_config
from deltatune.methods.adapter_io import load_adapter, save_adapter

__version__ = "0.1.0"
__all__ = ["apply", "make_config", "save_adapter", "load_adapter", "MethodConfig",
           "MethodHandle", "DeltatuneError"]
