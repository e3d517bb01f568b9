"""mvportrait: text -> FLAME -> multi-view renders -> multi-view video, built for speed.

Layers (imports only go downwards): kernels <- flame/render/models <- engine <- cli.
"""

__version__ = "0.1.0"
