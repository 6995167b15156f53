"""Adapter files: our checkpoint (``checkpoint``, orbax, atomic) and PEFT's directory (``peft_files``).

Each module is imported by name, so this package imports nothing itself.
"""
