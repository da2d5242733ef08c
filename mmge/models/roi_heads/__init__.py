from .ge_res_layer import GEResLayer

__all__ = ['GEResLayer']
