"""``python -m tur_ext.ops``: prints how the compiled extension was built."""
from . import build_info

for key, value in build_info().items():
    print(f"{key:16s} {value}")
