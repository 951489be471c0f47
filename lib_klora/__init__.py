"""sd-webui-klora core: training-free fusion of a subject LoRA and a style LoRA.

Nothing in this package imports the WebUI's ``modules``; host glue lives in ``lib_klora.hosts``.
"""

__version__ = "0.1.0"
