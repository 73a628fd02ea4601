"""Everything that imports ComfyUI: embedding, graph rewriting, execution, the Runflow node pack.

Nothing in this package imports ComfyUI at module import time; ComfyUI is imported only inside
the spawned runner child, after its environment (sys.path, directories, args) is set.
"""
