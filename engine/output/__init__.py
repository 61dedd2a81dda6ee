"""Output: views as tars or directories, original layer tars rebuilt byte for byte, `save` archives.

May import the foundation (engine/*.py) only.
"""
